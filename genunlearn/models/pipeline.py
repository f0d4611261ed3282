"""``ClassConditionalPipeline``: seeded class-conditional sampling for any genunlearn diffusion model.

A diffusers ``DiffusionPipeline`` (so ``save_pretrained``/``from_pretrained`` round-trip) over a UNet or
DiT denoiser, a scheduler and an optional VAE, with classifier-free guidance around the null class
``num_classes``. (diffusers' own ``DiTPipeline`` hard-codes the null class 1000 and always decodes
through a VAE, so it serves only 1000-class latent DiTs.)
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers

from genunlearn.tasks.diffusion import Denoiser


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
        """Sample one image per label. ``output_type`` "pt": a ``[N, C, H, W]`` tensor in [-1, 1]; "pil": PIL images.
        The networks run in eval mode (a DiT in training mode would drop labels at random)."""
        networks = [m for m in (self.denoiser, self.vae) if m is not None]
        modes = [m.training for m in networks]
        for network in networks:
            network.eval()
        try:
            images = self._sample(class_labels, guidance_scale, num_inference_steps, generator)
        finally:
            for network, mode in zip(networks, modes):
                network.train(mode)
        if output_type == "pil":
            images = self.numpy_to_pil(((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample(self, class_labels, guidance_scale: float, num_inference_steps: int, generator) -> torch.Tensor:
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
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return x.float().clamp(-1.0, 1.0)
