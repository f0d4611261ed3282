"""Classifier metrics: forget / retain / test accuracy and MIA on a forget split, and how a classifier labels
each class's generated samples (accuracy, entropy, probability of the class). Never trains."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genunlearn.data.split import ForgetSplit
from genunlearn.distributed import make_accelerator
from genunlearn.advice import advise
from genunlearn.eval.mia import member_rate, softmax_entropy

EVAL_BATCH_SIZE = 256


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, K], labels [N])`` on the CPU, in dataset order, computed across processes and gathered on all."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False))
    model.eval()
    logits, labels = [], []
    for images, batch_labels in loader:
        batch_logits, batch_labels = accelerator.gather_for_metrics((model(images), batch_labels))
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Fraction of rows whose arg-max equals the label; None for an empty set."""
    if len(labels) == 0:
        return None
    return float((logits.argmax(dim=1) == labels).double().mean())


def evaluate_classifier(model: nn.Module, split: ForgetSplit, accelerator: Accelerator | None = None) -> dict:
    """Accuracies (fractions in [0, 1]) and MIA for ``model`` on ``split``.

    ``forget_acc``: on D_f; ``forget_test_acc``: on the forgotten classes' test samples (None for
    random forgetting); ``retain_acc``: on D_r; ``test_acc``: on the retained classes' test samples;
    ``mia``: fraction of D_f an entropy attack fitted on D_r (members) vs retained-class test
    samples (non-members) calls member, None when not informative (``mia_informative``); ``per_class_acc``: ``{class id as text: accuracy}`` on all test samples.
    """
    started = time.perf_counter()
    accelerator = accelerator or make_accelerator()
    model = model.to(accelerator.device)
    outputs = {
        part: predict_logits(model, getattr(split, part), accelerator) if len(getattr(split, part)) else None
        for part in ("forget", "retain", "test_forget", "test_retain")
    }
    entropy = {part: softmax_entropy(out[0]) for part, out in outputs.items() if out is not None}
    tested = [outputs[part] for part in ("test_forget", "test_retain") if outputs[part] is not None]
    retain_acc, test_acc = accuracy(*outputs["retain"]), accuracy(*outputs["test_retain"])
    informative = mia_informative(retain_acc, test_acc, accelerator.is_main_process)
    return {
        "forget_acc": accuracy(*outputs["forget"]),
        "forget_test_acc": accuracy(*outputs["test_forget"]) if outputs["test_forget"] else None,
        "retain_acc": retain_acc,
        "test_acc": test_acc,
        "mia": member_rate(entropy["retain"], entropy["test_retain"], entropy["forget"]) if informative else None,
        "per_class_acc": per_class_accuracy(torch.cat([logits for logits, _ in tested]), torch.cat([labels for _, labels in tested])),
        "eval_time_s": time.perf_counter() - started,
    }


MIA_DEGENERATE_ACC = 0.99  # accuracy on both D_r and the held-out test images at or above which the MIA says nothing


def mia_informative(retain_acc: float | None, test_acc: float | None, main_process: bool = True) -> bool:
    """Whether the entropy MIA can say anything: not when the model is near 100% accurate on both its members (D_r)
    and the non-members (held-out test images), where there is no member/non-member gap to learn and its member rate
    on D_f jumps between 0 and 1 on noise; then it warns once and the caller reports None."""
    if retain_acc is None or test_acc is None or min(retain_acc, test_acc) < MIA_DEGENERATE_ACC:
        return True
    advise(f"the membership-inference attack is not informative here: the model is >= {MIA_DEGENERATE_ACC:.0%} accurate on "
           "both D_r and the held-out test images, so it has no member/non-member gap to learn; mia is reported as null. "
           "Judge forgetting by forget_acc, or against a retrained model (--compare-retrain)", main_process)
    return False


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{class id as text: accuracy}`` for every class present in ``labels`` (``logits`` ``[N, K]``), by id."""
    correct = logits.argmax(1) == labels
    return {str(c): float(correct[labels == c].double().mean()) for c in sorted(set(labels.tolist()))}


@torch.no_grad()
def class_metrics(classifier: nn.Module, samples: dict[int, torch.Tensor], device: torch.device) -> dict[int, dict[str, float]]:
    """For each class c's samples: the fraction the classifier labels c (``accuracy``), mean softmax entropy
    (nats) and mean probability of c."""
    classifier = classifier.to(device).eval()
    metrics = {}
    for class_id, images in samples.items():
        logits = classifier(images.to(device)).float().cpu()
        metrics[class_id] = {
            "accuracy": float((logits.argmax(1) == class_id).double().mean()),
            "entropy": float(softmax_entropy(logits).mean()),
            "probability": float(torch.softmax(logits.double(), 1)[:, class_id].mean()),
        }
    return metrics
