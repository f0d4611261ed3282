"""Text-to-image diffusion over a ``StableDiffusionPipeline``'s components. Prompts play the part classes play
elsewhere: a dataset's labels index the task's prompt table (``classes``), so a concept's prompts are "classes" a
forget split names. Unlearning changes the UNet only; the text encoder, tokenizer and VAE stay frozen.

Losses as the Stable Diffusion references compute them (ALGORITHMS_T2I.md): the ε error averaged over C·H·W,
timesteps uniform, ∅ the embedding of the empty prompt padded to the tokenizer's length (not zeros)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
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


def sampling_scheduler(pipeline_class: type, noise_schedule: dict) -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """The scheduler genunlearn samples a ``pipeline_class`` with, on ``noise_schedule`` (a scheduler's config): SD3's
    own flow-matching Euler, else DDIM (η = 0) with its x̂₀ never clipped, since latents are not images in [-1, 1]
    (DDIM's default clips; SD's own configs say no, SD-XL's Euler config says nothing)."""
    if issubclass(pipeline_class, StableDiffusion3Pipeline):
        return FlowMatchEulerDiscreteScheduler.from_config(noise_schedule)
    return DDIMScheduler.from_config(noise_schedule, clip_sample=False)


def scope_parameters(unet: nn.Module, scope: ParameterScope, cross_attention: tuple[str, ...] = ("attn2",),
                     noxattn_excluded: tuple[str, ...] = NOXATTN_EXCLUDED) -> list[tuple[str, nn.Parameter]]:
    """``unet``'s named parameters in ``scope`` (one of ``SCOPES``); ``cross_attention``: the name parts that mark
    cross-attention, ``noxattn_excluded``: the prefixes ESD-u's noxattn leaves out (a UNet's, or an MMDiT's)."""
    if scope not in SCOPES:
        raise UserError(f"unknown parameter scope {scope!r} for a text-to-image denoiser; use one of {', '.join(SCOPES)}")

    def crossing(name: str) -> bool:
        return any(part in f".{name}." for part in cross_attention)

    if scope == "all":
        return list(unet.named_parameters())
    if scope == "cross-attention":
        return [(name, p) for name, p in unet.named_parameters() if crossing(name)]
    if scope == "non-cross-attention":
        return [(name, p) for name, p in unet.named_parameters()
                if not crossing(name) and not name.startswith(noxattn_excluded)]
    layers = {name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d)) and not crossing(name)}
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
        self.anchor = anchor
        self.anchor_prompt = None if anchor is None else self.num_classes + 1  # rl's target prompt, when one is given
        self.rl_prompts = None if rl_prompts is None else list(rl_prompts)
        table = [*self.prompts, "", *([] if anchor is None else [anchor])]
        self.table_tokens = self.prompt_tokens(table)  # per tokenizer ``[P, L]``: what joint pretraining encodes
        self.prompt_conditions = self.encode_prompt_table(table)
        self.prompt_embeddings = self.prompt_conditions["encoder_hidden_states"]  # [P, L, D]

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The frozen text encoders, in the pipeline's order."""
        return [self.text_encoder]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer]

    def prompt_tokens(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each tokenizer's ids ``[P, L]`` of ``prompts`` (``tokenize``)."""
        return [tokenize(tokenizer, prompts) for tokenizer in self.tokenizers]

    def encode_tokens(self, encoders: Sequence[nn.Module], tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning tensors ``{name: [B, ...]}`` of prompts given as ``tokens`` (one ``[B, L]`` per encoder),
        computed by ``encoders`` (the frozen ones, or those being pretrained) as the pipeline encodes prompts: SD's last
        hidden states ``[B, L, D]``."""
        return {"encoder_hidden_states": encoders[0](tokens[0].to(encoders[0].device))[0]}

    def null_conditions(self, conditions: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``conditions`` of prompt ids ``labels`` with ∅'s rows as the pipeline's unconditional half has them (SD: the
        empty prompt's encoding, unchanged)."""
        return conditions

    def encode_prompt_table(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors ``{name: [P, ...]}`` of the prompt table, on the CPU in float32 (the pipeline's own
        encoding; ∅ is row ``null_prompt``)."""
        with torch.no_grad():
            conditions = self.encode_tokens(self.text_encoders, self.prompt_tokens(prompts))
        conditions = {name: value.float().cpu() for name, value in conditions.items()}
        return self.null_conditions(conditions, torch.arange(len(prompts)))

    def condition(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The text embeddings ``[B, L, D]`` of prompt ids ``labels`` (``null_prompt``: ∅)."""
        return self.prompt_embeddings[labels.cpu()].to(device)

    def model_inputs(self, conditions: dict[str, torch.Tensor], device: torch.device) -> dict:
        """The denoiser's conditioning keyword arguments from ``conditions`` (``encode_tokens``' names, ``[B, ...]``)."""
        return {"encoder_hidden_states": conditions["encoder_hidden_states"].to(device)}

    def unet_inputs(self, labels: torch.Tensor, device: torch.device) -> dict:
        """The denoiser's conditioning keyword arguments for prompt ids ``labels``."""
        return self.model_inputs({name: table[labels.cpu()] for name, table in self.prompt_conditions.items()}, device)

    def denoise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The denoiser's output ``[B, C, h, w]`` at ``noisy``, ``timesteps`` ``[B]`` and conditioning ``inputs``."""
        return model(noisy, timesteps, **inputs).sample

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
        """The model's prediction ``[B, C, h, w]`` (ε_θ(x_t, t, c) here) for prompt ids ``labels``; a
        ``TextConditioned`` model (pretraining) encodes the prompts with its own text encoders."""
        if isinstance(getattr(model, "module", model), TextConditioned):
            return model(noisy, timesteps, [tokens[labels.cpu()] for tokens in self.table_tokens], labels, self.joint_prediction)
        return self.denoise(model, noisy, timesteps, self.unet_inputs(labels, noisy.device))

    def joint_prediction(self, denoiser: nn.Module, encoders: Sequence[nn.Module], noisy: torch.Tensor,
                         timesteps: torch.Tensor, tokens: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``predict_noise`` through ``encoders`` being trained: the prompts' ``tokens`` (per tokenizer ``[B, L]``)
        encoded with gradients, ∅'s rows as ``null_conditions`` has them."""
        conditions = self.null_conditions(self.encode_tokens(encoders, tokens), labels.to(noisy.device))
        return self.denoise(denoiser, noisy, timesteps, self.model_inputs(conditions, noisy.device))

    def sampler(self, steps: int) -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
        """A fresh ``sampling_scheduler`` on the task's noise schedule, set to ``steps`` steps: how ESD samples x_t (a
        fresh one each time, as Euler's counts its steps)."""
        sampler = sampling_scheduler(self.pipeline_class, self.scheduler.config)
        sampler.set_timesteps(steps)
        return sampler

    def timestep_of_index(self, index: int) -> torch.Tensor:
        """The denoiser's timestep for the training schedule's index ``index`` (0 clean, T - 1 pure noise): the index."""
        return torch.tensor(index)

    def noised(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t)`` for clean ``images``: the noise, then uniform timesteps (the SD references' order), both
        from ``current_noise``; the target, what the denoiser predicts at x_t, is the noise ε."""
        clean = self.encode(images)
        noise = current_noise().randn(tuple(clean.shape), clean.device, clean.dtype)
        timesteps = current_noise().randint(self.scheduler.config.num_train_timesteps, (len(clean),), clean.device)
        return self.scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ε error ``[B]``, averaged over C·H·W (``L_DSM`` of the references' retain term)."""
        images, batch_labels = batch
        noisy, target, timesteps = self.noised(images)
        predicted = self.predict_noise(model, noisy, timesteps, batch_labels if labels is None else labels)
        return (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """SalUn's mask objective per sample ``[B]``: the guided ε ``(1 + w) ε(x_t, c) - w ε(x_t, ∅)`` (w =
        ``MASK_GUIDANCE``) against the noise, averaged over C·H·W; its gradients give SalUn's saliency and SFR-on's
        Fishers (the references negate it, which neither |g| nor g² sees)."""
        images, labels = batch
        noisy, target, timesteps = self.noised(images)
        conditional = self.predict_noise(model, noisy, timesteps, labels)
        unconditional = self.predict_noise(model, noisy, timesteps, torch.full_like(labels, self.null_prompt))
        guided = (1 + MASK_GUIDANCE) * conditional - MASK_GUIDANCE * unconditional
        return (guided.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

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

    def fresh_model(self) -> nn.Module:
        """The denoiser's architecture, newly initialised."""
        return type(self.model).from_config(self.model.config)

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        return scope_parameters(model, scope)


class TextConditioned(nn.Module):
    """A denoiser and the text encoders that condition it, as one module, so that pretraining trains them together
    (the forward pass through the module keeps DDP's gradient hooks)."""

    def __init__(self, denoiser: nn.Module, text_encoders: Sequence[nn.Module]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders = nn.ModuleList(text_encoders)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, tokens: list[torch.Tensor], labels: torch.Tensor,
                predict) -> torch.Tensor:
        """``predict(denoiser, text_encoders, noisy, timesteps, tokens, labels)``: a task's ``joint_prediction``."""
        return predict(self.denoiser, self.text_encoders, noisy, timesteps, tokens, labels)


def conditioned_parts(model: nn.Module, text_encoders: Sequence[nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """``(denoiser, text encoders)`` that make up ``model``: a ``TextConditioned``'s own (an erasure that trained its
    text encoder, as AdvUnlearn's), else ``model`` with ``text_encoders`` (the task's frozen ones)."""
    if isinstance(model, TextConditioned):
        return model.denoiser, list(model.text_encoders)
    return model, list(text_encoders)


class JointTextToImageTraining:
    """Pretraining ``task``'s fresh denoiser together with fresh text encoders (a ``TextConditioned``), as latent
    diffusion trains its text-to-image model: each prompt's condition comes from its tokens through the encoders being
    trained, not from the frozen table. Everything else is ``task``'s."""

    def __init__(self, task: "TextToImageTask") -> None:
        self.task = task

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def fresh_model(self) -> TextConditioned:
        return TextConditioned(self.task.fresh_model(), [type(e)(e.config) for e in self.task.text_encoders])


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
def latent_shift_and_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> tuple[float, float]:
    """``(mean, 1 / std)`` of the posterior samples of ``images`` ``[N, C, H, W]``: the shift (SD3's) and the factor
    that give the diffusion model zero-mean, unit-variance latents (SD v1's 0.18215 was found the same way); the samples
    are drawn with ``seed``."""
    with drawing_from(NoiseSource(seed)):
        latents = gaussian_sample(vae.encode(images).latent_dist)
    return float(latents.mean()), float(1.0 / latents.std())
