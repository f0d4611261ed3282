"""``advunlearn`` (AdvUnlearn, Zhang et al., NeurIPS 2024; OPTML-Group/AdvUnlearn ``train-scripts/AdvUnlearn.py``):
ESD trained against an adversarial prompt. After ``warmup`` iterations each one first attacks the model being trained:
k word embeddings before the concept prompt, moved by Adam so that its prediction under them matches the frozen model's
on the concept (``attack_steps`` steps, x_t sampled as ESD's); then ESD's step on that prompt; then ``retain_steps``
utility steps matching the frozen model on a batch of retain prompts (the reference's ``iter``). The default trains
the text encoder (``text_encoder_full``: its transformer layers and final layer norm), as the released model does; the
result then carries its own text encoder (``TextConditioned``). ``train: unet`` trains ESD's UNet scope instead."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.errors import UserError
from genunlearn.methods.advunlearn_parts import AdversarialTraining, accumulated_adam, retain_ids, trained_parameters
from genunlearn.methods.common import frozen_copy, require_text_to_image, unlearn_with_loop
from genunlearn.methods.esd import esd_target, null_and_concept_predictions, partially_sampled, sampling_schedule
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.models.prompt_prefix import encode_with_prefix, require_single_clip
from genunlearn.tasks.text_to_image import TextConditioned



@dataclass
class AdvUnlearnConfig(LoopConfig):
    """Defaults: ``AdvUnlearn.py``'s (1000 iterations, Adam 1e-5, ESD's start guidance 3, η = 1 and 50 DDIM steps;
    warm-up 200; attack: 1 prefix token, 30 Adam steps at 1e-3, each round starting from the latest prompt; retain:
    batches of 5 prompts drawn without replacement, 1 step after each iteration). ``train``: ``text-encoder`` or
    ``unet`` (``scope``: ESD's ``non-cross-attention``, noxattn, or ``cross-attention``, xattn)."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    train: str = "text-encoder"
    scope: str = "non-cross-attention"
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    warmup: int = 200
    attack_steps: int = 30
    attack_lr: float = 1e-3
    attack_tokens: int = 1
    attack_init: str = "latest"
    retain_batch: int = 5
    retain_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train not in ("text-encoder", "unet"):
            raise UserError(f"advunlearn train must be text-encoder or unet, got {self.train!r}")
        if self.attack_init not in ("latest", "random"):
            raise UserError(f"advunlearn attack_init must be latest or random, got {self.attack_init!r}")
        if self.batch_size != 1:
            raise UserError("advunlearn attacks one concept prompt per iteration: batch_size must be 1, as the reference's")
        if min(self.attack_tokens, self.retain_batch) < 1 or min(self.warmup, self.attack_steps, self.retain_steps) < 0:
            raise UserError("advunlearn needs attack_tokens, retain_batch >= 1 and warmup, attack_steps, retain_steps >= 0")


@register_method("advunlearn", "AdvUnlearn: ESD against adversarial prefix prompts found during training, with retain "
                 "steps (text-to-image; the text encoder, or the UNet)", AdvUnlearnConfig, kinds=("text-to-image",))
def run(task, split, cfg: AdvUnlearnConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    require_text_to_image(task, "advunlearn")
    require_single_clip(task, "advunlearn", "use esd, salun or sfron")
    retained = list(task.rl_prompts or [])
    if cfg.retain_steps and not retained:
        raise UserError("advunlearn's retain steps need retain prompts (--retain-prompt), or set retain_steps=0")
    device, frozen = accelerator.device, frozen_copy(task, accelerator, cfg.offload_frozen)
    model = AdversarialTraining(copy.deepcopy(task.model), copy.deepcopy(task.text_encoder), cfg.attack_tokens).to(device)
    model.requires_grad_(False)
    for parameter in trained_parameters(task, model, cfg):
        parameter.requires_grad_(True)
    vocabulary = model.text_encoders[0].get_input_embeddings().weight.detach()
    sampler_timesteps = task.sampler(cfg.ddim_steps).timesteps

    def sampled(ctx: StepContext, prompts: torch.Tensor, denoiser) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, timesteps)`` as ESD's (compvis labels), sampled by the trained denoiser on the original encoding."""
        steps, label = sampling_schedule(ctx.noise, cfg.ddim_steps, task.scheduler.config.num_train_timesteps, "compvis",
                                         sampler_timesteps, task.timestep_of_index)
        noisy = partially_sampled(denoiser, task, cfg.ddim_steps, prompts, steps, cfg.start_guidance)
        return noisy, label.to(device).expand(len(prompts))

    def attack(ctx: StepContext, trained: AdversarialTraining, concept: torch.Tensor, ids: torch.Tensor) -> float:
        """Update ``trained.adversarial``: the prefix before the concept prompt's tokens ``ids`` ``[L]`` that most
        brings the concept back (``soft_prompt_attack``)."""
        if cfg.attack_init == "random" or not bool(trained.attacked):
            start = vocabulary[torch.tensor([ctx.noise.shared_randint(len(vocabulary)) for _ in range(cfg.attack_tokens)])]
        else:
            start = trained.adversarial
        trained.eval()

        def loss_of(prefix: torch.Tensor) -> torch.Tensor:  # the trained model under the prefix against ε*(x_t, c)
            noisy, timesteps = sampled(ctx, concept, trained.denoiser)
            with torch.no_grad():
                target = task.predict_noise(frozen, noisy, timesteps, concept)
            conditioning = encode_with_prefix(task, trained.text_encoders, ids, prefix)
            inputs = task.model_inputs({"encoder_hidden_states": conditioning}, device)
            return (task.denoise(trained.denoiser, noisy, timesteps, inputs).float() - target.float()).pow(2).mean()

        with accelerator.autocast():
            prefix, loss = accumulated_adam(start, loss_of, cfg.attack_steps, cfg.attack_lr)
        trained.adversarial.copy_(prefix)
        if accelerator.num_processes > 1:  # every process trains on the main process's prompt (DDP's buffers would too)
            torch.distributed.broadcast(trained.adversarial, src=0)
        trained.attacked.fill_(True)
        return loss

    def step(ctx: StepContext) -> dict[str, float]:
        trained = accelerator.unwrap_model(ctx.model)
        concept = ctx.forget.next()[1].to(device)
        ids = task.prompt_tokens([task.prompts[int(concept[0])]])[0][0]
        figures = {"attack_loss": attack(ctx, trained, concept, ids)} if ctx.step >= cfg.warmup else {}
        trained.denoiser.train(cfg.train == "unet")
        trained.text_encoders.train(cfg.train == "text-encoder")
        with accelerator.autocast(), torch.no_grad():
            noisy, timesteps = sampled(ctx, concept, trained.denoiser)
            target = esd_target(*null_and_concept_predictions(frozen, task, noisy, timesteps, concept), cfg.negative_guidance)
        if ctx.step >= cfg.warmup:
            adversarial = trained.adversarial
            predict = lambda denoiser, encoders, x, t, tokens, labels: task.denoise(denoiser, x, t, task.model_inputs(
                {"encoder_hidden_states": encode_with_prefix(task, encoders, ids, adversarial)}, device))
            prediction = ctx.model(noisy, timesteps, [], concept, predict)
        else:
            prediction = task.predict_noise(ctx.model, noisy, timesteps, concept)
        loss = (prediction.float() - target.float()).pow(2).mean()
        ctx.backward_step(loss)
        for r in range(cfg.retain_steps):
            prompts = retain_ids(retained, cfg.retain_batch, ctx.step * cfg.retain_steps + r, cfg.seed).to(device)
            with accelerator.autocast(), torch.no_grad():
                noisy, timesteps = sampled(ctx, prompts, trained.denoiser)
                target = task.predict_noise(frozen, noisy, timesteps, prompts)
            retain_loss = (task.predict_noise(ctx.model, noisy, timesteps, prompts).float() - target.float()).pow(2).mean()
            ctx.backward_step(retain_loss)
            figures["retain_loss"] = retain_loss.item()
        return {"esd_loss": loss.item(), **figures}

    result = unlearn_with_loop(task, split, cfg, accelerator, step, checkpoint_dir=checkpoint_dir, resume=resume,
                               uses_retain=False, model=model, info={"trained": cfg.train, "warmup": cfg.warmup,
                                                                     "attack_steps": cfg.attack_steps})
    trained = result.model
    final = TextConditioned(trained.denoiser, list(trained.text_encoders)) if cfg.train == "text-encoder" else trained.denoiser
    return dataclasses.replace(result, model=final.requires_grad_(True))
