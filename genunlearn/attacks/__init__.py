"""Attacks on a concept erasure, scored by the judge that scores forget_acc: UnlearnDiffAtk (adversarial prompt
tokens), Ring-A-Bell (a concept vector in the text embedding) and relearning (a few fine-tuning steps). ``run_attacks``
runs those named with their settings and returns the report's ``attacks`` section."""

from __future__ import annotations

import dataclasses
import typing

from torch import nn

from genunlearn.attacks.base import AttackJudge, AttackOutcome
from genunlearn.attacks.relearning import RelearnConfig, relearn
from genunlearn.attacks.ring_a_bell import RingABellConfig, ring_a_bell
from genunlearn.attacks.unlearndiffatk import UnlearnDiffAtkConfig, unlearndiffatk
from genunlearn.errors import UserError
from genunlearn.methods.setting_values import typed_setting
from genunlearn.progress import LOGGER

ATTACKS = {  # name: (settings, one line)
    "unlearndiffatk": (UnlearnDiffAtkConfig, "adversarial prompt tokens optimised through the erased model's denoising"),
    "ringabell": (RingABellConfig, "a concept vector in the text encoder's output space, added to the prompts"),
    "relearn": (RelearnConfig, "a few fine-tuning steps on a few images of the concept"),
}
RUNNERS = {  # name: run(judge setting, model, config, the run's split) -> AttackOutcome
    "unlearndiffatk": lambda setting, model, cfg, split: unlearndiffatk(setting, model, cfg),
    "ringabell": lambda setting, model, cfg, split: ring_a_bell(setting, model, cfg),
    "relearn": relearn,
}

__all__ = ["ATTACKS", "AttackJudge", "AttackOutcome", "attack_configs", "run_attacks"]


def attack_configs(names: list[str], settings: dict[str, str]) -> dict[str, object]:
    """``{name: config}`` for the attacks ``names`` with ``settings`` (``{"attack.key": value}``, e.g.
    ``unlearndiffatk.iterations``); a UserError names an unknown attack or setting before anything runs."""
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    chosen: dict[str, dict] = {name: {} for name in names}
    for key, value in settings.items():
        name, _, setting = key.partition(".")
        if name not in chosen:
            raise UserError(f"--attack-set {key}: {name!r} is not among the attacks run ({', '.join(names)})")
        fields = {f.name for f in dataclasses.fields(ATTACKS[name][0])}
        if setting not in fields:
            raise UserError(f"--attack-set {key}: {name} has no setting {setting!r}; its settings are {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(ATTACKS[name][0])
        chosen[name][setting] = typed_setting(setting, value, hints[setting])
    return {name: ATTACKS[name][0](**values) for name, values in chosen.items()}


def run_attacks(setting: AttackJudge, model: nn.Module, configs: dict[str, object], split) -> dict[str, dict]:
    """The report's ``attacks``: ``{name: AttackOutcome.to_dict()}`` for each configured attack on ``model``."""
    outcomes = {}
    for name, cfg in configs.items():
        outcome = RUNNERS[name](setting, model, cfg, split)
        outcomes[name] = outcome.to_dict()
        LOGGER.info("%s: attack success rate %.3f -> %.3f (%d samples, %.0f s)", name, outcome.pre_asr, outcome.post_asr,
                    outcome.samples, outcome.seconds)
    return outcomes
