"""Which text-to-image task serves a diffusers pipeline: SD 1.x/2.x, SD-XL or SD3 (``text_to_image_task``)."""

from __future__ import annotations

from diffusers import DDPMScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from genunlearn.tasks.text_to_image import TextToImageTask
from genunlearn.tasks.text_to_image_sd3 import FlowMatchTextToImageTask
from genunlearn.tasks.text_to_image_xl import TextToImageXLTask


def text_to_image_task(pipeline, preset, scheduler, train_data, test_data, **options) -> TextToImageTask:
    """The task over a ``StableDiffusionPipeline``'s, ``StableDiffusionXLPipeline``'s or ``StableDiffusion3Pipeline``'s
    components (``options``: the ``TextToImageTask`` keywords). ``scheduler``: the training noise scheduler of an SD or
    SD-XL pipeline, None for a ``DDPMScheduler`` from its config; an SD3 pipeline always trains on its own
    flow-matching scheduler's grid (``scheduler`` is not used)."""
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return FlowMatchTextToImageTask.from_pipeline(pipeline, preset, train_data, test_data, **options)
    scheduler = scheduler or DDPMScheduler.from_config(pipeline.scheduler.config)
    if isinstance(pipeline, StableDiffusionXLPipeline):
        return TextToImageXLTask.from_pipeline(pipeline, preset, scheduler, train_data, test_data, **options)
    return TextToImageTask(preset, pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, scheduler,
                           train_data, test_data, **options)
