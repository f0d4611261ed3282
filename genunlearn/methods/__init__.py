"""Unlearning methods; importing this package registers them all."""

from genunlearn.methods import (advunlearn, esd, fast_ntk, finetune, grad_ascent, random_label, rece, retrain, salun,  # noqa: F401
                               sfron, ssd, uce, uce_adversarial)
from genunlearn.methods.registry import METHODS, MethodSpec, UnlearnResult, get_method, register_method

__all__ = ["METHODS", "MethodSpec", "UnlearnResult", "get_method", "register_method"]
