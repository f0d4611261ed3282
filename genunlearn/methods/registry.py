"""Method registry: name -> (one-line summary, config dataclass, run function)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.errors import UserError
from genunlearn.tasks.base import Task


@dataclass
class UnlearnResult:
    """The model after unlearning (unwrapped), per-step figures, steps run, wall time (s) and method facts
    (mask sparsity, mask time, ...)."""

    model: nn.Module
    log: list[dict] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    info: dict = field(default_factory=dict)


class MethodRun(Protocol):
    def __call__(
        self, task: Task, split: ForgetSplit, cfg, accelerator: Accelerator, *, checkpoint_dir: Path | None, resume: bool
    ) -> UnlearnResult: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    config_class: type
    run: MethodRun

    def make_config(self, *overrides: dict) -> object:
        """The config from its defaults, then each dict in ``overrides`` in turn; unknown keys are a UserError."""
        known = {f.name for f in dataclasses.fields(self.config_class)}
        merged: dict = {}
        for layer in overrides:
            unknown = sorted(set(layer) - known)
            if unknown:
                raise UserError(f"method {self.name} has no setting {unknown[0]!r}; its settings are {', '.join(sorted(known))}")
            merged.update(layer)
        return self.config_class(**merged)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, summary: str, config_class: type) -> Callable[[MethodRun], MethodRun]:
    """Decorator adding a method's run function to ``METHODS`` under ``name``."""

    def add(run: MethodRun) -> MethodRun:
        METHODS[name] = MethodSpec(name, summary, config_class, run)
        return run

    return add


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))} (see `genunlearn methods`)")
    return METHODS[name]
