"""Unlearning methods; importing this package registers them all."""

from genunlearn.methods import advunlearn, esd, fast_ntk, finetune, grad_ascent, random_label, rece, retrain, salun, sfron, ssd, uce  # noqa: F401
from genunlearn.methods.registry import METHODS, MethodSpec, UnlearnResult, get_method, register_method

__all__ = ["METHODS", "MethodSpec", "UnlearnResult", "get_method", "register_method"]
