"""Presets, timm models by name, weights files, parameter scopes and the pretrain command."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file

from genunlearn import UserError, load_task
from genunlearn.cli import guarded, pretrain_main
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.models.peft import scope_initial_values, scope_parameters
from genunlearn.models.presets import ClassifierPreset, get_preset, list_presets
from genunlearn.precision import numerics_tag
from genunlearn.storage.cache import PRETRAIN_SEED, pretrained_entry
from genunlearn.storage.files import load_weights, read_state_dict
from genunlearn.tasks.classifier import ClassifierTask, build_classifier


def test_presets_and_timm_names():
    assert {"cnn-digits", "resnet18-digits"} <= set(list_presets())
    resnet = build_classifier(get_preset("resnet18-digits"), 10)
    assert resnet.conv1.stride == (1, 1) and resnet.conv1.in_channels == 1
    assert resnet(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert get_preset("resnet10t").timm_name == "resnet10t"
    with pytest.raises(UserError, match="unknown model 'resnet-9000'"):
        get_preset("resnet-9000")


def test_squared_loss_and_decay_toward_the_peft_start():
    """``loss: mse, decay_to: start``: ½‖f − (2·onehot − 1)‖² per sample plus (wd/2)‖θ_scope − θ_start‖²; the
    optimizer then decays nothing; decay_to start without a PEFT scope is refused."""
    from genunlearn.engine.training import TrainConfig

    raw = get_preset("vit-digits-prompts").to_dict()
    raw["model_args"].update(embed_dim=16, depth=1, num_heads=2, reg_tokens=2)
    assert raw["train"]["loss"] == "ce"  # the notebook trains on cross-entropy; the squared loss is a setting
    raw["train"].update(loss="mse", decay_to="start")
    preset = ClassifierPreset.from_dict(raw)
    model = build_classifier(preset, 10)
    with torch.no_grad():
        for _, param in scope_parameters(model, preset.peft):
            param.add_(0.1 * torch.randn_like(param))
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 3, 9])
    task = ClassifierTask(preset, model, LabeledTensorDataset(images, labels, [str(c) for c in range(10)]), None)
    targets = -torch.ones(4, 10)
    targets[torch.arange(4), labels] = 1
    distance = sum((p - s).pow(2).sum() for (_, p), s in zip(scope_parameters(model, preset.peft), scope_initial_values(model, preset.peft)))
    expected = 0.5 * (model(images) - targets).pow(2).sum(dim=1) + 0.5 * preset.train.weight_decay * distance
    assert torch.allclose(task.training_loss(model, (images, labels)), expected, atol=1e-6) and distance > 0
    assert TrainConfig.from_recipe(preset.train).weight_decay == 0.0
    assert TrainConfig.from_recipe(get_preset("cnn-digits").train).weight_decay == get_preset("cnn-digits").train.weight_decay
    raw.update(peft=None)
    with pytest.raises(UserError, match="decay_to start needs a PEFT scope"):
        ClassifierPreset.from_dict(raw)


def test_parameter_scopes(cnn_task):
    model = cnn_task.model
    batchnorm = cnn_task.trainable_parameters(model, "batchnorm")
    assert sum(p.numel() for _, p in batchnorm) == 2 * (32 + 64 + 128)
    assert all(".weight" in n or ".bias" in n for n, _ in batchnorm)
    assert [n for n, _ in cnn_task.trainable_parameters(model, "head")] == ["fc.weight", "fc.bias"]
    assert len(cnn_task.trainable_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(UserError):
        cnn_task.trainable_parameters(model, "prompts")


def test_pretrain_command_writes_loadable_weights(cnn_task, cache_dir, tmp_path, capsys):
    out = tmp_path / "pretrained"
    assert guarded(pretrain_main, ["--model", "cnn-digits", "--output-dir", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in cnn_task.model.state_dict().items())
    assert (out / "config.json").is_file()
    assert guarded(pretrain_main, ["--model", "cnn-digits", "--output-dir", str(out)]) == 2  # never overwrites


def test_torch_weights_file_is_loaded_safely(cnn_task, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": cnn_task.model.state_dict()}, path)
    model = build_classifier(cnn_task.preset, 10)
    load_weights(model, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cnn_task.model.state_dict().values()))
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="do not fit this model"):
        load_weights(model, path)
    torch.save(argparse.Namespace(payload=1), path)  # an arbitrary pickled object: refused by weights_only loading
    with pytest.raises(UserError, match="corrupt or unreadable"):
        read_state_dict(path)


def test_hub_id_without_network_names_the_fix(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="pass --pretrained /path/to/model.safetensors"):
        build_classifier(get_preset("resnet18-digits"), 10, pretrained_id="hf-hub:timm/resnet18.a1_in1k")


def test_preset_from_a_yaml_file(tmp_path):
    text = (Path(__file__).parents[1] / "genunlearn/configs/models/dit-xl.yaml").read_text().replace("num_layers: 28", "num_layers: 2")
    (tmp_path / "small.yaml").write_text(text)
    small = get_preset(str(tmp_path / "small.yaml"))
    assert small.name == "dit-xl" and small.model_args["num_layers"] == 2 and small.hub_id == "facebook/DiT-XL-2-256"
    with pytest.raises(UserError, match="does not exist"):
        get_preset(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("name: x\narchitecture: dit\nkind: diffusion\nwheels: 4\n")
    with pytest.raises(UserError, match="not a valid preset"):
        get_preset(str(tmp_path / "bad.yaml"))


def test_evaluation_fingerprint_ignores_how_a_model_is_judged():
    import dataclasses

    preset = get_preset("ddpm-digits")
    judged_otherwise = dataclasses.replace(preset, eval_classifier="resnet18-digits", remain_classes=3)
    assert judged_otherwise.fingerprint() == preset.fingerprint()
    assert dataclasses.replace(preset, num_train_timesteps=500).fingerprint() != preset.fingerprint()


def test_timm_eval_classifier_resizes_and_normalises(tmp_path, accelerator):
    from safetensors.torch import save_file

    from genunlearn.eval.judge import load_eval_classifier

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(tmp_path / "w.safetensors"))
    judge = load_eval_classifier("test_resnet", weights=str(tmp_path / "w.safetensors"), num_classes=1000, data=None,
                                 cache_dir=None, accelerator=accelerator)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = torch.nn.functional.interpolate((images + 1) / 2, size=(160, 160), mode="bilinear", antialias=True)
    assert torch.allclose(judge.prepare(images), (expected - 0.5) / 0.5)  # test_resnet: 160 px, mean = std = 0.5
    assert judge(images).shape == (2, 1000) and judge.num_classes == 1000
    with pytest.raises(UserError, match="do not fit this model"):
        load_eval_classifier("test_resnet", weights=str(tmp_path / "w.safetensors"), num_classes=10, data=None,
                             cache_dir=None, accelerator=accelerator)
    with pytest.raises(UserError, match="unknown evaluation classifier"):
        load_eval_classifier("resnet-9000", weights=None, num_classes=10, data=None, cache_dir=None, accelerator=accelerator)


def test_a_corrupt_cache_entry_names_the_folder_to_delete(cnn_task, cache_dir, tmp_path, accelerator):
    numerics = numerics_tag(accelerator)
    entry = pretrained_entry(cache_dir, cnn_task.preset, "digits8", PRETRAIN_SEED, numerics)
    copy = pretrained_entry(tmp_path, cnn_task.preset, "digits8", PRETRAIN_SEED, numerics)
    shutil.copytree(entry, copy)
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=f"cache entry {copy} .* is corrupt; delete that folder"):
        load_task("cnn-digits", cache_dir=tmp_path)


def test_the_built_in_presets_say_everything_their_family_defaults_would_change():
    """A built-in preset read with and without its family's defaults (``models.held.with_family_defaults``) has the
    same method settings and recipe: the defaults fill only what a user's YAML leaves out."""
    import yaml

    from genunlearn.methods import METHODS
    from genunlearn.methods.registry import method_config
    from genunlearn.models.presets import PRESET_CLASSES, _preset_files

    for name, text in _preset_files().items():
        raw = yaml.safe_load(text)
        bare, merged = PRESET_CLASSES[raw.get("kind", "classifier")].from_dict(raw), get_preset(name)
        assert bare.fingerprint() == merged.fingerprint() and bare.train == merged.train, name
        for method in METHODS:
            assert repr(method_config(method, bare, {})[1]) == repr(method_config(method, merged, {})[1]), (name, method)


def test_every_preset_field_is_documented_and_nothing_else():
    """docs/presets.md cannot drift: each preset dataclass field has exactly one description and every description a
    field (the page itself is checked by test_results_tables' ``tables.py --check``)."""
    import dataclasses

    from genunlearn.models.preset_fields import FIELD_DOCS, documented_fields, render

    page = render()
    for cls in FIELD_DOCS:
        assert set(documented_fields(cls)) == {item.name for item in dataclasses.fields(cls)}, cls.__name__
        table = page.split(f"### `{cls.__name__}`", 1)[1].split("### ", 1)[0]
        assert [row.split("`")[1] for row in table.splitlines() if row.startswith("| `")] == [
            item.name for item in dataclasses.fields(cls)]
