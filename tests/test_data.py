"""Digits, image folders and forget splits."""

from __future__ import annotations

import json

import pytest
import torch

from genunlearn import SplitSpec, UserError, load_digits_split, make_forget_split
from genunlearn.data import ImageFolderDataset, default_transform
from helpers import export_digits_folder


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = load_digits_split()
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8)
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert torch.bincount(test.targets).min() >= 35  # stratified: every digit in the test split
    again, _ = load_digits_split()
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)


def _parts(split):
    return [set(split.forget.indices), set(split.retain.indices), set(split.test_forget.indices), set(split.test_retain.indices)]


def test_class_split_counts_and_disjoint():
    train, test = load_digits_split()
    split = make_forget_split(train, test, SplitSpec("class", classes=(3, 5)))
    forget, retain, test_forget, test_retain = _parts(split)
    assert len(forget) == int(((train.targets == 3) | (train.targets == 5)).sum())
    assert not forget & retain and forget | retain == set(range(len(train)))
    assert not test_forget & test_retain and test_forget | test_retain == set(range(len(test)))
    assert set(train.targets[list(forget)].tolist()) == {3, 5}
    assert 3 not in train.targets[list(retain)].tolist()
    assert set(test.targets[list(test_forget)].tolist()) == {3, 5}
    assert split.summary()["forget"] == len(forget)


def test_random_split_is_deterministic_in_seed():
    train, test = load_digits_split()
    a = make_forget_split(train, test, SplitSpec("random", fraction=0.1, seed=1))
    b = make_forget_split(train, test, SplitSpec("random", fraction=0.1, seed=1))
    c = make_forget_split(train, test, SplitSpec("random", fraction=0.1, seed=2))
    assert a.forget.indices == b.forget.indices != c.forget.indices
    assert len(a.forget) == round(0.1 * len(train))
    assert len(a.test_forget) == 0 and len(a.test_retain) == len(test)
    assert not set(a.forget.indices) & set(a.retain.indices)


@pytest.mark.parametrize(
    "spec, message",
    [
        (SplitSpec("class", classes=(10,)), "out of range"),
        (SplitSpec("class", classes=(-1,)), "out of range"),
        (SplitSpec("class", classes=()), "pass --class"),
        (SplitSpec("random", fraction=1.5), "must be in (0, 1)"),
        (SplitSpec("class", classes=tuple(range(10))), "nothing to retain"),
        (SplitSpec("subclass", classes=(0,)), "super-class mapping"),
    ],
)
def test_bad_split_specs_raise_user_errors(spec, message):
    train, test = load_digits_split()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_forget_split(train, test, spec)


def test_image_folder_keeps_class_order_and_refuses_a_class_with_no_images(tmp_path):
    root = export_digits_folder(tmp_path / "digits", per_class=5)
    (root / "classes.txt").write_text("\n".join(f"digit{c}" for c in reversed(range(10))))
    train = ImageFolderDataset(root, "train", default_transform(8, 1))
    assert train.classes[0] == "digit9" and len(train) == 50
    image, label = train[0]
    assert image.shape == (1, 8, 8) and -1.0 <= image.min() and image.max() <= 1.0
    assert train.classes[label].startswith("digit")
    empty = export_digits_folder(tmp_path / "empty", per_class=5, empty_class=4)
    with pytest.raises(UserError, match="digit4 holds no images"):
        ImageFolderDataset(empty, "train", default_transform(8, 1))


def test_subclass_split_from_superclass_mapping(tmp_path):
    root = export_digits_folder(tmp_path / "digits", per_class=4)
    grouping = {"even": [f"digit{c}" for c in range(0, 10, 2)], "odd": [f"digit{c}" for c in range(1, 10, 2)]}
    (root / "superclasses.json").write_text(json.dumps(grouping))
    train = ImageFolderDataset(root, "train", default_transform(8, 1))
    test = ImageFolderDataset(root, "test", default_transform(8, 1))
    assert train.classes == ["even", "odd"] and len(train.subclasses) == 10
    split = make_forget_split(train, test, SplitSpec("subclass", classes=(train.subclasses.index("digit3"),)))
    assert len(split.forget) == 4 and len(split.test_forget) == 4
    assert set(train.targets[split.forget.indices].tolist()) == {1}  # digit3 is odd
    assert 1 in train.targets[split.retain.indices].tolist()  # the rest of the super-class stays
