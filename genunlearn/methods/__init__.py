"""Unlearning methods; importing this package registers them all."""

from genunlearn.methods import finetune, grad_ascent, random_label, retrain, salun, sfron  # noqa: F401
from genunlearn.methods.registry import METHODS, MethodSpec, UnlearnResult, get_method, register_method

__all__ = ["METHODS", "MethodSpec", "UnlearnResult", "get_method", "register_method"]
