"""Sampling pipelines: diffusers' ``DiTPipeline`` for 1000-class latent DiTs, ``ClassConditionalPipeline`` otherwise.

``ClassConditionalPipeline`` is a diffusers ``DiffusionPipeline`` (so ``save_pretrained``/``from_pretrained``
round-trip) over a UNet or DiT denoiser, a scheduler and an optional VAE, with classifier-free guidance
around the null class ``num_classes``. diffusers' own ``DiTPipeline`` hard-codes the null class 1000 and
always decodes through a VAE, so it serves only 1000-class latent DiTs (DiT-XL/2 and its kind).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from genunlearn.models.class_conditional import ClassConditionalPipeline
from genunlearn.tasks.diffusion import Denoiser

DIT_PIPELINE_CLASSES = 1000  # DiTPipeline's hard-coded null class id


Pipeline = ClassConditionalPipeline | DiTPipeline


def make_pipeline(denoiser: Denoiser, scheduler, vae: AutoencoderKL | None, num_classes: int,
                  id2label: dict | None = None) -> Pipeline:
    """``DiTPipeline`` for a 1000-class latent DiT (what DiT-XL/2 users load), else ``ClassConditionalPipeline``;
    ``id2label`` (``{"0": name, ...}``) is kept in the config of either."""
    if isinstance(denoiser, DiTTransformer2DModel) and vae is not None and num_classes == DIT_PIPELINE_CLASSES:
        pipeline = DiTPipeline(transformer=denoiser, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label:
            pipeline.register_to_config(id2label=id2label)  # DiTPipeline does not, so save_pretrained would drop it
        return pipeline
    return ClassConditionalPipeline(denoiser=denoiser, scheduler=scheduler, vae=vae, num_classes=num_classes, id2label=id2label)


def pipeline_denoiser(pipeline: Pipeline) -> Denoiser:
    return pipeline.transformer if isinstance(pipeline, DiTPipeline) else pipeline.denoiser


def pipeline_num_classes(pipeline: Pipeline) -> int:
    return DIT_PIPELINE_CLASSES if isinstance(pipeline, DiTPipeline) else pipeline.config.num_classes


def pipeline_class_names(pipeline: Pipeline) -> list[str]:
    """Class names: the pipeline's ``id2label`` (first synonym), else the ids as strings."""
    id2label = pipeline.config.get("id2label")
    names = [str(i) for i in range(pipeline_num_classes(pipeline))]
    for key, value in (id2label or {}).items():
        names[int(key)] = value.split(",")[0].strip()
    return names
