"""Random draws that are the same on every device and for any process count.

Every draw a computation makes (diffusion noise ε, timesteps t, label and caption dropout, VAE posterior samples,
ESD's starting latents) comes from a seeded CPU ``torch.Generator`` and is then moved to the device, as diffusers'
``randn_tensor`` does with a CPU generator: a CPU and a GPU run of one seed see the same numbers and differ only by
arithmetic. Seeds derive from the run's ``--seed`` and a purpose (``derive_seed``): data order, gradient statistics
(forget and retain apart), loop steps and evaluation sampling never share a stream.

The engine makes a ``NoiseSource`` current around each computation (``drawing_from``); a task's loss draws through
``current_noise()``. A source shared by a multi-process step draws for the global batch and keeps this process's rows,
so N processes see exactly the numbers one process with the whole batch sees. Outside any source, draws come from
torch's global CPU generator (seeded by ``torch.manual_seed``), still on the CPU and moved.

Randomness inside a model (``nn.Dropout`` layers) uses the device's generator, which the loop seeds per step from
the run's seed: reproducible on one device type, not across them. The digits and Stable Diffusion presets have none.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

SCHEME = "cpu-streams-1"  # how draws are made and seeded; in cache keys, so entries from another scheme are not reused
MakeDraws = Callable[[int, torch.Generator], torch.Tensor]  # (rows, generator) -> a [rows, ...] CPU tensor


def derive_seed(seed: int, *purpose: int | str) -> int:
    """A 63-bit seed for ``purpose`` (names and indices) under the run's ``seed``: distinct purposes give
    independent streams, and the same ones the same stream on every machine."""
    digest = hashlib.sha256(json.dumps([int(seed), *purpose]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class NoiseSource:
    """Draws from one seeded CPU generator, moved to the requested device.

    ``rank``/``world``: a draw of ``rows`` per-sample values makes ``world * rows`` of them (the global batch) and
    returns rows ``[rank * rows, (rank + 1) * rows)``; every process of a step must make the same sequence of draws.
    ``share=(first, total)`` instead: shares of unequal size; a draw of ``rows`` makes ``total`` and returns rows
    ``[first, first + rows)`` (a sharded model's statistics, ``engine.saliency``).
    ``generator``: draw from this generator instead of a new one seeded by ``seed``. ``draws`` counts the draws made.
    """

    def __init__(self, seed: int | None = None, *, rank: int = 0, world: int = 1, share: tuple[int, int] | None = None,
                 generator: torch.Generator | None = None) -> None:
        if (seed is None) == (generator is None):
            raise ValueError("give a seed or a generator")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.rank, self.world, self.share = rank, world, share
        self.draws = 0

    def per_sample(self, rows: int, make: MakeDraws) -> torch.Tensor:
        """This process's rows ``[rows, ...]`` (CPU) of ``make(world * rows, generator)`` (or of ``make(total)`` with a
        ``share``), the global batch's draws."""
        self.draws += 1
        if self.share is not None:
            first, total = self.share
            return make(total, self.generator)[first : first + rows]
        everything = make(self.world * rows, self.generator)
        return everything[self.rank * rows : (self.rank + 1) * rows]

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal ``[B, ...]`` (``shape[0]`` = B per sample), drawn in float32 on the CPU, then moved and cast."""
        drawn = self.per_sample(shape[0], lambda n, g: torch.randn((n, *shape[1:]), generator=g))
        return drawn.to(device=device, dtype=dtype)

    def rand(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform [0, 1) ``[B, ...]`` in float32."""
        return self.per_sample(shape[0], lambda n, g: torch.rand((n, *shape[1:]), generator=g)).to(device)

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Integers in ``[0, high)`` ``[B, ...]`` (int64)."""
        return self.per_sample(shape[0], lambda n, g: torch.randint(0, high, (n, *shape[1:]), generator=g)).to(device)

    def shared_randint(self, high: int) -> int:
        """One integer in ``[0, high)``, the same on every process (a draw for the whole global batch)."""
        self.draws += 1
        return int(torch.randint(0, high, (), generator=self.generator))


_CURRENT: ContextVar[NoiseSource | None] = ContextVar("genunlearn_noise", default=None)


@contextmanager
def drawing_from(source: NoiseSource) -> Iterator[NoiseSource]:
    """Make ``source`` the one ``current_noise`` returns inside the block."""
    token = _CURRENT.set(source)
    try:
        yield source
    finally:
        _CURRENT.reset(token)


def current_noise() -> NoiseSource:
    """The source made current by ``drawing_from``; outside one, torch's global CPU generator (``torch.manual_seed``)."""
    source = _CURRENT.get()
    return source if source is not None else NoiseSource(generator=torch.default_generator)


def gaussian_sample(distribution) -> torch.Tensor:
    """A sample ``mean + std · ε`` of a diagonal Gaussian (a VAE's ``latent_dist``: ``.mean``, ``.std`` ``[B, ...]``),
    ε drawn from ``current_noise``."""
    mean = distribution.mean
    return mean + distribution.std * current_noise().randn(tuple(mean.shape), mean.device, mean.dtype)
