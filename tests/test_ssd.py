"""SSD and LF-SSD: importances by hand, strict selection, β ≤ 1, D_f = D, labels not needed, processes."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from genunlearn.cli import forget_main, guarded
from genunlearn.data.split import SplitSpec, make_forget_split
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.methods.ssd import SSDConfig, dampen, ssd_importances
from genunlearn.methods.ssd_alpha import default_alpha
from genunlearn.models.presets import get_preset
from helpers import accelerate_launch

REPO = Path(__file__).resolve().parents[1]


class LinearTask:
    """A linear classifier on 3 features: small enough to differentiate by hand."""

    name = "linear"
    importance_loss_id = "cross_entropy"
    cache_dir = None

    def __init__(self, data: LabeledTensorDataset) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2).double()
        self.train_data = data

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def importance_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def linear_setup(labels: list[int]):
    features = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0], [2.0, 1.0, -1.0]], dtype=torch.float64)
    data = LabeledTensorDataset(features, torch.tensor(labels), ["a", "b"])
    task = LinearTask(data)
    split = make_forget_split(data, data, SplitSpec("random", fraction=0.5, seed=0))
    return task, split, features


def by_hand(task: LinearTask, features: torch.Tensor, labels: torch.Tensor, label_free: bool, batch: int = 2):
    """(1/n_b) Σ_b T(∇ L̄_b) for W and b, with the gradients written out: CE: (softmax - onehot) x^T; LF: 2 f x^T."""
    weight, bias = task.model.weight.detach(), task.model.bias.detach()
    total_w, total_b = torch.zeros_like(weight), torch.zeros_like(bias)
    starts = range(0, len(features), batch)
    for start in starts:
        x, y = features[start : start + batch], labels[start : start + batch]
        logits = x @ weight.T + bias
        dlogits = 2 * logits if label_free else torch.softmax(logits, 1) - F.one_hot(y, 2).double()
        grad_w, grad_b = dlogits.T @ x / len(x), dlogits.mean(0)
        total_w += grad_w.abs() if label_free else grad_w**2
        total_b += grad_b.abs() if label_free else grad_b**2
    return total_w / len(starts), total_b / len(starts)


@pytest.mark.parametrize("label_free", [False, True])
@pytest.mark.parametrize("order", ["reference", "native"])
def test_importance_equals_a_hand_computation(label_free, order, accelerator):
    """I_D in the reference's order (D_r's samples, then D_f's) or the data's own order, I_f over D_f."""
    task, split, features = linear_setup([0, 1, 1, 0])
    cfg = SSDConfig(batch_size=2, importance_order=order)
    whole, forget, cached = ssd_importances(task, task.model, split, cfg, accelerator, label_free)
    rows = torch.tensor(split.retain.indices + split.forget.indices) if order == "reference" else torch.arange(4)
    assert order == "native" or not torch.equal(rows, torch.arange(4))  # the two orders really differ here
    expected_w, expected_b = by_hand(task, features[rows], task.train_data.targets[rows], label_free)
    assert torch.allclose(whole[0], expected_w, rtol=1e-12) and torch.allclose(whole[1], expected_b, rtol=1e-12)
    assert not cached
    forget_rows = torch.tensor(split.forget.indices)
    expected_fw, _ = by_hand(task, features[forget_rows], task.train_data.targets[forget_rows], label_free)
    assert torch.allclose(forget[0], expected_fw, rtol=1e-12)


def test_label_free_importances_need_no_labels(accelerator):
    first, split, _ = linear_setup([0, 1, 1, 0])
    other, _, _ = linear_setup([1, 1, 0, 0])
    with_labels = ssd_importances(first, first.model, split, SSDConfig(batch_size=2), accelerator, True)
    other_labels = ssd_importances(other, other.model, split, SSDConfig(batch_size=2), accelerator, True)
    for a, b in zip(with_labels[0] + with_labels[1], other_labels[0] + other_labels[1]):
        assert torch.equal(a, b)
    supervised = ssd_importances(other, other.model, split, SSDConfig(batch_size=2), accelerator, False)
    assert not torch.equal(supervised[0][0], with_labels[0][0])  # the supervised importances do use them


def test_selection_is_strict_and_beta_at_most_one():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    whole = [torch.tensor([[1.0, 1.0, 1.0, 0.0]])]
    forget = [torch.tensor([[10.0, 10.5, 100.0, 0.0]])]
    selected, considered = dampen(layer, whole, forget, alpha=10.0, dampening=1.0)
    assert (selected, considered) == (2, 4)  # 10 > 10 and 0 > 0 are not selections
    assert torch.allclose(layer.weight, torch.tensor([[1.0, 2.0 / 10.5, 3.0 / 100.0, 4.0]]))
    selected, _ = dampen(layer, whole, forget, alpha=10.0, dampening=1000.0)  # λ·I_D/I_f > 1: β is capped at 1
    assert selected == 2 and torch.allclose(layer.weight, torch.tensor([[1.0, 2.0 / 10.5, 3.0 / 100.0, 4.0]]))


def test_parameter_filter_limits_dampening():
    layer = nn.Linear(2, 1)
    before = copy.deepcopy(layer)
    whole = [torch.ones(1, 2), torch.ones(1)]
    forget = [torch.full((1, 2), 100.0), torch.full((1,), 100.0)]
    assert dampen(layer, whole, forget, 10.0, 1.0, parameters=r"^bias$") == (1, 1)
    assert torch.equal(layer.weight, before.weight) and torch.allclose(layer.bias, before.bias / 100)


def test_nothing_is_selected_when_the_forget_set_is_all_data(cnn_task, class3_split, accelerator):
    task = copy.copy(cnn_task)
    task.cache_dir = None  # both importances computed, not one read back as the other
    split = dataclasses.replace(class3_split, forget=cnn_task.train_data)  # D_f = D, in D's order: the same batches
    model = copy.deepcopy(cnn_task.model)
    whole, forget, _ = ssd_importances(task, model, split, SSDConfig(importance_order="native"), accelerator, label_free=False)
    assert dampen(model, whole, forget, alpha=1.0, dampening=1.0)[0] == 0


def test_reference_order_importance_equals_a_plain_recomputation(cnn_task, class3_split, accelerator, tmp_path):
    """I_D over ConcatDataset((D_r, D_f)) unshuffled (forget_full_class_main.py), bit for bit, also when read back
    from the cache; cached per split (another class gets its own I_D) and different from the native order's."""
    task = copy.copy(cnn_task)
    task.cache_dir = tmp_path
    loss = torch.nn.CrossEntropyLoss()
    plain = [torch.zeros_like(p) for p in cnn_task.model.parameters()]
    model = copy.deepcopy(cnn_task.model).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset((class3_split.retain, class3_split.forget)), batch_size=64)
    for images, labels in loader:  # the reference's calc_importance, written out
        model.zero_grad()
        loss(model(images), labels).backward()
        for total, param in zip(plain, model.parameters()):
            total += param.grad.pow(2)
    plain = [total / len(loader) for total in plain]
    computed, _, cached = ssd_importances(task, task.model, class3_split, SSDConfig(), accelerator, label_free=False)
    again, _, cached_again = ssd_importances(task, task.model, class3_split, SSDConfig(), accelerator, label_free=False)
    assert not cached and cached_again
    for expected, first, second in zip(plain, computed, again):
        assert torch.equal(first, expected) and torch.equal(second, expected)
    other = make_forget_split(cnn_task.train_data, cnn_task.test_data, SplitSpec("class", classes=(5,)))
    _, _, other_cached = ssd_importances(task, task.model, other, SSDConfig(), accelerator, label_free=False)
    native, _, _ = ssd_importances(task, task.model, class3_split, SSDConfig(importance_order="native"), accelerator, False)
    assert not other_cached and not all(torch.equal(a, b) for a, b in zip(native, computed))


def test_two_process_importances_equal_one(cnn_task, class3_split, cache_dir, accelerator, tmp_path):
    out = tmp_path / "importances.safetensors"
    done = accelerate_launch(REPO / "tests" / "workers" / "ssd_importance_dump.py", [str(out)], cache_dir, port=29523)
    assert done.returncode == 0, done.stderr[-2000:]
    two = load_file(str(out))
    task = copy.copy(cnn_task)
    task.cache_dir = None
    for label_free in (False, True):
        whole, forget, _ = ssd_importances(task, task.model, class3_split, SSDConfig(batch_size=48), accelerator, label_free)
        for (name, _), w, f in zip(task.model.named_parameters(), whole, forget):
            assert torch.allclose(two[f"{label_free}/D/{name}"], w, rtol=1e-4, atol=1e-12), name
            assert torch.allclose(two[f"{label_free}/f/{name}"], f, rtol=1e-4, atol=1e-12), name


@pytest.mark.parametrize("method", ["ssd", "lfssd"])
def test_ssd_forgets_a_class_of_cnn_digits(method, cnn_task, tmp_path):
    out = tmp_path / method
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--method", method, "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["forget_acc"] <= 0.1 and report["before"]["forget_acc"] == 1.0
    assert report["after"]["retain_acc"] > 0.95 and report["after"]["test_acc"] > 0.9
    info = report["method_info"]
    assert info["alpha"] == get_preset("cnn-digits").methods[method]["alpha"] and 0 < info["selected_fraction"] < 0.1
    assert info["importance_order"] == "reference"


def test_reference_alpha_depends_on_architecture_and_forget_kind(cnn_task):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    assert [default_alpha(vit, kind) for kind in ("class", "subclass", "random")] == [5.0, 25.0, 10.0]
    assert {default_alpha(cnn_task.model, kind) for kind in ("class", "subclass", "random")} == {10.0}
