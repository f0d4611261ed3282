"""The README's "Use your own model" code blocks run as written (on a tiny UNet folder, a tiny DiTPipeline folder and a
tiny SD-1.5-shaped pipeline folder standing in for the user's, facebook/DiT-XL-2-256 and Stable Diffusion v1.5), and do
what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTPipeline, StableDiffusionPipeline, UNet2DModel
from helpers import tiny_class_unet, tiny_dit_pipeline, tiny_sd15_pipeline

README = Path(__file__).parents[1] / "README.md"
HUB_DIT = "facebook/DiT-XL-2-256"
HUB_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def readme_blocks(section: str) -> list[str]:
    """The python code blocks of the README section titled ``section``, in order."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_use_your_own_model_blocks_run(cache_dir, tmp_path, monkeypatch):
    tiny_class_unet().save_pretrained(tmp_path / "my-ddpm" / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "my-ddpm" / "scheduler")
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    monkeypatch.chdir(tmp_path)

    classifier, unet, dit, sd = readme_blocks("Use your own model")
    assert HUB_DIT in dit
    scope: dict = {}
    exec(classifier, scope)
    after = scope["genunlearn"].evaluate_classifier(scope["result"].model, scope["split"])
    assert after["forget_acc"] <= 0.05 and after["retain_acc"] >= 0.95

    exec(unet, scope)
    assert scope["scores"].evaluation["fid_reference"] == "original model's samples"
    assert scope["scores"].metrics["fid_remain"] is not None
    saved = UNet2DModel.from_pretrained(tmp_path / "forgot-3" / "unet")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), scope["result"].model.state_dict().values()))

    exec(dit.replace(HUB_DIT, str(tmp_path / "dit")), scope)
    original = DiTPipeline.from_pretrained(tmp_path / "dit").transformer.state_dict()
    assert scope["pipe"].transformer is scope["result"].model
    assert any(not torch.equal(v, original[k]) for k, v in scope["pipe"].transformer.state_dict().items())

    tiny_sd15_pipeline(["Image of parachute", "Image of church", "Image of golf ball"]).save_pretrained(tmp_path / "sd")
    assert HUB_SD in sd
    exec(sd.replace(HUB_SD, str(tmp_path / "sd")), scope)
    original = StableDiffusionPipeline.from_pretrained(tmp_path / "sd").unet.state_dict()
    assert scope["pipe"].unet is scope["result"].model and scope["result"].steps == 20
    assert any(not torch.equal(v, original[k]) for k, v in scope["pipe"].unet.state_dict().items())
    assert scope["task"].train_data.targets.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # 8 generations of each prompt


def test_the_one_minute_text_to_image_block_moves_the_concepts_prediction_towards_esds_target(tmp_path, monkeypatch):
    """The README's toy-pipeline block runs as written; on fixed noise, the erased UNet's ε for the concept is nearer
    ESD's target ε(∅) − (ε(c) − ε(∅)) of the original than the original's own (ESD-u trains the layers every prompt
    uses, so on an untrained model a kept prompt's ε moves as much: the toy shows the route, not selectivity)."""
    monkeypatch.chdir(tmp_path)
    (block,) = readme_blocks("Erase a concept from a text-to-image model")
    scope: dict = {}
    exec(block, scope)
    pipe, concept, kept = scope["pipe"], scope["concept"], scope["kept"]
    original = scope["genunlearn"].tiny_stable_diffusion([concept, *kept]).unet.eval()
    assert scope["image"].size == (32, 32)

    def embedded(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids)[0].expand(16, -1, -1)

    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(16, 4, 4, 4, generator=generator), torch.randint(0, 1000, (16,), generator=generator)
    with torch.no_grad():
        c, null = embedded(concept), embedded("")
        target = 2 * original(x, t, null).sample - original(x, t, c).sample
        gap = [float((unet.eval()(x, t, c).sample - target).pow(2).mean()) for unet in (original, pipe.unet)]
    assert gap[1] < 0.95 * gap[0], gap
