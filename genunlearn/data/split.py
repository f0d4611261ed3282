"""Forget / retain / test splits, built once from a spec and passed everywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.utils.data import Subset

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError

SplitKind = Literal["class", "random", "subclass"]


@dataclass(frozen=True)
class SplitSpec:
    """What to forget: whole ``classes``, a random ``fraction`` of training samples, or
    sub-``classes`` (fine-class ids) of a super-class dataset. ``seed`` fixes random picks."""

    kind: SplitKind
    classes: tuple[int, ...] = ()
    fraction: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}


@dataclass
class ForgetSplit:
    """Index views of a train/test pair.

    ``forget`` (D_f) and ``retain`` (D_r) partition the training set; ``test_forget`` holds the
    test samples of the forgotten (sub-)classes (empty for random forgetting) and
    ``test_retain`` the rest of the test set.
    """

    spec: SplitSpec
    train: LabeledDataset
    test: LabeledDataset
    forget: Subset
    retain: Subset
    test_forget: Subset
    test_retain: Subset

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def summary(self) -> dict:
        """The spec, the forgotten (sub-)classes' names (``class_names``: a folder ``3`` may hold label 1) and the
        size of each part, for reports."""
        names = self.train.subclasses if self.spec.kind == "subclass" else self.train.classes
        return {
            **self.spec.to_dict(),
            "class_names": [str(names[c]) for c in self.spec.classes] if names is not None else [],
            "forget": len(self.forget),
            "retain": len(self.retain),
            "test_forget": len(self.test_forget),
            "test_retain": len(self.test_retain),
        }


def choose_split(classes, fraction: float | None, subclasses, seed: int,
                 names: tuple[str, str, str] = ("classes=", "fraction=", "subclasses=")) -> SplitSpec:
    """The spec for exactly one of whole ``classes``, a random ``fraction`` or ``subclasses`` (``names``: how the
    caller spells the three in its error)."""
    if sum([bool(classes), fraction is not None, bool(subclasses)]) != 1:
        raise UserError(f"say what to forget with exactly one of {names[0]}, {names[1]} or {names[2]}")
    if fraction is not None:
        return SplitSpec("random", fraction=fraction, seed=seed)
    kind = "subclass" if subclasses else "class"
    return SplitSpec(kind, classes=tuple(int(c) for c in classes or subclasses), seed=seed)


def make_forget_split(train: LabeledDataset, test: LabeledDataset, spec: SplitSpec) -> ForgetSplit:
    """Build the split for ``spec``; deterministic in ``spec.seed``. Raises UserError on bad specs."""
    if spec.kind == "random":
        forget_mask = _random_mask(len(train), spec.fraction, spec.seed)
        test_forget_mask = torch.zeros(len(test), dtype=torch.bool)
    elif spec.kind == "class":
        check_ids(spec.classes, len(train.classes), "class")
        forget_mask = torch.isin(train.targets, torch.tensor(spec.classes))
        test_forget_mask = torch.isin(test.targets, torch.tensor(spec.classes))
    elif spec.kind == "subclass":
        if train.subclass_targets is None or test.subclass_targets is None:
            raise UserError("sub-class forgetting needs a super-class mapping (superclasses.json in the data folder)")
        check_ids(spec.classes, len(train.subclasses or []), "sub-class")
        forget_mask = torch.isin(train.subclass_targets, torch.tensor(spec.classes))
        test_forget_mask = torch.isin(test.subclass_targets, torch.tensor(spec.classes))
    else:
        raise UserError(f"unknown split kind {spec.kind!r}; use class, random or subclass")
    if not forget_mask.any():
        what = f"{spec.kind} {list(spec.classes)}" if spec.classes else f"fraction {spec.fraction}"
        raise UserError(f"the forget set is empty: {what} has no training samples; choose a class that has images")
    if forget_mask.all():
        raise UserError("the forget set is the whole training set, leaving nothing to retain; forget fewer classes")
    return ForgetSplit(
        spec=spec,
        train=train,
        test=test,
        forget=Subset(train, _indices(forget_mask)),
        retain=Subset(train, _indices(~forget_mask)),
        test_forget=Subset(test, _indices(test_forget_mask)),
        test_retain=Subset(test, _indices(~test_forget_mask)),
    )


def check_ids(ids: tuple[int, ...], count: int, what: str) -> None:
    if not ids:
        raise UserError(f"no {what} given to forget; pass --class")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"{what} {bad[0]} is out of range: this dataset has {what}es 0-{count - 1}")


def _random_mask(size: int, fraction: float, seed: int) -> torch.Tensor:
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--random-fraction must be in (0, 1), got {fraction}")
    picked = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: round(fraction * size)]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[picked] = True
    return mask


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()
