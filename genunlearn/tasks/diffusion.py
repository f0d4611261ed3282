"""Class-conditional diffusion over diffusers models: ε-prediction loss, classifier-free guidance, sampling.

Denoisers are diffusers' ``UNet2DModel`` (class embeddings, ``num_class_embeds = K + 1``) or
``DiTTransformer2DModel`` (``num_embeds_ada_norm = K``, whose label table adds the null row); in
both the null (unconditional) class id is K. Pixel space, or latent space through an ``AutoencoderKL``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from torch import nn

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.models.presets import DiffusionPreset
from genunlearn.tasks.base import Batch, ParameterScope

Denoiser = UNet2DModel | DiTTransformer2DModel


def build_denoiser(preset: DiffusionPreset, num_classes: int) -> Denoiser:
    """A freshly initialised denoiser for ``num_classes`` classes plus the null class."""
    if preset.architecture == "unet":
        return UNet2DModel(**{**preset.model_args, "num_class_embeds": num_classes + 1})
    if preset.architecture == "dit":
        return DiTTransformer2DModel(**{**preset.model_args, "num_embeds_ada_norm": num_classes})
    raise UserError(f"preset {preset.name} has unknown architecture {preset.architecture!r}; use unet or dit")


def build_noise_scheduler(preset: DiffusionPreset) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=preset.num_train_timesteps, beta_schedule=preset.beta_schedule)


class DiffusionTask:
    """A class-conditional denoiser with its training noise scheduler, optional VAE and data.

    ``encoded_data``: the datasets hold diffusion-space tensors already (a latent model's generated latents);
    ``id2label``: class names a ``DiTPipeline`` carries, kept when the unlearned pipeline is saved."""

    def __init__(
        self,
        preset: DiffusionPreset,
        model: Denoiser,
        scheduler: DDPMScheduler,
        train_data: LabeledDataset,
        test_data: LabeledDataset,
        vae: AutoencoderKL | None = None,
        cache_dir: Path | None = None,
        encoded_data: bool = False,
        id2label: dict | None = None,
    ) -> None:
        self.preset = preset
        self.name = preset.name
        self.model = model
        self.scheduler = scheduler
        self.vae = vae
        self.train_data = train_data
        self.test_data = test_data
        self.cache_dir = cache_dir
        self.encoded_data = encoded_data
        self.id2label = id2label
        self.num_classes = len(train_data.classes)
        self.null_class = self.num_classes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> the diffusion space (VAE latents times its scaling factor)."""
        if self.vae is None or self.encoded_data:
            return images
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    def predict_noise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c) ``[B, C, H, W]``; a learned-sigma output (2C channels) is cut to its ε half."""
        output = model(noisy, timesteps, class_labels=labels).sample
        return output[:, : noisy.shape[1]] if output.shape[1] == 2 * noisy.shape[1] else output

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ε-prediction loss ``[B]``: mean over C, H, W of ``(ε - ε_θ(x_t, t, c))²`` at uniform t."""
        images, batch_labels = batch
        noisy, noise, timesteps = self._noised(images)
        predicted = self.predict_noise(model, noisy, timesteps, batch_labels if labels is None else labels)
        return (predicted.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))

    def _noised(self, images: torch.Tensor, timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, ε, t)`` for clean ``images``: uniform t unless given."""
        clean = self.encode(images)
        noise = torch.randn_like(clean)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(clean),), device=clean.device)
        return self.scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    @property
    def importance_loss_id(self) -> str:
        return f"guided_eps_antithetic_s{self.preset.sampling.guidance}"

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The guided ε loss ``[B]`` at antithetic timesteps (t and T-1-t, averaged), as the references' Fishers:
        ``ε_null + s (ε_c - ε_null)`` against the true noise, s the preset's sampling guidance (s = 1: ε_c)."""
        images, labels = batch
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(images),), device=images.device)
        noisy, noise, timesteps = self._noised(torch.cat([images, images]), torch.cat([t, steps - 1 - t]))
        labels = torch.cat([labels, labels])
        guidance = self.preset.sampling.guidance
        predicted = self.predict_noise(model, noisy, timesteps, labels)
        if guidance != 1.0:
            unconditional = self.predict_noise(model, noisy, timesteps, torch.full_like(labels, self.null_class))
            predicted = unconditional + guidance * (predicted - unconditional)
        per_sample = (predicted.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        return per_sample.view(2, -1).mean(dim=0)

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """Diffusion-space tensors ``[B, C', H', W']`` -> images in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            return encoded
        with torch.no_grad():
            return self.vae.decode(encoded / self.vae.config.scaling_factor).sample.float().clamp(-1.0, 1.0)

    def random_label_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor, form: str = "eps_match") -> torch.Tensor:
        """``rl`` per sample ``[B]`` towards the other classes ``labels``. ``eps_match`` (SalUn's DDPM form):
        ``(ε_θ(x_t, t, c_f) - sg[ε_θ(x_t, t, c')])²`` averaged over C, H, W, pulling the forget class's prediction
        onto another class's at the same x_t and t. ``relabel`` (SFR-on's DiT form): the ordinary ε loss on the
        forget images with their label swapped to c' (the reference fixes c' = c_f + 100 mod 1000; ``labels``
        are random other classes here, so the form works for any class count)."""
        if form == "relabel":
            return self.loss(model, (batch[0], labels))
        if form != "eps_match":
            raise UserError(f"unknown rl_form {form!r}; use eps_match or relabel")
        images, forget_labels = batch
        noisy, _, timesteps = self._noised(images)
        with torch.no_grad():
            target = self.predict_noise(model, noisy, timesteps, labels)
        predicted = self.predict_noise(model, noisy, timesteps, forget_labels)
        return (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``loss`` with classifier-free-guidance label dropout (``preset.class_dropout`` of labels -> null).
        DiT drops labels itself in training mode, so only UNet labels are dropped here."""
        images, labels = batch
        if self.preset.architecture == "unet" and model.training and self.preset.class_dropout > 0:
            dropped = torch.rand(len(labels), device=labels.device) < self.preset.class_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return self.loss(model, (images, labels))

    def fresh_model(self) -> Denoiser:
        return build_denoiser(self.preset, self.num_classes)

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        if scope != "all":
            raise UserError(f"diffusion tasks support the parameter scope 'all' only, not {scope!r}")
        return list(model.named_parameters())
