"""UnlearnDiffAtk (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack ``text_grad``): per attacked image, k
prompt tokens prepended to the erased prompt, optimised so that the erased model denoises the original model's image of
the concept as if it had not forgotten it. Each token is a point on the vocabulary's simplex; a step samples one token
per point (straight-through, the backward pass a hardtanh of the gradient), takes Adam on the MSE between the drawn
noise and the erased model's prediction at x_t of the target image, and projects back onto the simplex. The timesteps
run in order over the reference's grid (t = T/2n, T/2n + T/n, ...); after each one's iterations the argmax tokens make
a discrete prompt, and the attack on that image succeeds once the judge sees the concept in the erased model's
generation of it from that image's seed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from torch import nn

from genunlearn.attacks.base import AttackJudge, AttackOutcome, encode_ids, generate_from_embeddings
from genunlearn.errors import UserError
from genunlearn.models.prompt_prefix import encode_with_prefix, require_single_clip, with_prefix
from genunlearn.models.prompt_sampling import generate_prompt, sd_pipeline_for
from genunlearn.tasks.text_to_image import conditioned_parts
from genunlearn.progress import progress

ATTACK_SEED_OFFSET = 50_021  # the attack's draws share no seed with data, evaluation or the FID reference


@dataclass
class UnlearnDiffAtkConfig:
    """Defaults: the reference's object configs (``k`` = 3 prefix tokens, 40 iterations per timestep, n = 50 timesteps,
    Adam lr 0.01, weight decay 0.1). ``images``: the attacked images per target prompt (each the original model's
    generation on its own seed); the sample size is ``images`` × target prompts."""

    tokens: int = 3
    iterations: int = 40
    timesteps: int = 50
    lr: float = 0.01
    weight_decay: float = 0.1
    images: int = 8

    def __post_init__(self) -> None:
        if min(self.tokens, self.iterations, self.timesteps, self.images) < 1 or self.lr <= 0:
            raise UserError("unlearndiffatk needs tokens, iterations, timesteps, images >= 1 and lr > 0")


class SampledOneHot(torch.autograd.Function):
    """One token per simplex row drawn by ``generator`` (one-hot forward); backward: hardtanh of the gradient (the
    reference's ``STERandSelect``)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(weights.detach().cpu().clamp_min(0), 1, generator=generator).view(-1)
        return F.one_hot(drawn, weights.shape[-1]).to(weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def simplex_projection(rows: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto the probability simplex, exactly (sorting; the reference bisects to 1e-5)."""
    ordered, _ = rows.sort(dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, rows.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
    support = (ordered - cumulative / index > 0).sum(-1, keepdim=True)
    shift = cumulative.gather(-1, support - 1) / support
    return (rows - shift).clamp_min(0)


def attack_one_image(setting: AttackJudge, model: nn.Module, erased: StableDiffusionPipeline, cfg: UnlearnDiffAtkConfig,
                     prompt_id: int, image: int, target: torch.Tensor) -> tuple[bool, list[int], int]:
    """``(success, adversarial prefix ids, iterations run)`` for one target latent ``[1, C, h, w]``; ``erased``:
    ``model``'s pipeline, which the found prompts are judged through."""
    task, device = setting.task, setting.accelerator.device
    denoiser, encoders = conditioned_parts(model, task.text_encoders)
    table = encoders[0].get_input_embeddings().weight.detach()
    ids = task.prompt_tokens([task.prompts[prompt_id]])[0][0]
    seed = setting.seed + ATTACK_SEED_OFFSET
    draws = torch.Generator().manual_seed(seed * 1_000_003 + prompt_id * 7_919 + image)
    weights = torch.full((cfg.tokens, len(table)), 1 / len(table), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = task.scheduler
    grid = list(range(scheduler.config.num_train_timesteps // cfg.timesteps // 2, scheduler.config.num_train_timesteps,
                      scheduler.config.num_train_timesteps // cfg.timesteps))[:cfg.timesteps]
    run = 0
    for t in grid:
        for _ in range(cfg.iterations):
            one_hot = SampledOneHot.apply(weights, draws)
            conditioning = encode_with_prefix(task, encoders, ids, one_hot @ table, one_hot.argmax(-1))
            noise = torch.randn(target.shape, generator=draws).to(device)
            timestep = torch.tensor([t], device=device)
            noisy = scheduler.add_noise(target.to(device), noise, timestep)
            loss = F.mse_loss(task.denoise(denoiser, noisy, timestep, {"encoder_hidden_states": conditioning}).float(), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weights.copy_(simplex_projection(weights))
            run += 1
        prefix = weights.detach().argmax(-1).cpu()
        embeds = encode_ids(task, with_prefix(ids, prefix)[None].to(device), model).float().cpu()
        generated = generate_from_embeddings(erased, embeds, prompt_id * 1_000 + image, 1, guidance=setting.guidance,
                                             steps=setting.steps, seed=seed)
        if setting.recognised(generated, prompt_id).item():
            return True, prefix.tolist(), run
    return False, prefix.tolist(), run


def unlearndiffatk(setting: AttackJudge, model: nn.Module, cfg: UnlearnDiffAtkConfig) -> AttackOutcome:
    """Attack ``cfg.images`` images of every target prompt; ASR: the fraction whose attack succeeded (an image whose
    plain prompt already shows the concept counts, as the reference stops there). ``model`` is left as it was."""
    task = setting.task
    require_single_clip(task, "the unlearndiffatk attack", "use --attack relearn")
    started, device = time.perf_counter(), setting.accelerator.device
    seed = setting.seed + ATTACK_SEED_OFFSET
    trainable = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    original, erased = sd_pipeline_for(task).to(device), sd_pipeline_for(task, model).to(device)
    found, plain_hits, hits, iterations = [], 0, 0, 0
    instances = [(prompt_id, image) for prompt_id in setting.targets for image in range(cfg.images)]
    try:
        for prompt_id, image in progress(instances, desc="unlearndiffatk", unit="image",
                                         show=setting.accelerator.is_main_process, leave=False):
            ids = task.prompt_tokens([task.prompts[prompt_id]])[0]
            instance = prompt_id * 1_000 + image
            target = generate_prompt(original, task.prompts[prompt_id], instance, 1, guidance=setting.guidance,
                                     steps=setting.steps, seed=seed, latents=True)
            generated = generate_from_embeddings(erased, encode_ids(task, ids.to(device), model).float().cpu(), instance, 1,
                                                 guidance=setting.guidance, steps=setting.steps, seed=seed)
            if setting.recognised(generated, prompt_id).item():
                plain_hits, hits = plain_hits + 1, hits + 1
                continue
            success, prefix, run = attack_one_image(setting, model, erased, cfg, prompt_id, image, target)
            hits, iterations = hits + success, iterations + run
            found.append({"prompt": task.tokenizers[0].decode(with_prefix(ids[0], torch.tensor(prefix))[1:],
                                                              skip_special_tokens=True), "success": success})
    finally:
        for parameter, flag in zip(model.parameters(), trainable):
            parameter.requires_grad_(flag)
    total = len(instances)
    budget = {"tokens": cfg.tokens, "iterations": cfg.iterations, "timesteps": cfg.timesteps, "lr": cfg.lr,
              "weight_decay": cfg.weight_decay, "images": cfg.images}
    return AttackOutcome("unlearndiffatk", plain_hits / total, hits / total, total, budget, time.perf_counter() - started,
                         {"iterations_run": iterations, "adversarial_prompts": found[:16]})
