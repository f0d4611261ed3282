"""``fast_ntk``: NTK scrubbing (Golatkar et al., ECCV 2020) restricted to a parameter-efficient scope (Fast-NTK,
Li et al., CVPRW 2024).

The model is linearised in the scope θ_p at its trained weights; with per-sample Jacobians J_i (K×P) and
residuals r_i = softmax(f(x_i)) − onehot(y_i), the ridge solutions on D and on D_r are
Δ = −(Σ JᵀJ + Nλ I)⁻¹ Σ Jᵀr, and the scope moves by s·(Δ_retain − Δ_all). Primal (P×P, streamed) when
P < N·K, dual (NK×NK) otherwise; float64 Cholesky solves.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.jacobians import NamedParameters, batchnorm_jacobians, functional_jacobians
from genunlearn.errors import UserError
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.models.peft import scope_initial_values, scope_parameters
from genunlearn.tasks.base import Task

FORMS = ("auto", "primal", "dual")
JACOBIAN_PATHS = ("auto", "batchnorm", "functional")


@dataclass
class FastNTKConfig:
    """Defaults: λ = 0.1 (the reference notebook's weight decay), scale 1 (``trapezium``: the notebook's
    correction), the BatchNorm scope with the head, residuals of the cross-entropy (``loss: mse``: f − (2y − 1),
    the notebook's squared-loss form). ``linearize_at``: ``trained`` (default; deviation: the reference linearises at
    the initialisation, where a PEFT head of zeros makes the BatchNorm Jacobian vanish) or ``init`` (the scope's
    PEFT start values; exact for a model linear in the scope under the squared loss). ``chunk_size``: samples per Jacobian chunk (memory ~
    chunk·K·P); ``jacobian``: ``batchnorm`` (K batched backward passes; BN/head scopes), ``functional``
    (vmap(jacrev)), ``auto`` picks the first that applies."""

    scope: str = "batchnorm+head"
    ridge: float = 0.1
    loss: str = "ce"
    linearize_at: str = "trained"
    scale: str | float = 1.0
    form: str = "auto"
    jacobian: str = "auto"
    chunk_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.form not in FORMS or self.jacobian not in JACOBIAN_PATHS:
            raise UserError(f"fast_ntk form must be one of {FORMS} and jacobian one of {JACOBIAN_PATHS}")
        if self.loss not in ("ce", "mse") or self.linearize_at not in ("trained", "init"):
            raise UserError("fast_ntk loss must be ce or mse and linearize_at trained or init")
        if self.ridge <= 0 or self.chunk_size < 1:
            raise UserError("fast_ntk needs ridge > 0 and chunk_size >= 1")
        if not (self.scale == "trapezium" or isinstance(self.scale, (int, float)) and self.scale > 0):
            raise UserError(f"fast_ntk scale must be a positive number or 'trapezium', got {self.scale!r}")


def scope_jacobians(model: nn.Module, params: NamedParameters, images: torch.Tensor, path: str,
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J [B, K, P], logits [B, K])`` by the chosen path (``auto``: the BatchNorm path when it covers ``params``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if path in ("auto", "batchnorm"):
        try:
            return batchnorm_jacobians(model, params, images, head=head)
        except UserError:
            if path == "batchnorm":
                raise
    return functional_jacobians(model, params, images, chunk_size=chunk_size)


def residuals(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """``[B, K]`` gradient of the loss with respect to the logits: ``softmax(f) − onehot(y)`` (ce) or
    ``f − (2·onehot(y) − 1)`` (mse, the reference's ±1 targets)."""
    onehot = nn.functional.one_hot(labels, logits.shape[1]).double()
    return torch.softmax(logits.double(), dim=1) - onehot if loss == "ce" else logits.double() - (2 * onehot - 1)


def _my_chunks(dataset: Dataset, chunk_size: int, accelerator: Accelerator) -> DataLoader:
    """Chunk b of the dataset's consecutive runs goes to process b mod N (uneven counts allowed)."""
    count = math.ceil(len(dataset) / chunk_size)
    mine = [list(range(b * chunk_size, min(len(dataset), (b + 1) * chunk_size)))
            for b in range(accelerator.process_index, count, accelerator.num_processes)]
    return DataLoader(dataset, batch_sampler=mine)


def kernel_sums(model: nn.Module, params: NamedParameters, dataset: Dataset, cfg: FastNTKConfig,
                accelerator: Accelerator, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal sums ``(Σ JᵀJ [P, P], Σ Jᵀr [P])`` in float64 over ``dataset``, streamed chunk by chunk and reduced
    across processes; the Jacobians are never all held."""
    size = sum(param.numel() for _, param in params)
    gram = torch.zeros(size, size, dtype=torch.float64, device=accelerator.device)
    pull = torch.zeros(size, dtype=torch.float64, device=accelerator.device)
    for images, labels in tqdm(_my_chunks(dataset, cfg.chunk_size, accelerator), desc=desc, disable=not accelerator.is_local_main_process):
        jacobian, logits = scope_jacobians(model, params, images.to(accelerator.device), cfg.jacobian, cfg.chunk_size)
        rows = jacobian.reshape(-1, size)
        gram += (rows.T @ rows).double()  # float32 chunks of a float32 model, summed in float64
        pull += rows.double().T @ residuals(logits, labels.to(accelerator.device), cfg.loss).reshape(-1)
    if accelerator.num_processes > 1:
        gram, pull = accelerator.reduce([gram, pull], reduction="sum")
    return gram, pull


def stacked_jacobians(model: nn.Module, params: NamedParameters, dataset: Dataset, cfg: FastNTKConfig,
                      accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual form inputs ``(J [N·K, P], r [N·K])`` in float64 for all of ``dataset`` (every process computes
    all of it: the dual form is for small N)."""
    rows, residual = [], []
    for images, labels in DataLoader(dataset, batch_size=cfg.chunk_size):
        jacobian, logits = scope_jacobians(model, params, images.to(accelerator.device), cfg.jacobian, cfg.chunk_size)
        rows.append(jacobian.reshape(-1, jacobian.shape[-1]).double())
        residual.append(residuals(logits, labels.to(accelerator.device), cfg.loss).reshape(-1))
    return torch.cat(rows), torch.cat(residual)


def ridge_primal(gram: torch.Tensor, pull: torch.Tensor, count: int, ridge: float) -> torch.Tensor:
    """``−(G + Nλ I)⁻¹ g`` by a float64 Cholesky solve."""
    system = gram.double() + count * ridge * torch.eye(len(gram), dtype=torch.float64, device=gram.device)
    factor = torch.linalg.cholesky(system)
    return -torch.cholesky_solve(pull.double().unsqueeze(1), factor).squeeze(1)


def ridge_dual(rows: torch.Tensor, residual: torch.Tensor, count: int, ridge: float) -> torch.Tensor:
    """``−Jᵀ(J Jᵀ + Nλ I)⁻¹ r``, equal to the primal solution, through an NK×NK float64 Cholesky solve."""
    kernel = rows @ rows.T + count * ridge * torch.eye(len(rows), dtype=torch.float64, device=rows.device)
    factor = torch.linalg.cholesky(kernel)
    return -(rows.T @ torch.cholesky_solve(residual.unsqueeze(1), factor)).squeeze(1)


def trapezium_scale(direction: torch.Tensor, offset_from_init: torch.Tensor, retain_step: torch.Tensor) -> float:
    """The reference notebook's correction of the scrub length: with the linearisation's error
    e = (θ − θ_init) − Δ_retain and the unit inner product c of the direction and e, the predicted length is
    |δ| + 2|e|·sin(arccos c − π/2) when c < 0 and |δ| + 2|e|·c otherwise; the scale is that over |δ|."""
    error = offset_from_init - retain_step
    norm_direction, norm_error = direction.norm(), error.norm()
    if norm_error == 0 or norm_direction == 0:
        return 1.0
    inner = float(direction @ error / (norm_direction * norm_error))
    inner = max(-1.0, min(1.0, inner))
    angle = math.acos(inner) - math.pi / 2 if inner < 0 else math.acos(inner)
    bend = math.sin(angle) if inner < 0 else math.cos(angle)
    return float((norm_direction + 2 * bend * norm_error) / norm_direction)


def flat(params: NamedParameters) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1).double() for _, param in params])


def scrub_direction(model: nn.Module, params: NamedParameters, split: ForgetSplit, cfg: FastNTKConfig,
                    accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(δ = Δ_retain − Δ_all, Δ_retain, facts)`` in float64, in the primal or dual form."""
    size = sum(param.numel() for _, param in params)
    n_retain, n_forget = len(split.retain), len(split.forget)
    classes = model.get_classifier().out_features if hasattr(model, "get_classifier") else None
    outputs = classes or 1
    form = cfg.form if cfg.form != "auto" else ("primal" if size < (n_retain + n_forget) * outputs else "dual")
    if form == "primal":
        gram_r, pull_r = kernel_sums(model, params, split.retain, cfg, accelerator, "NTK sums on D_r")
        gram_f, pull_f = kernel_sums(model, params, split.forget, cfg, accelerator, "NTK sums on D_f")
        retain_step = ridge_primal(gram_r, pull_r, n_retain, cfg.ridge)
        all_step = ridge_primal(gram_r.add_(gram_f), pull_r + pull_f, n_retain + n_forget, cfg.ridge)
    else:
        rows_r, residual_r = stacked_jacobians(model, params, split.retain, cfg, accelerator)
        rows_f, residual_f = stacked_jacobians(model, params, split.forget, cfg, accelerator)
        retain_step = ridge_dual(rows_r, residual_r, n_retain, cfg.ridge)
        all_step = ridge_dual(torch.cat([rows_r, rows_f]), torch.cat([residual_r, residual_f]), n_retain + n_forget, cfg.ridge)
    return retain_step - all_step, retain_step, {"form": form, "scope_parameters": size}


@register_method("fast_ntk", "Fast-NTK: NTK scrubbing of a parameter-efficient scope (BatchNorm affine / prompts, + head)", FastNTKConfig)
def fast_ntk(task: Task, split: ForgetSplit, cfg: FastNTKConfig, accelerator: Accelerator, *, checkpoint_dir=None,
             resume: bool = False) -> UnlearnResult:
    started = time.perf_counter()
    model = copy.deepcopy(task.model).to(accelerator.device).eval()
    params = scope_parameters(model, cfg.scope)
    initial = scope_initial_values(model, cfg.scope)
    linearized = model
    if cfg.linearize_at == "init":
        linearized = copy.deepcopy(model)
        with torch.no_grad():
            for (_, param), value in zip(scope_parameters(linearized, cfg.scope), initial):
                param.copy_(value)
    direction, retain_step, info = scrub_direction(linearized, scope_parameters(linearized, cfg.scope), split, cfg, accelerator)
    if cfg.scale == "trapezium":
        start = torch.cat([value.reshape(-1).double() for value in initial]).to(direction.device)
        scale = trapezium_scale(direction, flat(params).to(direction.device) - start, retain_step)
    else:
        scale = float(cfg.scale)
    with torch.no_grad():
        offset = 0
        for _, param in params:
            param += (scale * direction[offset : offset + param.numel()]).view_as(param).to(param.dtype)
            offset += param.numel()
    info.update(scale=scale, direction_norm=float(direction.norm()), scope=cfg.scope)
    return UnlearnResult(model, [], 0, time.perf_counter() - started, info)
