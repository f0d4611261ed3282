"""Fast-NTK: Jacobian paths against an autograd loop, primal against dual, exactness on a model linear in its scope,
the Fisher-noise stage, 2-process sums, the image-folder PEFT presets."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from genunlearn import load_task
from genunlearn.cli import forget_main, guarded
from genunlearn.data.split import SplitSpec, make_forget_split
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.distributed import make_accelerator
from genunlearn.engine.jacobians import batchnorm_jacobians, functional_jacobians
from genunlearn.engine.loop import training_mode
from genunlearn.engine.ntk import (add_fisher_noise, add_upper_gram, kernel_sums, mirror_upper, prediction_fisher,
                                   residuals, scrub_direction)
from genunlearn.methods.fast_ntk import FastNTKConfig, fast_ntk
from genunlearn.models import cnn as _register_cnn  # noqa: F401
from genunlearn.models.peft import prepare_peft, scope_initial_values, scope_parameters
from genunlearn.storage.files import load_weights
from helpers import accelerate_launch, export_digits_folder

CLASSES = 3


def tiny_bn_cnn() -> nn.Module:
    """A float64 BatchNorm CNN (width 4) in eval mode with non-trivial running statistics and affine values."""
    torch.manual_seed(0)
    model = timm.create_model("genunlearn_cnn", num_classes=CLASSES, in_chans=1, width=4).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def random_split(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.arange(count) % CLASSES
    data = LabeledTensorDataset(images, labels, ["a", "b", "c"])
    return data, make_forget_split(data, data, SplitSpec("class", classes=(2,)))


def autograd_loop_jacobians(model: nn.Module, params, images: torch.Tensor) -> torch.Tensor:
    """``J [B, K, P]`` one autograd call per sample and output: the reference the fast paths are checked against."""
    return torch.stack([
        torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(images[i : i + 1])[0, k], [p for _, p in params])])
                     for k in range(CLASSES)])
        for i in range(len(images))
    ])


def test_jacobian_paths_equal_a_per_output_autograd_loop():
    model = tiny_bn_cnn()
    params = scope_parameters(model, "batchnorm+head")
    images = random_split(5)[0].images
    loop = autograd_loop_jacobians(model, params, images)
    fast, logits = batchnorm_jacobians(model, params, images, head=model.get_classifier())
    functional, _ = functional_jacobians(model, params, images, chunk_size=2)
    assert fast.shape == loop.shape == (5, CLASSES, sum(p.numel() for _, p in params))
    assert torch.allclose(fast, loop, atol=1e-12) and torch.allclose(functional, loop, atol=1e-12)
    assert torch.allclose(logits, model(images))


def test_prompt_jacobians_of_a_vit_equal_a_per_output_autograd_loop():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=16, depth=1, num_heads=2,
                              reg_tokens=2, num_classes=CLASSES, in_chans=1).double().eval()
    params = scope_parameters(model, "prompts+head")
    images = random_split(3)[0].images
    loop = autograd_loop_jacobians(model, params, images)
    functional, logits = functional_jacobians(model, params, images, chunk_size=2)
    assert functional.shape == loop.shape == (3, CLASSES, 2 * 16 + 17 * CLASSES)
    assert torch.allclose(functional, loop, atol=1e-12) and torch.allclose(logits, model(images))
    fused = [block.fused_attn for block in model.modules() if hasattr(block, "fused_attn")]
    assert fused and all(fused)  # the fused kernel is back after the Jacobians


@pytest.mark.parametrize("scope, count, regime", [("batchnorm", 30, "P < NK"), ("batchnorm+head", 12, "P > NK")])
def test_primal_equals_dual(scope, count, regime):
    model = tiny_bn_cnn()
    _, split = random_split(count)
    size = sum(p.numel() for _, p in scope_parameters(model, scope))
    assert (size < count * CLASSES) == (regime == "P < NK")
    accelerator = make_accelerator()
    offset = torch.randn(size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # a centred ridge
    directions, retain_steps = {}, {}
    for form in ("primal", "dual"):
        directions[form], retain_steps[form], info = scrub_direction(model, scope_parameters(model, scope), offset, split, accelerator,
                                                                     form=form, ridge=0.1, chunk_size=7, path="auto", loss="ce")
        assert info["form"] == form
    assert torch.allclose(directions["primal"], directions["dual"], rtol=1e-6, atol=1e-10)
    assert torch.allclose(retain_steps["primal"], retain_steps["dual"], rtol=1e-6, atol=1e-10)
    assert directions["primal"].norm() > 0


class LinearInScope(nn.Module):
    """Logits linear in the head (the scope) on fixed random features: f(x) = W φ(x) + b."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh()).double()
        self.fc = nn.Linear(6, CLASSES).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def ridge_fit(model: LinearInScope, data, ridge: float) -> torch.Tensor:
    """argmin_w Σ ½‖f(x; w) − (2y − 1)‖² + (Nλ/2)‖w − w_0‖² (w_0 = the scope's initial values, 0) in closed form."""
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        phi = torch.cat([model.features(images), torch.ones(len(images), 1, dtype=torch.float64)], dim=1)  # [N, F+1]
    targets = 2 * nn.functional.one_hot(labels, CLASSES).double() - 1
    system = phi.T @ phi + len(images) * ridge * torch.eye(phi.shape[1], dtype=torch.float64)
    return torch.linalg.solve(system, phi.T @ targets).T  # [K, F+1]: weight and bias columns


class LinearTask:  # a classifier: images to logits
    name = "linear"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def logits(self, model, images):
        return model(images)


def trained_linear_model(data, ridge: float) -> LinearInScope:
    model = prepare_peft(LinearInScope(), "head")
    trained = ridge_fit(model, data, ridge)
    with torch.no_grad():
        model.fc.weight.copy_(trained[:, :-1])
        model.fc.bias.copy_(trained[:, -1])
    return model


@pytest.mark.parametrize("linearize_at", ["trained", "init"])
def test_fast_ntk_equals_ridge_retrain_on_a_model_linear_in_its_scope(linearize_at):
    """Centred on the scope's start (``ridge_centre: start``), the linear model's scrub is exact from either point."""
    data, split = random_split(40, seed=3)
    ridge = 0.1
    model = trained_linear_model(data, ridge)
    task = LinearTask(model)
    cfg = FastNTKConfig(scope="head", loss="mse", linearize_at=linearize_at, ridge=ridge, scale=1.0,
                        ridge_centre="start")  # the ridge step alone
    result = fast_ntk(task, split, cfg, make_accelerator())
    oracle = ridge_fit(model, split.retain, ridge)
    assert torch.allclose(result.model.fc.weight, oracle[:, :-1], atol=1e-10)
    assert torch.allclose(result.model.fc.bias, oracle[:, -1], atol=1e-10)
    assert not torch.allclose(model.fc.weight, oracle[:, :-1], atol=1e-3)  # the original is left as it was


def test_by_default_the_ridge_and_the_trapezium_follow_the_reference_notebook():
    """The notebook's ridge penalises the step w from the trained weights, w = −(JᵀJ + Nλ I)⁻¹ Jᵀr per set (its cells
    35 and 37), and its trapezium measures the error θ_trained − θ_init − w_retain (cell 44); by hand here."""
    data, split = random_split(40, seed=3)
    ridge = 0.1
    model = trained_linear_model(data, ridge)
    with torch.no_grad():
        model.fc.weight.add_(0.05)  # off the ridge optimum, as a network trained by SGD is

    def step(dataset) -> torch.Tensor:
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        with torch.no_grad():
            phi = torch.cat([model.features(images), torch.ones(len(images), 1, dtype=torch.float64)], dim=1)
            residual = model(images) - (2 * nn.functional.one_hot(labels, CLASSES).double() - 1)  # [N, K]
        # the head's parameters, weight then bias, as the scope flattens them: J_i of logit k is φ_i in row k
        jacobian = torch.zeros(len(images) * CLASSES, CLASSES * (phi.shape[1]), dtype=torch.float64)
        for i in range(len(images)):
            for k in range(CLASSES):
                jacobian[i * CLASSES + k, k * (phi.shape[1] - 1):(k + 1) * (phi.shape[1] - 1)] = phi[i, :-1]
                jacobian[i * CLASSES + k, CLASSES * (phi.shape[1] - 1) + k] = 1.0
        system = jacobian.T @ jacobian + len(images) * ridge * torch.eye(jacobian.shape[1], dtype=torch.float64)
        return -torch.linalg.solve(system, jacobian.T @ residual.reshape(-1))

    retain_step, all_step = step(split.retain), step(data)
    direction = retain_step - all_step
    trained = torch.cat([model.fc.weight.detach().reshape(-1), model.fc.bias.detach()])  # the start is 0
    from genunlearn.engine.ntk import trapezium_scale

    for scale in (1.0, "trapezium"):
        result = fast_ntk(LinearTask(model), split, FastNTKConfig(scope="head", loss="mse", ridge=ridge, scale=scale),
                          make_accelerator())
        expected_scale = 1.0 if scale == 1.0 else trapezium_scale(direction, trained - retain_step)
        assert result.info["scale"] == pytest.approx(expected_scale, rel=1e-8)
        moved = torch.cat([result.model.fc.weight.detach().reshape(-1), result.model.fc.bias.detach()]) - trained
        assert torch.allclose(moved, expected_scale * direction, atol=1e-10)
    assert expected_scale > 1.0 and result.info["ridge_centre"] == "point"


def test_blockwise_gram_accumulation_equals_the_full_product():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(6, 10, generator=generator) for _ in range(3)]
    gram = torch.zeros(10, 10, dtype=torch.float64)
    for rows in chunks:  # 4 column blocks of 3, the last one partial
        add_upper_gram(gram, rows, block=3)
    mirror_upper(gram, block=3)
    expected = sum(rows.double().T @ rows.double() for rows in chunks)
    assert torch.allclose(gram, expected, atol=1e-5)
    assert torch.equal(gram, gram.T)


def test_training_mode_freezes_batchnorm_statistics_for_peft_tasks():
    """A PEFT task trains with BatchNorm in eval mode (statistics used, never updated); other tasks train it normally."""
    for frozen in (True, False):
        model = training_mode(copy.deepcopy(tiny_bn_cnn()), SimpleNamespace(frozen_batchnorm=frozen))
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and model.training and all(norm.training is not frozen for norm in norms)
        model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
        assert all(int(norm.num_batches_tracked) == (0 if frozen else 1) for norm in norms)


def test_residuals_and_peft_scope_start():
    logits = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(residuals(logits, torch.tensor([1])), torch.tensor([[1 / 3, -2 / 3, 1 / 3]], dtype=torch.float64))
    assert torch.allclose(residuals(logits, torch.tensor([1]), "mse"), torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64))
    model = prepare_peft(copy.deepcopy(tiny_bn_cnn()), "batchnorm+head")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in scope_parameters(model, "batchnorm+head")]
    for (_, param), start in zip(scope_parameters(model, "batchnorm+head"), scope_initial_values(model, "batchnorm+head")):
        assert torch.equal(param, start)


def test_prediction_fisher_equals_label_expectation_of_squared_gradients():
    """Σ_y p_y (∂CE(x, y)/∂θ)² averaged over samples, against an autograd loop over samples and labels."""
    model = tiny_bn_cnn()
    params = scope_parameters(model, "batchnorm+head")
    data, _ = random_split(6)
    expected = torch.zeros(sum(p.numel() for _, p in params), dtype=torch.float64)
    for image, _ in data:
        logits = model(image.unsqueeze(0))
        probs = torch.softmax(logits, dim=1)[0].detach()
        for label in range(CLASSES):
            loss = nn.functional.cross_entropy(logits, torch.tensor([label]))
            grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True)
            expected += probs[label] * torch.cat([g.reshape(-1) for g in grads]).pow(2)
    fisher = prediction_fisher(model, params, data, make_accelerator(), chunk_size=4, path="auto")
    assert torch.allclose(fisher, expected / len(data), rtol=1e-9, atol=1e-14)


def test_fisher_noise_stage_follows_the_reference_recipe():
    """Noise scale √(10·α/(F + 1e-8)) on BatchNorm parameters; the forgotten class's head row is centred on 0 with
    variance 1e-3; the same seed gives the same noise."""
    model = tiny_bn_cnn()
    params = scope_parameters(model, "batchnorm+head")
    fisher = torch.full((sum(p.numel() for _, p in params),), 4.0, dtype=torch.float64)
    before = [p.detach().clone() for _, p in params]
    noisy = [copy.deepcopy(model) for _ in range(2)]
    for copy_ in noisy:
        add_fisher_noise(copy_, scope_parameters(copy_, "batchnorm+head"), fisher, alpha=1e-6, forgotten=(2,), seed=0)
    after = [[p.detach() for _, p in scope_parameters(copy_, "batchnorm+head")] for copy_ in noisy]
    assert all(torch.equal(a, b) for a, b in zip(*after))
    bn_shift = torch.cat([(a - b).reshape(-1) for (name, _), a, b in zip(params, after[0], before) if name.startswith("features")])
    assert abs(float(bn_shift.std()) / (10 * 1e-6 / 4) ** 0.5 - 1) < 0.25
    head_weight = dict(zip([n for n, _ in params], after[0]))["fc.weight"]
    assert head_weight[2].abs().max() < 0.2 and head_weight[2].std() > 0.01  # mean 0, std √1e-3 ≈ 0.03
    assert torch.allclose(head_weight[:2], model.fc.weight[:2], atol=0.05)


def test_two_process_kernel_sums_equal_one(tmp_path):
    """Σ JᵀJ, Σ Jᵀr and the Fisher reduced over 2 gloo processes (uneven chunk counts) equal one process's."""
    out = tmp_path / "sums.safetensors"
    tests = Path(__file__).parent
    done = accelerate_launch(tests / "workers" / "ntk_kernel_dump.py", [str(out), str(tests)], tmp_path, port=29531)
    assert done.returncode == 0, done.stderr[-2000:]
    two = load_file(str(out))
    model = tiny_bn_cnn()
    params = scope_parameters(model, "batchnorm+head")
    data, _ = random_split(23)
    gram, pull = kernel_sums(model, params, data, make_accelerator(), "sums", chunk_size=5, path="auto", loss="ce")
    fisher = prediction_fisher(model, params, data, make_accelerator(), chunk_size=5, path="auto")
    assert torch.allclose(two["gram"], gram, rtol=1e-10, atol=1e-12)
    assert torch.allclose(two["pull"], pull, rtol=1e-10, atol=1e-12)
    assert torch.allclose(two["fisher"], fisher, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("preset, shrink, form", [
    ("resnet18-cifar10-bn", {}, "dual"),  # P = 14,730 > N·K = 300
    ("vit-cifar10-prompts", {"embed_dim": 16, "depth": 1, "num_heads": 2, "reg_tokens": 2}, "primal"),  # P = 202
])
def test_fast_ntk_on_an_image_folder_moves_only_the_scope(preset, shrink, form, tmp_path):
    """The CIFAR-layout PEFT presets (one epoch, ViT shrunk) through ``genunlearn forget --method fast_ntk --data``:
    the saved model differs from the pretrained one in the scope only, and the scope moved."""
    root = export_digits_folder(tmp_path / "folder", per_class=3)
    raw = yaml.safe_load((Path(__file__).parents[1] / "genunlearn" / "configs" / "models" / f"{preset}.yaml").read_text())
    raw["train"]["epochs"] = 1
    raw["model_args"].update(shrink)
    config = tmp_path / f"tiny-{preset}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cache, out = tmp_path / "cache", tmp_path / "run"
    argv = ["--model", str(config), "--data", str(root), "--class", "1", "--method", "fast_ntk",
            "--cache-dir", str(cache), "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    info = json.loads((out / "report.json").read_text())["method_info"]
    assert info["form"] == form and info["loss"] == "ce" and info["direction_norm"] > 0  # the loss the preset trained on
    original = load_task(str(config), data=root, cache_dir=cache).model
    for norm in (m for m in original.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        # PEFT training kept the backbone's running statistics as built (the NTK reference's --disable-bn)
        assert int(norm.num_batches_tracked) == 0 and not norm.training
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    unlearned = copy.deepcopy(original)
    load_weights(unlearned, out / "model")
    scope = {name for name, _ in scope_parameters(original, raw["peft"])}
    changed = {name for (name, a), (_, b) in zip(original.named_parameters(), unlearned.named_parameters()) if not torch.equal(a, b)}
    assert changed and changed <= scope
