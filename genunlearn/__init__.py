"""genunlearn: make trained generative models and classifiers forget.

The public names load on first use (PEP 562), so ``import genunlearn`` and ``genunlearn --help`` do not import torch,
diffusers, timm or scikit-learn; ``genunlearn.unlearn`` (or any other name) imports what it needs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "check_split": "genunlearn.api",
    "forget_split": "genunlearn.api",
    "unlearn": "genunlearn.api",
    "ForgetSplit": "genunlearn.data",
    "SplitSpec": "genunlearn.data",
    "load_digits_split": "genunlearn.data",
    "make_forget_split": "genunlearn.data",
    "as_labeled_dataset": "genunlearn.data.adapt",
    "read_captioned_folder": "genunlearn.data.captioned_folder",
    "UserError": "genunlearn.errors",
    "UnlearningWarning": "genunlearn.advice",
    "evaluate_classifier": "genunlearn.eval.classify",
    "GeneratorScores": "genunlearn.eval.score",
    "evaluate_generator": "genunlearn.eval.score",
    "ProtocolOptions": "genunlearn.eval.sd_protocols",
    "SDProtocols": "genunlearn.eval.sd_protocols",
    "METHODS": "genunlearn.methods",
    "UnlearnResult": "genunlearn.methods",
    "load_task": "genunlearn.kinds",
    "save_classifier": "genunlearn.storage.timm_folder",
    "ConceptPrompts": "genunlearn.tasks.concepts",
    "concept_task": "genunlearn.tasks.concepts",
    "TextConditioned": "genunlearn.tasks.text_to_image",
    "classifier_task": "genunlearn.tasks.user",
    "diffusion_task": "genunlearn.tasks.user",
    "sample_dataset": "genunlearn.tasks.user",
    "tiny_stable_diffusion": "genunlearn.models.tiny_sd",
    "tiny_stable_diffusion_xl": "genunlearn.models.tiny_sd",
    "tiny_stable_diffusion_3": "genunlearn.models.tiny_sd3",
    "export_lora": "genunlearn.models.lora_export",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'genunlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # what editors and type checkers see
    from genunlearn.advice import UnlearningWarning  # noqa: F401
    from genunlearn.api import check_split, forget_split, unlearn  # noqa: F401
    from genunlearn.data import ForgetSplit, SplitSpec, load_digits_split, make_forget_split  # noqa: F401
    from genunlearn.data.adapt import as_labeled_dataset  # noqa: F401
    from genunlearn.data.captioned_folder import read_captioned_folder  # noqa: F401
    from genunlearn.errors import UserError  # noqa: F401
    from genunlearn.eval.classify import evaluate_classifier  # noqa: F401
    from genunlearn.eval.score import GeneratorScores, evaluate_generator  # noqa: F401
    from genunlearn.eval.sd_protocols import ProtocolOptions, SDProtocols  # noqa: F401
    from genunlearn.kinds import load_task  # noqa: F401
    from genunlearn.methods import METHODS, UnlearnResult  # noqa: F401
    from genunlearn.storage.timm_folder import save_classifier  # noqa: F401
    from genunlearn.tasks.concepts import ConceptPrompts, concept_task  # noqa: F401
    from genunlearn.tasks.text_to_image import TextConditioned  # noqa: F401
    from genunlearn.models.lora_export import export_lora  # noqa: F401
    from genunlearn.models.tiny_sd import tiny_stable_diffusion, tiny_stable_diffusion_xl  # noqa: F401
    from genunlearn.models.tiny_sd3 import tiny_stable_diffusion_3  # noqa: F401
    from genunlearn.tasks.user import classifier_task, diffusion_task, sample_dataset  # noqa: F401
