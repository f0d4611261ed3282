"""Registry-wide contracts: every method on a tiny classifier task and (where it applies) a tiny diffusion task, and
every preset's YAML, method blocks and (shrunk) network."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.data import TensorDataset

import genunlearn as gu
from helpers import tiny_class_unet
from genunlearn.methods.registry import method_config
from genunlearn.models.presets import DiffusionPreset, TextToImagePreset, get_preset, list_presets
from genunlearn.models.text_to_image_loading import build_tiny_pipeline
from genunlearn.tasks.classifier import build_classifier
from genunlearn.tasks.diffusion import build_denoiser

CLASSIFIER_ONLY = {"ssd", "lfssd", "fast_ntk"}
TEXT_TO_IMAGE_ONLY = {"advunlearn", "esd", "uce", "uce_adv", "rece"}  # test_text_to_image, test_uce, test_advunlearn run them
TWO_STEPS = {"steps": 2, "batch_size": 16}


def digits_subset(per_class: int):
    train, test = gu.load_digits_split(8)
    keep = torch.cat([torch.nonzero(train.targets == c).flatten()[:per_class] for c in range(10)])
    return TensorDataset(train.images[keep], train.targets[keep]), TensorDataset(test.images[:100], test.targets[:100])


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    return gu.classifier_task(model.eval(), *digits_subset(12))


@pytest.fixture(scope="module")
def diffusion():
    return gu.diffusion_task(tiny_class_unet(), *digits_subset(6), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


def settings_for(method: str) -> dict:
    """Two iterations for loop methods; the one-shot methods take no step count (SSD's α 1: the untrained model's
    importances are too even for the reference's α to dampen anything)."""
    return {"alpha": 1.0} if method in ("ssd", "lfssd") else {} if method == "fast_ntk" else dict(TWO_STEPS)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["classifier", "diffusion"])
@pytest.mark.parametrize("method", sorted(gu.METHODS))
def test_every_method_runs_leaves_the_original_and_refuses_unknown_settings(method, kind, request):
    task = request.getfixturevalue(kind)
    split = gu.forget_split(task, classes=[3])
    with pytest.raises(gu.UserError, match=f"method {method} has no setting 'bogus'"):
        gu.unlearn(task, split, method, bogus=1)
    if kind == "diffusion" and method in CLASSIFIER_ONLY or method in TEXT_TO_IMAGE_ONLY:
        with pytest.raises(gu.UserError, match="text-to-image" if method in TEXT_TO_IMAGE_ONLY else "classifiers") as refused:
            gu.unlearn(task, split, method)
        assert "\n" not in str(refused.value)
        return
    original = snapshot(task.model)
    result = gu.unlearn(task, split, method, **settings_for(method))
    assert result.model is not task.model and all(torch.equal(v, original[k]) for k, v in task.model.state_dict().items())
    assert any(not torch.equal(v, original[k]) for k, v in result.model.state_dict().items())


@pytest.mark.parametrize("kind", ["classifier", "diffusion"])
@pytest.mark.parametrize("method", sorted(m for m in gu.METHODS if m not in CLASSIFIER_ONLY | TEXT_TO_IMAGE_ONLY))
def test_every_loop_method_resumes_to_the_uninterrupted_weights(method, kind, request, tmp_path):
    """Four iterations straight, against four with a checkpoint at 2 and then a resume from it (iterations 3-4 again)."""
    task = request.getfixturevalue(kind)
    split = gu.forget_split(task, classes=[3])
    four = {**TWO_STEPS, "steps": 4}
    straight = gu.unlearn(task, split, method, **four).model.state_dict()
    gu.unlearn(task, split, method, checkpoint_dir=tmp_path, checkpoint_every=2, **four)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    resumed = gu.unlearn(task, split, method, checkpoint_dir=tmp_path, resume=True, checkpoint_every=2, **four).model.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def shrunk(preset: DiffusionPreset) -> DiffusionPreset:
    """The preset with a few-channel network of the same kind, input and output shapes."""
    args = dict(preset.model_args)
    if preset.architecture == "unet":
        args.update(block_out_channels=[8] * len(args["block_out_channels"]), norm_num_groups=4, layers_per_block=1)
    else:
        args.update(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    return dataclasses.replace(preset, model_args=args)


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_loads_builds_its_method_configs_and_runs_a_forward_pass(name):
    preset = get_preset(name)
    for method in preset.methods:
        if method in gu.METHODS:
            method_config(method, preset, {})
    assert set(preset.methods) <= set(gu.METHODS), f"{name} names methods that are not registered"
    if isinstance(preset, DiffusionPreset):
        denoiser = build_denoiser(shrunk(preset), num_classes=10).eval()
        size, channels = denoiser.config.sample_size, denoiser.config.in_channels
        noisy = torch.randn(2, channels, size, size)
        with torch.no_grad():
            output = denoiser(noisy, torch.tensor([1, 500]), class_labels=torch.tensor([0, 3])).sample
        assert output.shape[0] == 2 and output.shape[-1] == size and torch.isfinite(output).all()
    elif isinstance(preset, TextToImagePreset) and preset.hub_id is not None:
        assert not preset.model_args and preset.retain_prompts  # loaded, never built; tests/test_concept_job.py runs its shape
    elif isinstance(preset, TextToImagePreset):
        pipeline = build_tiny_pipeline(preset, seed=0)
        images = pipeline(["a handwritten digit three"], height=preset.image_size, width=preset.image_size, num_inference_steps=2,
                          output_type="pt").images
        assert images.shape == (1, preset.channels, preset.image_size, preset.image_size) and torch.isfinite(images).all()
    else:
        network = build_classifier(preset, num_classes=10).eval()
        with torch.no_grad():
            logits = network(torch.randn(2, preset.channels, preset.image_size, preset.image_size))
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["salun", "sfron", "random_label"])
def test_a_label_shift_that_maps_classes_onto_themselves_is_refused_before_any_mask(method, classifier, monkeypatch):
    def no_statistics(*args, **kwargs):
        raise AssertionError("gradient statistics computed before the settings were checked")

    monkeypatch.setattr("genunlearn.methods.salun.cached_gradient_statistics", no_statistics)
    monkeypatch.setattr("genunlearn.methods.sfron.cached_gradient_statistics", no_statistics, raising=False)
    with pytest.raises(gu.UserError, match="rl_shift 10 maps every class onto itself"):
        gu.unlearn(classifier, gu.forget_split(classifier, classes=[3]), method, rl_shift=10, **TWO_STEPS)


def package_imports() -> dict[str, set[str]]:
    """Each genunlearn module -> the genunlearn modules it imports, at module level or inside functions."""
    root = Path(gu.__file__).parent
    modules = {".".join(("genunlearn", *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genunlearn"):
                found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in modules and m not in (name, "genunlearn")}
    return graph


def test_no_genunlearn_module_imports_another_in_a_cycle():
    graph = package_imports()
    assert "genunlearn.runs.forget" in graph and "genunlearn.kinds" in graph["genunlearn.runs.forget"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)) for nxt in graph[start])

    cycles = [name for name in graph if reaches(name, name, set())]
    assert cycles == []


def test_method_files_stay_short_and_the_library_does_not_import_its_clients():
    methods = Path(gu.__file__).parent / "methods"
    assert {f.name: n for f in methods.glob("*.py") if (n := len(f.read_text().splitlines())) >= 150} == {}
    graph = package_imports()
    clients = {m for m in graph if m.startswith(("genunlearn.runs", "genunlearn.cli"))}
    assert not graph["genunlearn.api"] & clients and not graph["genunlearn.kinds"] & (clients - {"genunlearn.runs.job"})
