"""Sampling pipelines: diffusers' ``DiTPipeline`` for 1000-class latent DiTs, ``ClassConditionalPipeline`` otherwise.

``ClassConditionalPipeline`` is a diffusers ``DiffusionPipeline`` (so ``save_pretrained``/``from_pretrained``
round-trip) over a UNet or DiT denoiser, a scheduler and an optional VAE, with classifier-free guidance
around the null class ``num_classes``. diffusers' own ``DiTPipeline`` hard-codes the null class 1000 and
always decodes through a VAE, so it serves only 1000-class latent DiTs (DiT-XL/2 and its kind).
``sample_images`` samples either kind the same way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from torch import nn

from genunlearn.tasks.diffusion import Denoiser

DIT_PIPELINE_CLASSES = 1000  # DiTPipeline's hard-coded null class id


@contextmanager
def eval_mode(*networks: nn.Module | None):
    """Put ``networks`` in eval mode for the block (a DiT in training mode drops labels at random), then restore."""
    present = [n for n in networks if n is not None]
    modes = [n.training for n in present]
    for network in present:
        network.eval()
    try:
        yield
    finally:
        for network, mode in zip(present, modes):
            network.train(mode)


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels, guidance_scale, num_inference_steps, generator)`` -> images in [-1, 1]."""

    model_cpu_offload_seq = "denoiser->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, vae=vae)
        self.register_to_config(num_classes=num_classes)

    def _sample_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        return config.in_channels, config.sample_size, config.sample_size

    def _guided_noise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """``ε_null + s (ε_c - ε_null)``; ``s = 1`` is plain conditional sampling (one pass)."""
        channels = x.shape[1]
        if guidance_scale == 1.0:
            eps = self.denoiser(x, t.expand(len(x)), class_labels=labels).sample
            return eps[:, :channels]
        null = torch.full_like(labels, self.config.num_classes)
        both = self.denoiser(torch.cat([x, x]), t.expand(2 * len(x)), class_labels=torch.cat([labels, null])).sample
        conditional, unconditional = both[:, :channels].chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label. ``output_type`` "pt": a ``[N, C, H, W]`` tensor in [-1, 1]; "pil": PIL images;
        "latent": the final diffusion-space tensor, not decoded or clamped. The networks run in eval mode."""
        with eval_mode(self.denoiser, self.vae):
            images = self._sample(class_labels, guidance_scale, num_inference_steps, generator, decode=output_type != "latent")
        if output_type == "pil":
            images = self.numpy_to_pil(((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample(self, class_labels, guidance_scale: float, num_inference_steps: int, generator, decode: bool) -> torch.Tensor:
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).flatten()
        dtype = next(self.denoiser.parameters()).dtype
        x = torch.randn((len(labels), *self._sample_shape()), generator=generator, dtype=torch.float32).to(device, dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            eps = self._guided_noise(model_input, t.to(device).reshape(1), labels, guidance_scale)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        if not decode:
            return x.float()
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return x.float().clamp(-1.0, 1.0)


Pipeline = ClassConditionalPipeline | DiTPipeline


def make_pipeline(denoiser: Denoiser, scheduler, vae: AutoencoderKL | None, num_classes: int,
                  id2label: dict | None = None) -> Pipeline:
    """``DiTPipeline`` for a 1000-class latent DiT (what DiT-XL/2 users load), else ``ClassConditionalPipeline``."""
    if isinstance(denoiser, DiTTransformer2DModel) and vae is not None and num_classes == DIT_PIPELINE_CLASSES:
        pipeline = DiTPipeline(transformer=denoiser, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label:
            pipeline.register_to_config(id2label=id2label)  # DiTPipeline does not, so save_pretrained would drop it
        return pipeline
    return ClassConditionalPipeline(denoiser=denoiser, scheduler=scheduler, vae=vae, num_classes=num_classes)


def pipeline_denoiser(pipeline: Pipeline) -> Denoiser:
    return pipeline.transformer if isinstance(pipeline, DiTPipeline) else pipeline.denoiser


def pipeline_num_classes(pipeline: Pipeline) -> int:
    return DIT_PIPELINE_CLASSES if isinstance(pipeline, DiTPipeline) else pipeline.config.num_classes


def pipeline_class_names(pipeline: Pipeline) -> list[str]:
    """Class names: a DiTPipeline's ``id2label`` (first synonym), else the ids as strings."""
    id2label = pipeline.config.get("id2label") if isinstance(pipeline, DiTPipeline) else None
    names = [str(i) for i in range(pipeline_num_classes(pipeline))]
    for key, value in (id2label or {}).items():
        names[int(key)] = value.split(",")[0].strip()
    return names


@torch.no_grad()
def sample_images(pipeline: Pipeline, labels: list[int], *, guidance: float, steps: int, generator: torch.Generator,
                  latents: bool = False) -> torch.Tensor:
    """One sample per label ``[N, C, H, W]`` on CPU: images in [-1, 1], or with ``latents`` the denoiser's own
    output space (VAE latents times the scaling factor, never decoded), in eval mode for either pipeline kind."""
    if latents:
        pipeline = ClassConditionalPipeline(denoiser=pipeline_denoiser(pipeline), scheduler=pipeline.scheduler,
                                            num_classes=pipeline_num_classes(pipeline))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(labels, guidance, steps, generator, output_type="latent").images.cpu()
    if isinstance(pipeline, DiTPipeline):
        with eval_mode(pipeline.transformer, pipeline.vae):
            images = pipeline(labels, guidance, generator, steps, output_type="pt").images
        return (images.float() * 2 - 1).cpu()  # DiTPipeline returns [0, 1]
    return pipeline(labels, guidance, steps, generator, output_type="pt").images.cpu()
