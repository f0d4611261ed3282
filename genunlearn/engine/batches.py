"""Deterministic, resumable, process-count-independent batches.

A stream's k-th *global* batch is positions ``[k*B, (k+1)*B)`` of an index stream made of one
seeded permutation per epoch (B = per-process batch x processes); process r takes its r-th
slice. So the k-th batch holds the same samples whatever the number of processes, and a
resumed run continues the stream from its batch count alone, with no sampler state to save.
(We shard ourselves rather than through ``accelerator.prepare(dataloader)`` for these two
properties.)
"""

from __future__ import annotations

from typing import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler

from genunlearn.noise import derive_seed


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of dataset indices for one process, starting at batch ``start_batch``; each epoch's
    permutation is seeded by (``seed``, epoch), or with ``shuffle=False`` every epoch is the dataset's own order
    (the unshuffled, cycled loaders of SFR-on's and SalUn's Stable Diffusion scripts)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_batch: int = 0,
                 shuffle: bool = True) -> None:
        if size == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world, self.start_batch = rank, world, start_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
            self._epoch, self._perm = epoch, order
        return self._perm

    def indices(self, batch: int) -> list[int]:
        """This process's dataset indices in the stream's ``batch``-th batch."""
        start = (batch * self.world + self.rank) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while True:
            yield self.indices(batch)
            batch += 1


class BatchStream:
    """Endless ``(images, labels)`` batches on the accelerator's device; ``position`` counts those drawn."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        accelerator: Accelerator,
        start_batch: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        sampler = StepBatchSampler(
            len(dataset), batch_size, seed, accelerator.process_index, accelerator.num_processes, start_batch, shuffle
        )
        self.position = start_batch
        self._device = accelerator.device
        self._batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._batches)
        self.position += 1
        return images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)
