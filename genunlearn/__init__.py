"""genunlearn: make trained generative models and classifiers forget."""

__version__ = "0.1.0"

from genunlearn.api import unlearn  # noqa: E402
from genunlearn.data import ForgetSplit, SplitSpec, load_digits_split, make_forget_split  # noqa: E402
from genunlearn.errors import UserError  # noqa: E402
from genunlearn.eval.classify import classifier_metrics  # noqa: E402
from genunlearn.methods import METHODS, UnlearnResult  # noqa: E402
from genunlearn.models.loading import load_task  # noqa: E402

__all__ = [
    "METHODS",
    "ForgetSplit",
    "SplitSpec",
    "UnlearnResult",
    "UserError",
    "classifier_metrics",
    "load_digits_split",
    "load_task",
    "make_forget_split",
    "unlearn",
]
