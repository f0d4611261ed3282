"""Gradient statistics over a dataset (the Fisher diagonal and its relatives) and the masks built on them.

One implementation serves SFR-on's Fishers, SalUn's gradient magnitudes and SSD's importances.
"""

from __future__ import annotations

import json
import hashlib
import math
from pathlib import Path
from typing import Callable, Literal

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genunlearn.engine.batches import StepBatchSampler
from genunlearn.engine.fingerprint import dataset_fingerprint, model_fingerprint
from genunlearn.engine.sharding import clip_sharded_grad_norm, is_sharded, local
from genunlearn.noise import NoiseSource, derive_seed, drawing_from
from genunlearn.precision import numerics
from genunlearn.progress import progress
from genunlearn.storage.files import atomic_save_tensors, read_cached_tensors
from genunlearn.tasks.base import Batch

GradientTransform = Literal["square", "abs", "identity"]
BatchLoss = Callable[[nn.Module, Batch], torch.Tensor]
_TRANSFORMS: dict[str, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {
    "square": lambda grads: torch._foreach_mul(grads, grads),
    "abs": torch._foreach_abs,
    "identity": lambda grads: [g.clone() for g in grads],
}


def accumulate_gradients(
    model: nn.Module,
    batch_loss: BatchLoss,
    dataset: Dataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    transform: GradientTransform = "square",
    max_norm: float | None = None,
    batches: int | None = None,
    seed: int = 0,
    stream: str = "statistics",
    desc: str = "gradient statistics",
) -> list[torch.Tensor]:
    """``(1/n_b) Σ_b T(∇θ L̄_b)`` per parameter (``model.parameters()`` order), L̄_b the mean of
    ``batch_loss`` over batch b, T = square (the Fisher diagonal), abs or identity.

    Batches: without ``batches``, the dataset's consecutive runs of ``batch_size`` (one pass; the last may be
    shorter); with it, that many full batches drawn from the dataset cycled in a fresh shuffled order each pass
    (as the references' shuffled, cycled loaders; a small set then gives as many batch gradients as a large one).
    The result depends on the batch size: compare statistics only at equal batch sizes. The model is
    in eval mode, its forward under the accelerator's autocast; with ``max_norm`` each batch gradient is clipped
    before T.

    Randomness (the cycled order, and the noise and timesteps a diffusion loss draws through ``current_noise``)
    comes from CPU streams seeded by (``seed``, ``stream``, batch): a run's seed changes the statistics, another
    ``stream`` (the forget and the retain set's) draws independently, and a device draws the same numbers as a CPU.
    Batch b runs on process b mod N and the sums are all-reduced, so any process count gives the same result.
    On a sharded model (``engine.sharding``) every process takes a contiguous share of every batch b, with the share
    of b's noise a single process would draw; the gradient reduce-scattered over them is the gradient of b's mean
    (each share's mean is weighted by its size), clipped by its norm over all shards, then transformed shard-locally:
    the statistic of one process over the same global batches, held as this process's shards.
    """
    return _accumulate(model, batch_loss, dataset, accelerator, batch_size=batch_size, transform=transform,
                       max_norm=max_norm, batches=batches, seed=seed, stream=stream, desc=desc)[0]


def _accumulate(model: nn.Module, batch_loss: BatchLoss, dataset: Dataset, accelerator: Accelerator, *, batch_size: int,
                transform: GradientTransform, max_norm: float | None, batches: int | None, seed: int, stream: str,
                desc: str) -> tuple[list[torch.Tensor], bool]:
    """``accumulate_gradients``'s statistics and whether the loss drew any random numbers (on any process)."""
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    sharded = is_sharded(model)
    totals = [torch.zeros_like(local(p)) for p in params]
    if batches is None:
        n_batches = math.ceil(len(dataset) / batch_size)
        members = lambda b: list(range(b * batch_size, min(len(dataset), (b + 1) * batch_size)))  # noqa: E731
    else:
        order_seed = derive_seed(seed, stream, "order")
        n_batches, members = batches, StepBatchSampler(len(dataset), batch_size, seed=order_seed).indices
    world, rank = accelerator.num_processes, accelerator.process_index
    if sharded:  # every batch on every process, each with its share
        parts = [(b, *_share(members(b), rank, world)) for b in range(n_batches)]
    else:  # batch b whole on process b mod N
        parts = [(b, members(b), None, None, 1.0) for b in range(rank, n_batches, world)]
    loader = DataLoader(dataset, batch_sampler=[indices for _, indices, *_ in parts])
    draws = 0
    for (b, _, first, rows, weight), (images, labels) in zip(parts, progress(loader, desc=desc, show=accelerator.is_local_main_process)):
        model.zero_grad(set_to_none=True)
        source = NoiseSource(derive_seed(seed, stream, "noise", b), share=None if rows is None else (first, rows))
        with drawing_from(source) as noise, accelerator.autocast():
            loss = batch_loss(model, (images.to(accelerator.device), labels.to(accelerator.device))).mean() * weight
        draws += noise.draws
        loss.backward()
        if max_norm is not None:
            clip_sharded_grad_norm(params, max_norm) if sharded else torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(t) for p, t in zip(params, totals)]
        torch._foreach_add_(totals, _TRANSFORMS[transform](grads))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    drew = torch.tensor([float(draws)], device=accelerator.device)
    if accelerator.num_processes > 1:
        if not sharded:  # each process summed whole batches; a sharded one holds its shard of every batch's sum
            totals = accelerator.reduce(totals, reduction="sum")
        drew = accelerator.reduce(drew, reduction="sum")
    return [t.div_(n_batches) for t in totals], bool(drew.item() > 0)


def _share(indices: list[int], rank: int, world: int) -> tuple[list[int], int, int, float]:
    """Process ``rank``'s contiguous share of a global batch: ``(indices, first row, global rows, loss weight)``, the
    weight making the mean over processes of the shares' weighted means the global batch's mean. Sizes differ by at
    most one, earlier processes taking the extra rows; a process with no share runs the batch's first sample at weight
    0, since the others' collectives need its forward and backward."""
    size, extra = divmod(len(indices), world)
    first = rank * size + min(rank, extra)
    mine = indices[first : first + size + (rank < extra)]
    if not mine:
        return indices[:1], 0, len(indices), 0.0
    return mine, first, len(indices), len(mine) * world / len(indices)


def cached_gradient_statistics(
    cache_dir: Path | None,
    model: nn.Module,
    batch_loss: BatchLoss,
    loss_name: str,
    dataset: Dataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    transform: GradientTransform = "square",
    max_norm: float | None = None,
    batches: int | None = None,
    seed: int = 0,
    stream: str = "statistics",
    desc: str = "gradient statistics",
) -> tuple[list[torch.Tensor], bool]:
    """``accumulate_gradients``, cached on disk by everything that decides it: model weights, data, loss, batch size
    and count, transform, clip, the numerics (device type, mixed precision, TF32), and (``seed``, ``stream``) when the
    result drew random numbers (a cycled order, or a loss's noise); a one-pass statistic that drew none (a classifier's
    Fisher) is shared by every seed.

    Returns ``(statistics, whether they came from the cache)``. No caching when ``cache_dir`` is None, the dataset has
    no known fingerprint or the model is sharded (its statistics are shards).
    """
    names = [n for n, _ in model.named_parameters()]
    data_id = dataset_fingerprint(dataset)
    paths = {}
    if cache_dir is not None and data_id is not None and not is_sharded(model):
        base = [model_fingerprint(model), data_id, loss_name, batch_size, transform, max_norm, batches, numerics(accelerator)]
        for drawn, key in ((False, base), (True, [*base, seed, stream])):
            digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
            paths[drawn] = Path(cache_dir) / "saliency" / f"{digest}.safetensors"
    for drawn in (False, True) if batches is None else (True,):
        stored = read_cached_tensors(paths.get(drawn), accelerator)
        if stored is not None:
            return [stored[n].to(accelerator.device) for n in names], True
    stats, drew = _accumulate(model, batch_loss, dataset, accelerator, batch_size=batch_size, transform=transform,
                              max_norm=max_norm, batches=batches, seed=seed, stream=stream, desc=desc)
    path = paths.get(drew or batches is not None)
    if path is not None and accelerator.is_main_process:
        atomic_save_tensors(dict(zip(names, stats)), path)
    return stats, False
