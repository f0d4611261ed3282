"""AdvUnlearn's parts (``methods.advunlearn``): the module it trains, which parameters train, the retain batches and
the attack's optimiser."""

from __future__ import annotations

from collections.abc import Callable

import torch

from genunlearn.errors import UserError
from genunlearn.noise import derive_seed
from genunlearn.tasks.text_to_image import TextConditioned

TEXT_ENCODER_PARTS = ("encoder.", "final_layer_norm.")  # text_encoder_full, component all (transformers 5 drops text_model.)


class AdversarialTraining(TextConditioned):
    """The denoiser and text encoder being trained (only ``train``'s part requires gradients) with the latest
    adversarial prefix ``[k, D]`` as buffers, so a checkpoint resumes the attack where it stood."""

    def __init__(self, denoiser: torch.nn.Module, encoder: torch.nn.Module, tokens: int) -> None:
        super().__init__(denoiser, [encoder])
        self.register_buffer("adversarial", torch.zeros(tokens, encoder.get_input_embeddings().weight.shape[1]))
        self.register_buffer("attacked", torch.zeros((), dtype=torch.bool))


def trained_parameters(task, model: AdversarialTraining, cfg) -> list[torch.nn.Parameter]:
    """The parameters an ``AdvUnlearnConfig`` ``cfg`` trains: the UNet's ``scope`` (``train: unet``), else the text
    encoder's transformer layers and final layer norm (its embeddings stay)."""
    if cfg.train == "unet":
        return [p for _, p in task.trainable_parameters(model.denoiser, cfg.scope)]
    chosen = [p for name, p in model.text_encoders[0].named_parameters()
              if name.removeprefix("text_model.").startswith(TEXT_ENCODER_PARTS)]
    if not chosen:
        raise UserError("advunlearn train=text-encoder needs a CLIP text encoder (encoder layers, final_layer_norm)")
    return chosen


def retain_ids(prompts: list[int], batch: int, index: int, seed: int) -> torch.Tensor:
    """The ``index``-th retain batch: ``batch`` prompts drawn without replacement, all drawn again once fewer than
    ``batch`` are left unseen (the reference's ``PromptDataset``), each round's order seeded by (seed, round)."""
    batch = min(batch, len(prompts))
    round_, position = divmod(index, len(prompts) // batch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(seed, "advunlearn retain", round_)))
    return torch.tensor([prompts[i] for i in order[position * batch:(position + 1) * batch]])


def accumulated_adam(start: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor], steps: int,
                     lr: float) -> tuple[torch.Tensor, float]:
    """``(the prompt, its loss)`` after ``steps`` Adam steps at ``lr`` on ``loss_of`` from ``start``, as the reference's
    attack (``soft_prompt_attack``) leaves them: each step on the sum of every gradient so far (it never zeroes its
    prompt's gradient), and the prompt returned the one the last loss was computed at (it builds the prompt before
    stepping, so its last step is not used)."""
    prefix = start.detach().clone().requires_grad_(True)
    optimizer, used, loss = torch.optim.Adam([prefix], lr=lr), start.detach().clone(), torch.zeros(())
    for _ in range(steps):
        used = prefix.detach().clone()
        loss = loss_of(prefix)
        grad, = torch.autograd.grad(loss, prefix)
        prefix.grad = grad if prefix.grad is None else prefix.grad + grad
        optimizer.step()
    return used, float(loss.detach())
