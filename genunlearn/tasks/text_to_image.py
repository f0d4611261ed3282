"""Text-to-image diffusion over a ``StableDiffusionPipeline``'s components. Prompts play the part classes play
elsewhere: a dataset's labels index the task's prompt table (``classes``), so a concept's prompts are "classes" a
forget split names. Unlearning changes the UNet only; the text encoder, tokenizer and VAE stay frozen.

Losses as the Stable Diffusion references compute them (ALGORITHMS_T2I.md): the ε error averaged over C·H·W,
timesteps uniform, ∅ the embedding of the empty prompt padded to the tokenizer's length (not zeros)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.models.presets import TextToImagePreset
from genunlearn.noise import NoiseSource, current_noise, drawing_from, gaussian_sample
from genunlearn.tasks.base import Batch, ParameterScope

CAPTION_DROPOUT = 0.1  # pretraining: this share of captions becomes ∅, so classifier-free guidance has a trained ∅
MASK_GUIDANCE = 7.5  # SalUn's generate_mask.py: w of (1 + w) ε(x_t, c) - w ε(x_t, ∅)
SCOPES = {  # the parameter sets ESD trains (ALGORITHMS_T2I.md §1; diffusers' names)
    "all": "every UNet parameter",
    "cross-attention": "ESD-x: the cross-attention layers (attn2: to_q, to_k, to_v, to_out)",
    "non-cross-attention": "ESD-u as train-esd.py's noxattn: every parameter outside cross-attention, the UNet's time "
                           "embedding and its output layers (conv_norm_out, conv_out); norms and the blocks' time "
                           "projections included",
    "linear-non-cross-attention": "ESD-u as esd_sd.py: every Linear and Conv2d weight and bias outside cross-attention "
                                  "(time embedding and conv_out included, norms left out)",
}
NOXATTN_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")  # CompVis time_embed.*, out.0, out.2


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids ``[P, L]`` of ``prompts``, each padded to the tokenizer's length ``L`` as ``StableDiffusionPipeline``
    pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states ``[P, L, D]`` of ``prompts`` (``tokenize``)."""
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0].float().cpu()


def scope_parameters(unet: nn.Module, scope: ParameterScope) -> list[tuple[str, nn.Parameter]]:
    """``unet``'s named parameters in ``scope`` (one of ``SCOPES``)."""
    if scope not in SCOPES:
        raise UserError(f"unknown parameter scope {scope!r} for a text-to-image UNet; use one of {', '.join(SCOPES)}")
    if scope == "all":
        return list(unet.named_parameters())
    if scope == "cross-attention":
        return [(name, p) for name, p in unet.named_parameters() if "attn2" in name]
    if scope == "non-cross-attention":
        return [(name, p) for name, p in unet.named_parameters()
                if "attn2" not in name and not name.startswith(NOXATTN_EXCLUDED)]
    layers = {name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d)) and "attn2" not in name}
    return [(name, p) for name, p in unet.named_parameters() if name.rsplit(".", 1)[0] in layers]


class TextToImageTask:
    """A text-conditional UNet with its frozen text encoder, tokenizer and VAE, its training noise scheduler and data
    whose labels index ``prompts``. ``encoded_data``: the datasets hold latents already (the model's own generations);
    else images in [-1, 1], encoded by the VAE (times its scaling factor) on the fly. ``anchor``: the prompt rl pulls
    the forgotten prompts towards (SalUn's "a photo of a person wearing clothes"); without one, rl picks uniformly among
    ``rl_prompts`` (ids; the retained prompts, so that one paraphrase of an erased concept is never pulled towards
    another), or among all other prompts of the table as it picks other classes."""

    importance_loss_id = f"sd_guided_eps_w{MASK_GUIDANCE}_uniform_mean"
    pipeline_class = StableDiffusionPipeline  # the diffusers pipeline this task's components make up

    def __init__(self, preset: TextToImagePreset, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler: DDPMScheduler, train_data: LabeledDataset, test_data: LabeledDataset,
                 cache_dir: Path | None = None, encoded_data: bool = False, anchor: str | None = None,
                 rl_prompts: Sequence[int] | None = None) -> None:
        self.preset = preset
        self.name = preset.name
        self.model = unet
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.train_data = train_data
        self.test_data = test_data
        self.cache_dir = cache_dir
        self.encoded_data = encoded_data
        self.prompts = list(train_data.classes)
        self.num_classes = len(self.prompts)
        self.null_prompt = self.num_classes  # the id of ∅ in ``prompt_embeddings``
        self.anchor_prompt = None if anchor is None else self.num_classes + 1  # rl's target prompt, when one is given
        self.rl_prompts = None if rl_prompts is None else list(rl_prompts)
        self.prompt_embeddings = self.encode_prompt_table([*self.prompts, "", *([] if anchor is None else [anchor])])

    def encode_prompt_table(self, prompts: list[str]) -> torch.Tensor:
        """The text embeddings ``[P, L, D]`` of the prompt table (the pipeline's own encoding; ∅ is row ``null_prompt``)."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def condition(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The text embeddings ``[B, L, D]`` of prompt ids ``labels`` (``null_prompt``: ∅)."""
        return self.prompt_embeddings[labels.cpu()].to(device)

    def unet_inputs(self, labels: torch.Tensor, device: torch.device) -> dict:
        """The UNet's conditioning keyword arguments for prompt ids ``labels``."""
        return {"encoder_hidden_states": self.condition(labels, device)}

    def pipeline_components(self, unet: nn.Module) -> dict:
        """``pipeline_class``'s components, but its scheduler, with ``unet`` as the UNet (no safety checker)."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": unet,
                "safety_checker": None, "feature_extractor": None}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> latents times the VAE's scaling factor (latent data passes through)."""
        if self.encoded_data:
            return images
        with torch.no_grad():
            return gaussian_sample(self.vae.encode(images.to(self.vae.dtype)).latent_dist) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 4, h, w]`` -> images in [-1, 1]."""
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample.float().clamp(-1.0, 1.0)

    def predict_noise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c) ``[B, 4, h, w]`` for prompt ids ``labels``."""
        return model(noisy, timesteps, **self.unet_inputs(labels, noisy.device)).sample

    def noised(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, ε, t)`` for clean ``images``: the noise, then uniform timesteps (the SD references' order), both from
        ``current_noise``."""
        clean = self.encode(images)
        noise = current_noise().randn(tuple(clean.shape), clean.device, clean.dtype)
        timesteps = current_noise().randint(self.scheduler.config.num_train_timesteps, (len(clean),), clean.device)
        return self.scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ε error ``[B]``, averaged over C·H·W (``L_DSM`` of the references' retain term)."""
        images, batch_labels = batch
        noisy, noise, timesteps = self.noised(images)
        predicted = self.predict_noise(model, noisy, timesteps, batch_labels if labels is None else labels)
        return (predicted.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """SalUn's mask objective per sample ``[B]``: the guided ε ``(1 + w) ε(x_t, c) - w ε(x_t, ∅)`` (w =
        ``MASK_GUIDANCE``) against the noise, averaged over C·H·W; its gradients give SalUn's saliency and SFR-on's
        Fishers (the references negate it, which neither |g| nor g² sees)."""
        images, labels = batch
        noisy, noise, timesteps = self.noised(images)
        conditional = self.predict_noise(model, noisy, timesteps, labels)
        unconditional = self.predict_noise(model, noisy, timesteps, torch.full_like(labels, self.null_prompt))
        guided = (1 + MASK_GUIDANCE) * conditional - MASK_GUIDANCE * unconditional
        return (guided.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))

    def random_label_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor, form: str = "eps_match") -> torch.Tensor:
        """``rl`` per sample ``[B]``: ``(ε_θ(x_t, c_f) - sg[ε_θ(x_t, c')])²`` averaged over C·H·W, both at the same x_t
        and t, the target from the current model (SalUn's and SFR-on's SD ``random_label.py``); ``labels``: c'."""
        if form != "eps_match":
            raise UserError(f"text-to-image rl has the eps_match form only, not {form!r}")
        images, forget_labels = batch
        noisy, _, timesteps = self.noised(images)
        with torch.no_grad():
            target = self.predict_noise(model, noisy, timesteps, labels)
        predicted = self.predict_noise(model, noisy, timesteps, forget_labels)
        return (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The (pre)training loss ``[B]``: ``loss`` with ``CAPTION_DROPOUT`` of the captions replaced by ∅ in training
        mode, as the pipeline's guidance needs."""
        images, labels = batch
        if model.training:
            dropped = current_noise().rand((len(labels),), labels.device) < CAPTION_DROPOUT
            labels = torch.where(dropped, torch.full_like(labels, self.null_prompt), labels)
        return self.loss(model, (images, labels))

    def fresh_model(self) -> UNet2DConditionModel:
        return UNet2DConditionModel.from_config(self.model.config)

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        return scope_parameters(model, scope)


class TextConditionedUNet(nn.Module):
    """A UNet and the text encoder that conditions it, as one module, so that pretraining trains both."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """ε(x_t, t, c) ``[B, 4, h, w]`` for prompts given as token ids ``[B, L]``."""
        return self.unet(noisy, timesteps, encoder_hidden_states=self.text_encoder(input_ids)[0]).sample


class JointTextToImageTraining(TextToImageTask):
    """Pretraining a fresh UNet together with a fresh text encoder (a ``TextConditionedUNet``), as latent diffusion
    trains its text-to-image model: each prompt's condition comes from its tokens through the encoder being trained,
    not from the frozen ``prompt_embeddings``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_tokens = tokenize(self.tokenizer, [*self.prompts, ""])  # row ``null_prompt``: ∅

    def predict_noise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(noisy, timesteps, self.prompt_tokens[labels.cpu()].to(noisy.device))

    def fresh_model(self) -> TextConditionedUNet:
        return TextConditionedUNet(UNet2DConditionModel.from_config(self.model.config), CLIPTextModel(self.text_encoder.config))


class AutoencoderTraining:
    """A VAE's pretraining as a task the training loop runs: the reconstruction error of a posterior sample, averaged
    over C·H·W, plus the KL term at latent diffusion's weight ``KL_WEIGHT``. ``model``: the VAE it starts from."""

    KL_WEIGHT = 1e-6

    def __init__(self, name: str, vae: AutoencoderKL) -> None:
        self.name = f"{name} autoencoder"
        self.model = vae

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, _ = batch
        posterior = model.encode(images).latent_dist
        reconstruction = model.decode(gaussian_sample(posterior)).sample
        return (reconstruction - images).pow(2).mean(dim=(1, 2, 3)) + self.KL_WEIGHT * posterior.kl()

    def fresh_model(self) -> AutoencoderKL:
        return AutoencoderKL.from_config(self.model.config)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> float:
    """``1 / std`` of the posterior samples of ``images`` ``[N, C, H, W]``: the factor that gives the diffusion model
    unit-variance latents (SD v1's 0.18215 was found the same way); the samples are drawn with ``seed``."""
    with drawing_from(NoiseSource(seed)):
        return float(1.0 / gaussian_sample(vae.encode(images).latent_dist).std())
