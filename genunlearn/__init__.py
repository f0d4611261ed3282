"""genunlearn: make trained generative models and classifiers forget."""

__version__ = "0.1.0"

from genunlearn.api import check_split, forget_split, unlearn  # noqa: E402
from genunlearn.data import ForgetSplit, SplitSpec, load_digits_split, make_forget_split  # noqa: E402
from genunlearn.data.adapt import as_labeled_dataset  # noqa: E402
from genunlearn.data.captioned_folder import read_captioned_folder  # noqa: E402
from genunlearn.errors import UserError  # noqa: E402
from genunlearn.eval.classify import evaluate_classifier  # noqa: E402
from genunlearn.eval.score import GeneratorScores, evaluate_generator  # noqa: E402
from genunlearn.eval.sd_protocols import ProtocolOptions, SDProtocols  # noqa: E402
from genunlearn.methods import METHODS, UnlearnResult  # noqa: E402
from genunlearn.kinds import load_task  # noqa: E402
from genunlearn.storage.timm_folder import save_classifier  # noqa: E402
from genunlearn.tasks.concepts import ConceptPrompts, concept_task  # noqa: E402
from genunlearn.tasks.user import classifier_task, diffusion_task, sample_dataset  # noqa: E402

__all__ = [
    "METHODS",
    "ConceptPrompts",
    "ForgetSplit",
    "GeneratorScores",
    "ProtocolOptions",
    "SDProtocols",
    "SplitSpec",
    "UnlearnResult",
    "UserError",
    "as_labeled_dataset",
    "check_split",
    "classifier_task",
    "concept_task",
    "diffusion_task",
    "evaluate_classifier",
    "evaluate_generator",
    "forget_split",
    "load_digits_split",
    "load_task",
    "make_forget_split",
    "read_captioned_folder",
    "sample_dataset",
    "save_classifier",
    "unlearn",
]
