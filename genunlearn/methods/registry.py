"""Method registry: name -> (one-line summary, config dataclass, run function)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.objectives import check_rl_shift
from genunlearn.engine.sharding import fsdp_requested
from genunlearn.errors import UserError
from genunlearn.methods.setting_values import typed_setting
from genunlearn.models.presets import get_preset
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
        self, task: Task, split: ForgetSplit, cfg, accelerator: Accelerator, *, checkpoint_dir: Path | None, resume: bool | Path
    ) -> UnlearnResult: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registered method; ``preset_layer(preset)`` gives the settings it takes from a preset beyond the preset's
    ``methods:`` block (``retrain``: the pretraining recipe); ``kinds``: the model kinds it applies to (None: all);
    ``shards``: whether it runs sharded under an FSDP launch (``engine.sharding``); ``lora``: whether it trains LoRA
    adapters with ``lora_rank`` (``engine.lora_training``)."""

    name: str
    summary: str
    config_class: type
    run: MethodRun
    preset_layer: Callable[[object], dict] | None = None
    kinds: tuple[str, ...] | None = None
    shards: bool = False
    lora: bool = False

    def check_kind(self, kind: str, model: str) -> None:
        """A UserError, before any work, when the method does not apply to a model of ``kind``."""
        if self.kinds is not None and kind not in self.kinds:
            raise UserError(f"{self.name} applies to {'/'.join(self.kinds)} models; {model} is a {kind} model: choose another --method")

    def check_shards(self, accelerator: Accelerator) -> None:
        """A UserError, before any work, when the launch asks for FSDP and the method does not run sharded."""
        if not self.shards and fsdp_requested(accelerator):
            raise UserError(f"{self.name} does not run sharded (FSDP); launch it without --use_fsdp "
                            f"(configs/accelerate/multi_gpu.yaml), or use one of {', '.join(sharded_methods())}")

    def make_config(self, *overrides: dict) -> object:
        """The config from its defaults, then each dict in ``overrides`` in turn; unknown keys are a UserError."""
        known = {f.name for f in dataclasses.fields(self.config_class)}
        merged: dict = {}
        for layer in overrides:
            unknown = sorted(set(layer) - known)
            if unknown:
                raise UserError(f"method {self.name} has no setting {unknown[0]!r}; its settings are {', '.join(sorted(known))}")
            merged.update(layer)
        hints = typing.get_type_hints(self.config_class)
        if merged.get("lora_rank") is not None and not self.lora:
            raise UserError(f"{self.name} does not train LoRA adapters (it trains no gradient steps on adapters' layers); drop lora_rank, "
                            f"or use one of {', '.join(sorted(n for n, spec in METHODS.items() if spec.lora))}")
        return self.config_class(**{key: typed_setting(key, value, hints[key]) for key, value in merged.items()})


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, summary: str, config_class: type, preset_layer: Callable[[object], dict] | None = None,
                    kinds: tuple[str, ...] | None = None, shards: bool = False,
                    lora: bool = False) -> Callable[[MethodRun], MethodRun]:
    """Decorator adding a method's run function to ``METHODS`` under ``name`` (``kinds``, ``shards``, ``lora``: see
    ``MethodSpec``)."""

    def add(run: MethodRun) -> MethodRun:
        METHODS[name] = MethodSpec(name, summary, config_class, _checked_against_task(run), preset_layer, kinds, shards,
                                   lora)
        return run

    return add


def sharded_methods() -> list[str]:
    """The registered methods that run sharded, by name."""
    return sorted(name for name, spec in METHODS.items() if spec.shards)


def _checked_against_task(run: MethodRun) -> MethodRun:
    """``run`` after the checks of its config against the task, so they fail before masks or Fishers are computed."""

    @functools.wraps(run)
    def checked(task: Task, split: ForgetSplit, cfg, accelerator: Accelerator, **options) -> UnlearnResult:
        if getattr(cfg, "rl_shift", None) is not None:
            check_rl_shift(cfg.rl_shift, task.num_classes)
        return run(task, split, cfg, accelerator, **options)

    return checked


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))} (see `genunlearn methods`)")
    return METHODS[name]


def method_config(method: str, preset, settings: dict) -> tuple[MethodSpec, object]:
    """``(method spec, config)``: the method's defaults, its ``preset_layer``, the preset's ``methods:`` block for it,
    then ``settings``."""
    spec = get_method(method)
    layers = [spec.preset_layer(preset)] if spec.preset_layer else []
    user = dict(settings)
    if "steps" in user and "epochs" in {f.name for f in dataclasses.fields(spec.config_class)}:
        user.setdefault("epochs", None)  # an explicit step count replaces the recipe's epochs
    layers += [preset.methods.get(method, {}), user]
    return spec, spec.make_config(*layers)


def method_settings(spec: MethodSpec, preset_name: str | None = None) -> list[tuple[str, object, object]]:
    """``[(setting, default, the preset's value or None)]`` of ``spec``'s config, in field order; the preset's value
    is its ``preset_layer`` and ``methods:`` block (``preset_name``: a preset or YAML file)."""
    layer = {}
    if preset_name is not None:
        preset = get_preset(preset_name)
        layer = {**(spec.preset_layer(preset) if spec.preset_layer else {}), **preset.methods.get(spec.name, {})}
    defaults = spec.make_config()
    return [(item.name, getattr(defaults, item.name), layer.get(item.name)) for item in dataclasses.fields(spec.config_class)]
