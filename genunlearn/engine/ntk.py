"""NTK linear algebra over a parameter scope: Jacobians, residuals, kernel sums, ridge solves, scrub and Fisher noise."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.jacobians import NamedParameters, batchnorm_jacobians, functional_jacobians
from genunlearn.errors import UserError
from genunlearn.progress import progress

GRAM_BLOCK = 1024  # columns of the P×P sum updated per product


def scope_jacobians(model: nn.Module, params: NamedParameters, images: torch.Tensor, path: str,
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J [B, K, P], logits [B, K])`` by the chosen path (``auto``: the BatchNorm path when it covers ``params``).
    Images go channels-last (with the model made so by ``fast_ntk``: the K backward passes of a CIFAR resnet18 run
    ~27% faster on the CPU)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
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


def kernel_sums(model: nn.Module, params: NamedParameters, dataset: Dataset, accelerator: Accelerator, desc: str,
                onto: tuple[torch.Tensor, torch.Tensor] | None = None, *, chunk_size: int, path: str,
                loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal sums ``(Σ JᵀJ [P, P], Σ Jᵀr [P])`` in float64 over ``dataset``, streamed chunk by chunk and reduced
    across processes; the Jacobians are never all held (a chunk of 32 CIFAR images through resnet18 holds ~0.7 GB).
    ``onto``: reduced sums to add these to, in place (one P×P buffer in all). ``chunk_size``: samples per Jacobian
    chunk; ``path``: the ``scope_jacobians`` path; ``loss``: the ``residuals`` loss (ce or mse)."""
    size = sum(param.numel() for _, param in params)
    if onto is None:
        gram = torch.zeros(size, size, dtype=torch.float64, device=accelerator.device)
        pull = torch.zeros(size, dtype=torch.float64, device=accelerator.device)
    else:
        gram, pull = onto
        if not accelerator.is_main_process:  # the totals so far stay on one process only, so the reduction adds them once
            gram.zero_()
            pull.zero_()
    for images, labels in progress(_my_chunks(dataset, chunk_size, accelerator), desc=desc, show=accelerator.is_local_main_process):
        jacobian, logits = scope_jacobians(model, params, images.to(accelerator.device), path, chunk_size)
        rows = jacobian.reshape(-1, size)
        add_upper_gram(gram, rows)
        pull += rows.double().T @ residuals(logits, labels.to(accelerator.device), loss).reshape(-1)
    if accelerator.num_processes > 1:
        gram, pull = accelerator.reduce([gram, pull], reduction="sum")
    mirror_upper(gram)
    return gram, pull


def add_upper_gram(gram: torch.Tensor, rows: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Add ``rowsᵀ rows`` to the upper triangle of ``gram [P, P]`` (float64) by column blocks: half the products
    of the full square, and a float32 temporary of P×block instead of P×P. The lower triangle is left stale."""
    for start in range(0, gram.shape[1], block):
        stop = min(start + block, gram.shape[1])
        gram[:stop, start:stop].add_(rows[:, :stop].T @ rows[:, start:stop])  # float32 products, float64 sums


def mirror_upper(gram: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Copy the upper triangle of ``gram`` onto its lower one, block by block (in place)."""
    for start in range(0, gram.shape[1], block):
        stop = min(start + block, gram.shape[1])
        gram[stop:, start:stop] = gram[start:stop, stop:].T


def stacked_jacobians(model: nn.Module, params: NamedParameters, dataset: Dataset, accelerator: Accelerator, *,
                      chunk_size: int, path: str, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual form inputs ``(J [N·K, P], r [N·K])`` in float64 for all of ``dataset`` (every process computes
    all of it: the dual form is for small N); ``chunk_size``, ``path``, ``loss`` as in ``kernel_sums``."""
    rows, residual = [], []
    for images, labels in DataLoader(dataset, batch_size=chunk_size):
        jacobian, logits = scope_jacobians(model, params, images.to(accelerator.device), path, chunk_size)
        rows.append(jacobian.reshape(-1, jacobian.shape[-1]).double())
        residual.append(residuals(logits, labels.to(accelerator.device), loss).reshape(-1))
    return torch.cat(rows), torch.cat(residual)


def ridge_primal(gram: torch.Tensor, pull: torch.Tensor, count: int, ridge: float, offset: torch.Tensor) -> torch.Tensor:
    """``Δ = −(G + Nλ I)⁻¹ (g + Nλ o)`` by a float64 Cholesky solve: the step from the linearisation point that
    minimises ½Σ‖r + JΔ‖² + (Nλ/2)‖Δ + o‖², ``o [P]`` the point's offset from the ridge's centre. ``gram`` gets
    Nλ on its diagonal during the solve and is restored after (no P×P copy but the factor)."""
    gram.diagonal().add_(count * ridge)
    try:
        factor = torch.linalg.cholesky(gram)
    finally:
        gram.diagonal().sub_(count * ridge)
    return -torch.cholesky_solve((pull.double() + count * ridge * offset).unsqueeze(1), factor).squeeze(1)


def ridge_dual(rows: torch.Tensor, residual: torch.Tensor, count: int, ridge: float, offset: torch.Tensor) -> torch.Tensor:
    """The same Δ as ``ridge_primal`` through an NK×NK float64 Cholesky solve: with u = Δ + o,
    ``u = −Jᵀ(J Jᵀ + Nλ I)⁻¹ (r − J o)``."""
    kernel = rows @ rows.T + count * ridge * torch.eye(len(rows), dtype=torch.float64, device=rows.device)
    factor = torch.linalg.cholesky(kernel)
    shifted = (residual - rows @ offset).unsqueeze(1)
    return -(rows.T @ torch.cholesky_solve(shifted, factor)).squeeze(1) - offset


def trapezium_scale(direction: torch.Tensor, error: torch.Tensor) -> float:
    """The reference notebook's correction of the scrub length: with the linearisation's error ``e`` (the trained
    weights minus the fine-tuning start minus the retain ridge step, θ_trained − θ_init − w_retain in its "Scrub
    using NTK" cell) and the unit inner product
    c of the direction and e, the predicted length is |δ| + 2|e|·sin(arccos c − π/2) when c < 0 and
    |δ| + 2|e|·c otherwise; the scale is that over |δ|."""
    direction, error = direction.detach(), error.detach()  # a length, not part of any graph
    norm_direction, norm_error = direction.norm(), error.norm()
    if norm_error == 0 or norm_direction == 0:
        return 1.0
    inner = float(direction @ error / (norm_direction * norm_error))
    inner = max(-1.0, min(1.0, inner))
    angle = math.acos(inner) - math.pi / 2 if inner < 0 else math.acos(inner)
    bend = math.sin(angle) if inner < 0 else math.cos(angle)
    return float((norm_direction + 2 * bend * norm_error) / norm_direction)


def flat(params: NamedParameters) -> torch.Tensor:
    """``[P]`` the scope's values, detached, flattened and concatenated in float64."""
    return torch.cat([param.detach().reshape(-1).double() for _, param in params])


def scrub_direction(model: nn.Module, params: NamedParameters, offset: torch.Tensor, split: ForgetSplit,
                    accelerator: Accelerator, *, form: str, ridge: float, chunk_size: int, path: str,
                    loss: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(δ = Δ_retain − Δ_all, Δ_retain, facts)`` in float64, in the primal or dual form (``auto``: primal when
    P < N·K); ``offset [P]``: the linearisation point minus the ridge's centre (zeros: centred on the point, as the
    reference); ``ridge``: λ;
    ``chunk_size``, ``path``, ``loss`` as in ``kernel_sums``."""
    size = sum(param.numel() for _, param in params)
    n_retain, n_forget = len(split.retain), len(split.forget)
    classes = model.get_classifier().out_features if hasattr(model, "get_classifier") else None
    outputs = classes or 1
    form = form if form != "auto" else ("primal" if size < (n_retain + n_forget) * outputs else "dual")
    if form == "primal":
        gram, pull = kernel_sums(model, params, split.retain, accelerator, "NTK sums on D_r", chunk_size=chunk_size,
                                 path=path, loss=loss)
        retain_step = ridge_primal(gram, pull, n_retain, ridge, offset)
        gram, pull = kernel_sums(model, params, split.forget, accelerator, "NTK sums on D_f", onto=(gram, pull),
                                 chunk_size=chunk_size, path=path, loss=loss)
        all_step = ridge_primal(gram, pull, n_retain + n_forget, ridge, offset)
    else:
        rows_r, residual_r = stacked_jacobians(model, params, split.retain, accelerator, chunk_size=chunk_size,
                                               path=path, loss=loss)
        rows_f, residual_f = stacked_jacobians(model, params, split.forget, accelerator, chunk_size=chunk_size,
                                               path=path, loss=loss)
        retain_step = ridge_dual(rows_r, residual_r, n_retain, ridge, offset)
        all_step = ridge_dual(torch.cat([rows_r, rows_f]), torch.cat([residual_r, residual_f]), n_retain + n_forget,
                              ridge, offset)
    return retain_step - all_step, retain_step, {"form": form, "scope_parameters": size}


def prediction_fisher(model: nn.Module, params: NamedParameters, dataset: Dataset, accelerator: Accelerator, *,
                      chunk_size: int, path: str) -> torch.Tensor:
    """``[P]`` mean over ``dataset`` of E_{y~p(·|x)} (∂CE(x, y)/∂θ)², the reference's Hessian estimate, from the
    scope Jacobians: Σ_y p_y (Jᵀ(p − e_y))² = Σ_y p_y J_y² − (Jᵀp)²; reduced across processes. ``chunk_size``,
    ``path`` as in ``kernel_sums``."""
    total = torch.zeros(sum(param.numel() for _, param in params), dtype=torch.float64, device=accelerator.device)
    for images, _ in progress(_my_chunks(dataset, chunk_size, accelerator), desc="Fisher on D_r", show=accelerator.is_local_main_process):
        jacobian, logits = scope_jacobians(model, params, images.to(accelerator.device), path, chunk_size)
        probs = torch.softmax(logits.double(), dim=1).unsqueeze(2)
        jacobian = jacobian.double()
        total += ((probs * jacobian.pow(2)).sum(dim=1) - (probs * jacobian).sum(dim=1).pow(2)).sum(dim=0)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    return total / len(dataset)


def add_fisher_noise(model: nn.Module, params: NamedParameters, fisher: torch.Tensor, alpha: float,
                     forgotten: tuple[int, ...], seed: int) -> None:
    """The reference's Fisher-noise stage on the scope (in place): θ ← μ + √var·n with var = α/(F + 1e-8) clamped
    at 1e3 (head: 1e2), averaged over a matrix's input dimension, ×10 for the head and 1-d (BatchNorm) parameters;
    a forgotten class's head row gets μ = 0 and var 1e-4 (before the ×10), as in the notebook."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(param) for param in head.parameters()} if head is not None else set()
    generator = torch.Generator().manual_seed(seed)
    offset = 0
    with torch.no_grad():
        for _, param in params:
            variance = (1.0 / (fisher[offset : offset + param.numel()] + 1e-8)).view(param.shape).clamp(max=1e3)
            offset += param.numel()
            is_head = id(param) in head_ids
            if is_head:
                variance = variance.clamp(max=1e2)
            variance = alpha * variance
            if param.dim() > 1:
                variance = variance.mean(dim=1, keepdim=True).expand_as(param).clone()
            mean = param.detach().double().clone()
            if is_head and forgotten:
                mean[list(forgotten)] = 0.0
                variance[list(forgotten)] = 1e-4
            if is_head or param.dim() == 1:
                variance = variance * 10
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((mean + variance.sqrt() * noise.to(mean.device)).to(param.dtype))
