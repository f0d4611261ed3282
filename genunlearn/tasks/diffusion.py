"""Class-conditional diffusion over diffusers models: ε-prediction loss, classifier-free guidance, sampling.

Denoisers are diffusers' ``UNet2DModel`` (class embeddings, ``num_class_embeds = K + 1``) or
``DiTTransformer2DModel`` (``num_embeds_ada_norm = K``, whose label table adds the null row); in
both the null (unconditional) class id is K. Pixel space, or latent space through an ``AutoencoderKL``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.models.presets import DiffusionPreset
from genunlearn.noise import current_noise, gaussian_sample
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


@contextmanager
def own_label_dropout(model: nn.Module) -> Iterator[None]:
    """A DiT's label embedders in eval mode for the block, so that only ``DiffusionTask.conditioning`` drops labels.

    diffusers' DiT gives every transformer block its own ``LabelEmbedding``, each dropping labels with its own draw
    from the device's generator in training mode; the DiT reference drops a sample's label once, for every block."""
    embedders = [module for module in model.modules() if isinstance(module, LabelEmbedding) and module.training]
    for embedder in embedders:
        embedder.eval()
    try:
        yield
    finally:
        for embedder in embedders:
            embedder.train()


def antithetic_timesteps(count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """``[count]`` timesteps as the DDPM references draw a batch's: ``count // 2 + 1`` uniform t, then T-1-t of them,
    cut to ``count``."""
    first = torch.randint(0, steps, (count // 2 + 1,), generator=generator)
    return torch.cat([first, steps - 1 - first])[:count]


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
            return gaussian_sample(self.vae.encode(images).latent_dist) * self.vae.config.scaling_factor

    def predict_noise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c) ``[B, C, H, W]``; a learned-sigma output (2C channels) is cut to its ε half. A DiT's own
        label dropout is off (``own_label_dropout``): ``conditioning`` drops labels."""
        with own_label_dropout(model):
            output = model(noisy, timesteps, class_labels=labels).sample
        return output[:, : noisy.shape[1]] if output.shape[1] == 2 * noisy.shape[1] else output

    def conditioning(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` as the denoiser sees them: in training mode ``preset.class_dropout`` of them are replaced by the
        null class, as the DDPM references drop labels in pretraining and in every unlearning step, and the DiT
        reference once per sample (drawn from ``current_noise``)."""
        if not model.training or self.preset.class_dropout <= 0:
            return labels
        dropped = current_noise().rand((len(labels),), labels.device) < self.preset.class_dropout
        return torch.where(dropped, torch.full_like(labels, self.null_class), labels)

    def reduce(self, error: torch.Tensor) -> torch.Tensor:
        """Squared-error map ``[B, C, H, W]`` -> per-sample loss ``[B]``: summed or averaged over C, H, W
        (``preset.objective.reduction``)."""
        if self.preset.objective.reduction == "sum":
            return error.sum(dim=(1, 2, 3))
        return error.mean(dim=(1, 2, 3))

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ε-prediction loss ``[B]`` of unlearning: ``(ε - ε_θ(x_t, t, c))²`` at the preset's timesteps
        (``timesteps``), reduced over C, H, W as its reference does (``reduce``), labels dropped in training mode
        (``conditioning``)."""
        images, batch_labels = batch
        labels = batch_labels if labels is None else labels
        return self.reduce(self._squared_error(model, images, labels, self.preset.objective.timesteps))

    def _squared_error(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scheme: str) -> torch.Tensor:
        """``(ε - ε_θ(x_t, t, c))²`` ``[B, C, H, W]`` with t drawn by ``scheme``; labels dropped (``conditioning``)
        before the noise is drawn, the order the cached pretrainings used."""
        conditions = self.conditioning(model, labels)
        noisy, noise, timesteps = self._noised(images, scheme)
        predicted = self.predict_noise(model, noisy, timesteps, conditions)
        return (predicted.float() - noise.float()).pow(2)

    def timesteps(self, count: int, scheme: str, device: torch.device) -> torch.Tensor:
        """``count`` training timesteps ``[count]``: ``uniform``, or ``antithetic`` as the DDPM references draw them
        (``count // 2 + 1`` uniform, then T-1-t of those, cut to ``count``: one timestep per sample, the batch balanced
        between noisy and clean ends)."""
        steps = self.scheduler.config.num_train_timesteps
        if scheme == "uniform":
            return current_noise().randint(steps, (count,), device)
        return current_noise().per_sample(count, lambda n, generator: antithetic_timesteps(n, steps, generator)).to(device)

    def _noised(self, images: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, ε, t)`` for clean ``images``, t drawn by ``scheme`` after the noise (both from ``current_noise``)."""
        clean = self.encode(images)
        noise = current_noise().randn(tuple(clean.shape), clean.device, clean.dtype)
        timesteps = self.timesteps(len(clean), scheme, clean.device)
        return self.scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    @property
    def importance_loss_id(self) -> str:
        objective = self.preset.objective
        return f"guided_eps_{objective.timesteps}_per_sample_s{objective.importance_guidance}_{objective.reduction}"

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The loss ``[B]`` whose gradients give Fishers and saliency, as the preset's reference computes it
        (``preset.objective``): the guided ε ``ε_null + s (ε_c - ε_null)`` (s = 1: ε_c alone) against the true noise,
        reduced like ``loss``, at the preset's timesteps (one per sample), labels never dropped."""
        images, labels = batch
        noisy, noise, timesteps = self._noised(images, self.preset.objective.timesteps)
        predicted = self.predict_noise(model, noisy, timesteps, labels)
        guidance = self.preset.objective.importance_guidance
        if guidance != 1.0:
            unconditional = self.predict_noise(model, noisy, timesteps, torch.full_like(labels, self.null_class))
            predicted = unconditional + guidance * (predicted - unconditional)
        return self.reduce((predicted.float() - noise.float()).pow(2))

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """Diffusion-space tensors ``[B, C', H', W']`` -> images in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            return encoded
        with torch.no_grad():
            return self.vae.decode(encoded / self.vae.config.scaling_factor).sample.float().clamp(-1.0, 1.0)

    def random_label_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor, form: str = "eps_match") -> torch.Tensor:
        """``rl`` per sample ``[B]`` towards the other classes ``labels``. ``eps_match`` (SalUn's DDPM form):
        ``(ε_θ(x_t, t, c_f) - sg[ε_θ(x_t, t, c')])²`` averaged over C, H, W whatever ``reduce`` does (the reference's
        ``nn.MSELoss`` is an element mean while its retain loss is a sum), both passes' labels dropped in training
        mode, pulling the forget class's prediction onto another class's at the same x_t and t. ``relabel`` (SFR-on's DiT form): the ordinary ε loss on the
        forget images with their label swapped to c' (the reference fixes c' = c_f + 100 mod 1000: ``rl_shift: 100``;
        ``labels`` come from ``random_other_labels``)."""
        if form == "relabel":
            return self.loss(model, (batch[0], labels))
        if form != "eps_match":
            raise UserError(f"unknown rl_form {form!r}; use eps_match or relabel")
        images, forget_labels = batch
        noisy, _, timesteps = self._noised(images, self.preset.objective.timesteps)
        with torch.no_grad():
            target = self.predict_noise(model, noisy, timesteps, self.conditioning(model, labels))
        predicted = self.predict_noise(model, noisy, timesteps, self.conditioning(model, forget_labels))
        return (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The (pre)training loss ``[B]``: the ε error averaged over C, H, W at uniform t (diffusers' training scripts;
        with Adam the scale barely matters and cached pretrained weights stay valid), labels dropped as in ``loss``."""
        images, labels = batch
        return self._squared_error(model, images, labels, "uniform").mean(dim=(1, 2, 3))

    def fresh_model(self) -> Denoiser:
        return build_denoiser(self.preset, self.num_classes)

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        if scope != "all":
            raise UserError(f"diffusion tasks support the parameter scope 'all' only, not {scope!r}")
        return list(model.named_parameters())
