"""Exact global top-k over parameter scores, whole or sharded across processes, without gathering them anywhere.

The k-th largest value comes from a radix selection on the float32 bit patterns (order-preserving for values >= 0):
31 rounds, each counting the entries at or above a candidate and summing the counts over the processes. Ties at that
value are taken in global flat order: parameters in order, each row-major, a dim-0 shard's rows after those of the
processes before it. One process and N processes' shards of the same scores select the same entries, bit for bit.
"""

from __future__ import annotations

import torch

from genunlearn.engine.sharding import sum_over_processes


def top_k_entries(scores: list[torch.Tensor], k: int, sharded: bool = False) -> list[torch.Tensor]:
    """Boolean masks (shapes of ``scores``): the ``k`` largest of the non-negative ``scores``, over every parameter and,
    when ``sharded``, over every process's dim-0 shards. Collective when sharded."""
    flat = [s.detach().float().flatten() for s in scores]
    device = flat[0].device
    total = int(sum_over_processes(torch.tensor(sum(f.numel() for f in flat), device=device), sharded))
    if k <= 0 or k >= total:
        return [torch.full_like(s, k > 0, dtype=torch.bool) for s in scores]
    threshold = _kth_largest(flat, k, sharded)
    above = [f > threshold for f in flat]
    ties = [f == threshold for f in flat]
    n_above = int(sum_over_processes(torch.stack([a.sum() for a in above]).sum(), sharded))
    ties_before = _ties_before(torch.stack([t.sum() for t in ties]), sharded)  # [P] ties earlier in global order
    chosen = []
    for a, t, before, s in zip(above, ties, ties_before.tolist(), scores):
        budget = k - n_above - before  # ties still wanted when this shard's turn comes
        taken = t & (torch.cumsum(t, 0) <= budget) if budget > 0 else torch.zeros_like(t)
        chosen.append((a | taken).view_as(s))
    return chosen


def _kth_largest(flat: list[torch.Tensor], k: int, sharded: bool) -> torch.Tensor:
    """The ``k``-th largest value of the non-negative ``flat`` (all processes' when ``sharded``), exactly."""
    bits = [f.view(torch.int32) for f in flat]
    prefix = 0
    for bit in range(30, -1, -1):
        candidate = prefix | (1 << bit)
        count = torch.stack([(b >= candidate).sum() for b in bits]).sum()
        if int(sum_over_processes(count, sharded)) >= k:
            prefix = candidate
    return torch.tensor(prefix, dtype=torch.int32, device=flat[0].device).view(torch.float32)


def _ties_before(local_counts: torch.Tensor, sharded: bool) -> torch.Tensor:
    """``[P]``: for each parameter, the ties held by earlier parameters (every process) and by the processes before this
    one in this parameter."""
    if not sharded:
        return torch.cumsum(local_counts, 0) - local_counts
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    everyone = [torch.zeros_like(local_counts) for _ in range(world)]
    torch.distributed.all_gather(everyone, local_counts)
    counts = torch.stack(everyone)  # [N, P]
    earlier_parameters = torch.cumsum(counts.sum(0), 0) - counts.sum(0)
    return earlier_parameters + counts[:rank].sum(0)
