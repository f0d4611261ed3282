"""``esd`` (Erased Stable Diffusion, Gandikota et al., ICCV 2023; rohitgandikota/erasing ``train-esd.py``): train the
UNet's prediction for a concept prompt c towards the frozen model's negatively guided one,
``ε*(x_t, ∅) - η [ε*(x_t, c) - ε*(x_t, ∅)]``, at an x_t the frozen model reaches in k of the DDIM steps on c.
Needs no images: the concept prompts are the forget split's labels. Text-to-image tasks only."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import nn

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.masks import ParameterMask
from genunlearn.errors import UserError
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method


@dataclass
class ESDConfig(LoopConfig):
    """Defaults: the CompVis reference ``train-esd.py`` (1000 iterations, Adam 1e-5, batch 1, start guidance 3, negative
    guidance η = 1, 50 DDIM steps). ``scope``: ``non-cross-attention`` (ESD-u, for objects and nudity) or
    ``cross-attention`` (ESD-x, for styles). x_t is sampled by the frozen copy and labelled with the timestep it was
    sampled to, as ``esd_sd.py`` does (CompVis samples with the model being trained and labels x_t about two DDIM
    steps noisier)."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    scope: str = "non-cross-attention"


def esd_target(unconditional: torch.Tensor, conditional: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """``ε*(∅) - η (ε*(c) - ε*(∅))`` (``train-esd.py``, η = 1). ``esd_sd.py`` writes ``ε*(c) - η' (ε*(c) - ε*(∅))``
    with η' = 2: the same target, since η' = η + 1."""
    return unconditional - negative_guidance * (conditional - unconditional)


def frozen_predictions(frozen: nn.Module, task, latents: torch.Tensor, timesteps: torch.Tensor,
                       concept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε*(x_t, ∅), ε*(x_t, c))`` of the frozen model in one batched pass; ``timesteps`` a scalar or ``[B]``."""
    null = torch.full_like(concept, task.null_prompt)
    both = task.predict_noise(frozen, latents.repeat(2, 1, 1, 1), timesteps.expand(len(concept)).repeat(2),
                              torch.cat([null, concept]))
    return both.chunk(2)


@torch.no_grad()
def partially_sampled(frozen: nn.Module, task, scheduler: DDIMScheduler, concept: torch.Tensor, k: int,
                      guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)``: k of ``scheduler``'s DDIM steps (η = 0) of the frozen model from N(0, I) on the prompts ``concept``
    ``[B]``, guided with ``guidance``; t ``[B]`` is the timestep x_t has reached."""
    config = frozen.config
    device = next(frozen.parameters()).device
    latents = torch.randn(len(concept), config.in_channels, config.sample_size, config.sample_size, device=device)
    for timestep in scheduler.timesteps[:k]:
        unconditional, conditional = frozen_predictions(frozen, task, latents, timestep.to(device), concept)
        latents = scheduler.step(unconditional + guidance * (conditional - unconditional), timestep, latents).prev_sample
    return latents, scheduler.timesteps[k].to(device).expand(len(concept))


def scope_mask(task, model: nn.Module, scope: str) -> ParameterMask:
    """The mask that lets ``scope``'s parameters (``task.trainable_parameters``) change and holds every other one."""
    chosen = {name for name, _ in task.trainable_parameters(model, scope)}
    names = [name for name, _ in model.named_parameters()]
    return ParameterMask(names, [torch.full_like(p, name in chosen, dtype=torch.bool) for name, p in model.named_parameters()])


@register_method("esd", "Erased Stable Diffusion: negative guidance from a frozen copy on the concept prompts "
                 "(text-to-image; scope ESD-u or ESD-x)", ESDConfig)
def run(task, split, cfg: ESDConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    if not hasattr(task, "prompt_embeddings"):
        raise UserError(f"esd erases prompts from text-to-image models; {task.name} is not one")
    frozen = copy.deepcopy(task.model).to(accelerator.device).eval().requires_grad_(False)
    mask = scope_mask(task, task.model, cfg.scope).to(accelerator.device)
    sampler = DDIMScheduler.from_config(task.scheduler.config)
    sampler.set_timesteps(cfg.ddim_steps)

    def esd_step(ctx: StepContext) -> dict[str, float]:
        concept = ctx.forget.next()[1].to(accelerator.device)
        k = int(torch.randint(0, cfg.ddim_steps, ()))
        noisy, timesteps = partially_sampled(frozen, task, sampler, concept, k, cfg.start_guidance)
        with torch.no_grad():
            target = esd_target(*frozen_predictions(frozen, task, noisy, timesteps, concept), cfg.negative_guidance)
        loss = (task.predict_noise(ctx.model, noisy, timesteps, concept).float() - target.float()).pow(2).mean()
        ctx.backward_step(loss, mask=mask)
        return {"esd_loss": loss.item()}

    return unlearn_with_loop(task, split, cfg, accelerator, esd_step, checkpoint_dir=checkpoint_dir, resume=resume,
                             uses_retain=False, info={"scope": cfg.scope, "trained_fraction": mask.kept_fraction()})
