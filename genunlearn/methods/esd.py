"""``esd`` (Erased Stable Diffusion, Gandikota et al., ICCV 2023; rohitgandikota/erasing ``train-esd.py``): train the
UNet's prediction for a concept prompt c towards the frozen model's negatively guided one,
``ε*(x_t, ∅) - η [ε*(x_t, c) - ε*(x_t, ∅)]``, at an x_t reached in part of the DDIM steps on c (``ESDConfig``).
Needs no images: the concept prompts are the forget split's labels. Text-to-image tasks only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.masks import ParameterMask
from genunlearn.errors import UserError
from genunlearn.methods.common import frozen_copy, require_text_to_image, unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.noise import NoiseSource, current_noise


@dataclass
class ESDConfig(LoopConfig):
    """Defaults: the paper's CompVis code ``train-esd.py`` (1000 iterations, Adam 1e-5, batch 1, start guidance 3,
    negative guidance η = 1, 50 DDIM steps) in every part of the computation: x_t is sampled by the model being trained
    (``sample_with: trained``), labelled the CompVis way (``timestep_labels: compvis``), and ESD-u trains its
    ``noxattn`` set (``scope: non-cross-attention``). The authors' later diffusers script ``esd_sd.py`` samples x_t
    with the frozen copy (``sample_with: frozen``), labels it with the timestep it reached (``timestep_labels:
    reached``) and trains the Linear and Conv2d layers outside cross-attention (``scope:
    linear-non-cross-attention``). ``scope: cross-attention`` is ESD-x in both."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    scope: str = "non-cross-attention"
    sample_with: str = "trained"
    timestep_labels: str = "compvis"
    hold_masked: bool = True  # the references optimise the scope's parameters only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_with not in ("trained", "frozen"):
            raise UserError(f"unknown sample_with {self.sample_with!r}; use trained (train-esd.py) or frozen (esd_sd.py)")
        if self.timestep_labels not in ("compvis", "reached"):
            raise UserError(f"unknown timestep_labels {self.timestep_labels!r}; use compvis (train-esd.py) or reached "
                            "(esd_sd.py)")
        if self.ddim_steps < 2:
            raise UserError(f"ddim_steps must be at least 2, got {self.ddim_steps}")


def esd_target(unconditional: torch.Tensor, conditional: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """``ε*(∅) - η (ε*(c) - ε*(∅))`` (``train-esd.py``, η = 1). ``esd_sd.py`` writes ``ε*(c) - η' (ε*(c) - ε*(∅))``
    with η' = 2: the same target, since η' = η + 1."""
    return unconditional - negative_guidance * (conditional - unconditional)


def null_and_concept_predictions(model: nn.Module, task, latents: torch.Tensor, timesteps: torch.Tensor,
                                 concept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε(x_t, ∅), ε(x_t, c))`` of ``model`` in one batched pass; ``timesteps`` a scalar or ``[B]``."""
    null = torch.full_like(concept, task.null_prompt)
    both = task.predict_noise(model, latents.repeat(2, 1, 1, 1), timesteps.expand(len(concept)).repeat(2),
                              torch.cat([null, concept]))
    return both.chunk(2)


def sampling_schedule(noise: NoiseSource, ddim_steps: int, train_timesteps: int, labels: str,
                      sampler_timesteps: torch.Tensor, timestep_of_index=torch.tensor) -> tuple[int, torch.Tensor]:
    """``(sampler steps to run from pure noise, the timestep x_t is labelled with)`` for one iteration; a compvis
    label is a training-schedule index, made the denoiser's timestep by ``timestep_of_index`` (a task's).

    ``reached`` (``esd_sd.py``): k uniform in [0, S), k steps, labelled ``sampler_timesteps[k]``, the timestep x_t has
    reached. ``compvis`` (``train-esd.py`` with its ``ddim.py``): t_enc uniform in [0, S); the sampler stops after
    min(S, S + 1 - t_enc) steps and the label is uniform in [round(t_enc T/S), round((t_enc + 1) T/S)): about two DDIM
    steps noisier than x_t is (t_enc 0 and 1 run every step), and pure noise never trains."""
    if labels == "reached":
        k = noise.shared_randint(ddim_steps)
        return k, sampler_timesteps[k]
    t_enc = noise.shared_randint(ddim_steps)
    low, high = round(t_enc * train_timesteps / ddim_steps), round((t_enc + 1) * train_timesteps / ddim_steps)
    return min(ddim_steps, ddim_steps + 1 - t_enc), timestep_of_index(low + noise.shared_randint(high - low))


@torch.no_grad()
def partially_sampled(sampler_model: nn.Module, task, sampler_steps: int, concept: torch.Tensor, steps: int,
                      guidance: float) -> torch.Tensor:
    """x_t ``[B, C, h, w]``: the first ``steps`` of ``task.sampler(sampler_steps)``'s steps (DDIM η = 0, or a flow
    task's Euler steps; a fresh scheduler, as Euler's counts its steps) of ``sampler_model`` from N(0, I) (drawn from
    ``current_noise``) on the prompts ``concept`` ``[B]``, guided with ``guidance``."""
    scheduler = task.sampler(sampler_steps)
    config = task.model.config
    device = concept.device
    latents = current_noise().randn((len(concept), config.in_channels, config.sample_size, config.sample_size), device)
    for timestep in scheduler.timesteps[:steps]:
        unconditional, conditional = null_and_concept_predictions(sampler_model, task, latents, timestep.to(device), concept)
        latents = scheduler.step(unconditional + guidance * (conditional - unconditional), timestep, latents).prev_sample
    return latents


def scope_mask(task, model: nn.Module, scope: str) -> ParameterMask:
    """The mask that lets ``scope``'s parameters (``task.trainable_parameters``) change and holds every other one."""
    chosen = {name for name, _ in task.trainable_parameters(model, scope)}
    names = [name for name, _ in model.named_parameters()]
    return ParameterMask(names, [torch.full_like(p, name in chosen, dtype=torch.bool) for name, p in model.named_parameters()])


@register_method("esd", "Erased Stable Diffusion: negative guidance from a frozen copy on the concept prompts "
                 "(text-to-image; scope ESD-u or ESD-x)", ESDConfig, kinds=("text-to-image",), lora=True)
def run(task, split, cfg: ESDConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    require_text_to_image(task, "esd")
    frozen = frozen_copy(task, accelerator, cfg.offload_frozen)
    # with LoRA the factors sit in the scope's layers alone: no weight to hold
    mask = None if cfg.lora_rank else scope_mask(task, task.model, cfg.scope).to(accelerator.device)
    sampler_timesteps = task.sampler(cfg.ddim_steps).timesteps

    def esd_step(ctx: StepContext) -> dict[str, float]:
        concept = ctx.forget.next()[1].to(accelerator.device)
        steps, label = sampling_schedule(ctx.noise, cfg.ddim_steps, task.scheduler.config.num_train_timesteps,
                                         cfg.timestep_labels, sampler_timesteps, task.timestep_of_index)
        timesteps = label.to(accelerator.device).expand(len(concept))
        with accelerator.autocast():
            sampler_model = accelerator.unwrap_model(ctx.model) if cfg.sample_with == "trained" else frozen
            noisy = partially_sampled(sampler_model, task, cfg.ddim_steps, concept, steps, cfg.start_guidance)
            with torch.no_grad():
                target = esd_target(*null_and_concept_predictions(frozen, task, noisy, timesteps, concept), cfg.negative_guidance)
        loss = (task.predict_noise(ctx.model, noisy, timesteps, concept).float() - target.float()).pow(2).mean()
        ctx.backward_step(loss, mask=mask)
        return {"esd_loss": loss.item()}

    return unlearn_with_loop(task, split, cfg, accelerator, esd_step, checkpoint_dir=checkpoint_dir, resume=resume,
                             uses_retain=False, info={"scope": cfg.scope,
                                                      **({"trained_fraction": mask.kept_fraction()} if mask else {})})
