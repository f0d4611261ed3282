"""``ClassConditionalPipeline``: a diffusers ``DiffusionPipeline`` over a class-conditional UNet or DiT denoiser.

This file imports only torch and diffusers: ``save_pipeline`` copies it into every pipeline folder as
``pipeline.py``, so the folder loads with diffusers alone (``DiffusionPipeline.from_pretrained(folder,
custom_pipeline=folder + "/pipeline.py")``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from torch import nn


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
    """``pipe(class_labels, guidance_scale, num_inference_steps, generator)`` -> images (``output_type``, as diffusers'
    pipelines: PIL by default); ``id2label``: the class names (``{"0": "cat", ...}``), kept in ``model_index.json``."""

    model_cpu_offload_seq = "denoiser->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        denoiser: UNet2DModel | DiTTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
        num_classes: int = 10,
        id2label: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, vae=vae)
        self.register_to_config(num_classes=num_classes, id2label=id2label)

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
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label, as diffusers' image pipelines return them: ``output_type`` "pil" (default) a
        list of PIL images; "np" a ``[N, H, W, C]`` float array in [0, 1]; "pt" a ``[N, C, H, W]`` tensor in [0, 1];
        "latent" the final diffusion-space tensor, not decoded or clamped. The networks run in eval mode."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        with eval_mode(self.denoiser, self.vae):
            images = self._sample(class_labels, guidance_scale, num_inference_steps, generator, decode=output_type != "latent")
        if output_type != "latent":
            images = (images + 1) / 2
        if output_type in ("pil", "np"):
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
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
