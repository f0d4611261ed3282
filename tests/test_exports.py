"""Run folders load where the user came from: timm's ``local-dir:`` layout, or timm plus the card's stem lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import export_digits_folder
from PIL import Image
from safetensors.torch import load_file, save_file

import genunlearn
from genunlearn.cli import main
from genunlearn.data.folders import default_transform
from genunlearn.models.presets import get_preset
from genunlearn.tasks.classifier import build_classifier

PROBE = torch.Generator().manual_seed(1)


def run_alone(script: str, folder: Path) -> str:
    """Run ``script`` in a fresh interpreter; it loads ``folder``'s model as ``m``, and must reproduce the logits
    saved beside it on the saved probe without genunlearn ever being imported (unless the script imports it)."""
    check = f"""
import sys, torch, timm, safetensors.torch
torch.set_num_threads({torch.get_num_threads()})  # bit-identical CPU results need the same thread count
{script}
saved = safetensors.torch.load_file({str(folder.parent / "probe.safetensors")!r})
assert torch.equal(m.eval()(saved["images"]), saved["logits"]), "logits differ"
print("genunlearn imported:", "genunlearn" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=folder.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def save_probe(model: torch.nn.Module, folder: Path, size: tuple[int, int, int]) -> None:
    images = torch.randn(4, *size, generator=PROBE)
    with torch.no_grad():
        save_file({"images": images, "logits": model.eval()(images)}, str(folder.parent / "probe.safetensors"))


def test_a_user_timm_model_saves_in_timms_layout_and_loads_without_genunlearn(tmp_path):
    model = timm.create_model("resnet10t", num_classes=4, in_chans=1)
    folder = tmp_path / "mine"
    with pytest.raises(ValueError, match="save_classifier: pass normalisation"):  # else timm's ImageNet mean/std
        genunlearn.save_classifier(model, folder, ["a", "b", "c", "d"], input_size=(1, 16, 16))
    assert not folder.exists()
    assert genunlearn.save_classifier(model, folder, ["a", "b", "c", "d"], input_size=(1, 16, 16),
                                      normalisation=(0.5, 0.5)) == "timm"
    save_probe(model, folder, (1, 16, 16))
    out = run_alone(f"m = timm.create_model('local-dir:{folder}', pretrained=True)\n"
                    "assert m.pretrained_cfg['label_names'] == ['a', 'b', 'c', 'd']", folder)
    assert "genunlearn imported: False" in out


def test_a_model_timm_did_not_build_is_saved_as_a_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert genunlearn.save_classifier(model, tmp_path / "plain", ["x", "y", "z"]) == "state-dict"
    assert load_file(str(tmp_path / "plain" / "model.safetensors")).keys() == model.state_dict().keys()


@pytest.mark.parametrize("preset_name, loadable", [("vit-digits", "timm"), ("resnet18-digits", "state-dict"),
                                                   ("cnn-digits", "timm-after-import")])
def test_a_classifier_runs_model_folder_loads_as_its_card_says(preset_name, loadable, cache_dir, tmp_path):
    preset = get_preset(preset_name)
    weights = tmp_path / "start.safetensors"
    save_file(build_classifier(preset, 10).state_dict(), str(weights))  # any weights do: the property is the round trip
    run = tmp_path / "run"
    assert main(["forget", "--model", preset_name, "--pretrained", str(weights), "--class", "3", "--method", "finetune",
                 "--set", "steps=1", "--output-dir", str(run)]) == 0
    folder = run / "model"
    unlearned = genunlearn.load_task(preset_name, pretrained=str(folder)).model
    save_probe(unlearned, folder, (1, 8, 8))
    files = (run / "README.md").read_text().split("## Files", 1)[1]
    if loadable == "state-dict":  # the card's recipe for timm and torch alone, run as written
        recipe = files.split("With timm and torch alone:", 1)[1].split("\n\n", 1)[0]
        script = "\n".join(re.findall(r"`([^`]+)`", recipe)).replace("RUN/", f"{run}/")
        assert "timm.create_model(\"resnet18\"" in script
    else:
        assert 'timm.create_model("local-dir:RUN/model")' in files
        assert ("`import genunlearn.models.cnn`" in files) == (loadable == "timm-after-import")
        script = ("import genunlearn.models.cnn\n" if loadable == "timm-after-import" else "") + \
            f"m = timm.create_model('local-dir:{folder}', pretrained=True)"
    out = run_alone(script, folder)
    assert f"genunlearn imported: {loadable == 'timm-after-import'}" in out


def test_a_saved_classifier_scores_the_runs_accuracy_under_timms_own_transforms(cnn_task, tmp_path):
    """The preprocessing comes from the data's transform, so timm's ``resolve_data_config`` + ``create_transform``
    on the image files give the accuracy genunlearn measured on them."""
    from genunlearn.data.folders import image_folder_splits

    root = export_digits_folder(tmp_path / "digits", per_class=30)
    train, test = image_folder_splits(root, default_transform(8, 1))
    folder = tmp_path / "saved"
    assert genunlearn.save_classifier(cnn_task.model, folder, train.classes, data=train) == "timm-after-import"
    model = cnn_task.model.eval()
    with torch.no_grad():
        ours = sum(int(model(image[None]).argmax()) == label for image, label in test) / len(test)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reloaded))
    with torch.no_grad():
        theirs = sum(int(reloaded(transform(Image.open(path))[None]).argmax()) == label
                     for path, label in zip(test.paths, test.targets.tolist())) / len(test)
    assert theirs == ours and ours > 0.9
