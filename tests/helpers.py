"""Small builders shared by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DModel,
)
from PIL import Image

from genunlearn.data.digits import load_digits_split
from genunlearn.eval.report import SCHEMA_FILE
from genunlearn.models.tiny_sd import tiny_stable_diffusion


def export_digits_folder(root: Path, per_class: int = 12, empty_class: int | None = None) -> Path:
    """Write a few digits per class as PNGs in ROOT/{train,test}/<class>/; ``empty_class`` gets a folder but no images."""
    train, test = load_digits_split()
    for split_name, data in (("train", train), ("test", test)):
        counts = {c: 0 for c in range(10)}
        for c in range(10):
            (root / split_name / f"digit{c}").mkdir(parents=True, exist_ok=True)
        for image, label in zip(data.images, data.targets.tolist()):
            if label == empty_class or counts[label] >= per_class:
                continue
            pixels = ((image[0] + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
            Image.fromarray(pixels, mode="L").save(root / split_name / f"digit{label}" / f"{counts[label]:03d}.png")
            counts[label] += 1
    return root


def interrupted_at(step_fn, step: int):
    """``step_fn``, except that reaching 0-based ``step`` raises KeyboardInterrupt (a Ctrl-C mid-run)."""

    def stepped(ctx):
        if ctx.step == step:
            raise KeyboardInterrupt
        return step_fn(ctx)

    return stepped


def validate_report(report: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``report`` follows genunlearn's report.json schema."""
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))


def accelerate_command(script: Path, args: list[str], *, processes: int = 2, port: int = 29517) -> list[str]:
    """The command running ``script args`` under ``accelerate launch`` on the CPU (``processes`` > 1: gloo, ``--multi_gpu``)."""
    flags = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), str(script), *args]


def accelerate_launch(script: Path, args: list[str], cache_dir: Path, *, processes: int = 2,
                      port: int = 29517) -> subprocess.CompletedProcess:
    """Run ``accelerate_command`` with ``cache_dir`` as the model cache; output captured."""
    return subprocess.run(accelerate_command(script, args, processes=processes, port=port), capture_output=True, text=True,
                          env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir)})


def exact_text(*files: Path) -> str:
    """The files' text as written, joined (``read_text`` would turn carriage returns into newlines)."""
    return b"".join(path.read_bytes() for path in files).decode()


def forgotten_mark_pixels(picture: Path) -> int:
    """How many pixels of ``picture`` have the red that marks forgotten rows in a samples figure."""
    from genunlearn.eval.grids import FORGOTTEN_COLOUR

    red = torch.tensor([int(FORGOTTEN_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    with Image.open(picture) as image:
        pixels = torch.tensor(list(image.convert("RGB").getdata()))
    return int(((pixels - red).abs().max(dim=1).values <= 8).sum())


def unreadable_files(folder: Path) -> list[str]:
    """Files under ``folder`` whose mode is stricter than a plain write under the current umask gives."""
    mask = os.umask(0)
    os.umask(mask)
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_mode & 0o666 != 0o666 & ~mask]


TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 1,
            "sample_size": 4, "patch_size": 2}


def tiny_dit_pipeline() -> DiTPipeline:
    """A 1000-class latent DiTPipeline with random weights: a 1-layer DiT on 4x4x4 latents and a tiny VAE (8x8 RGB)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=8)
    return DiTPipeline(transformer=DiTTransformer2DModel(**TINY_DIT, num_embeds_ada_norm=1000), vae=vae,
                       scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))


def tiny_class_unet(num_classes: int = 10) -> UNet2DModel:
    """A class-conditional UNet on 8x8 grey images with random weights (seed 0): ``num_classes`` class embeddings and
    the null class of guidance as the last one."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_classes + 1)


def tiny_sd15_pipeline(prompts: list[str]) -> StableDiffusionPipeline:
    """A pipeline with SD 1.5's component classes and config keys at tiny sizes, whose tokenizer knows the words of
    ``prompts``: RGB 32x32 images, a 4-level VAE (8x down to 4x4x4 latents, scaling 0.18215), a UNet of SD 1.5's block
    types, SD 1.5's PNDM scheduler config."""
    pipeline = tiny_stable_diffusion(prompts)
    sd15_scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                                   steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                                   unet=pipeline.unet, scheduler=sd15_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


SHAPES = ("circle", "cross", "ring", "square", "triangle")


def shapes_folder(root: Path, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    """A user's 5-class RGB image folder ROOT/{train,test}/<shape>/*.png (``per_class`` train images per class, a
    quarter as many test): a shape of a random colour, size and position on a random dark background."""
    from PIL import ImageDraw

    generator = torch.Generator().manual_seed(seed)

    def draw(shape: str) -> Image.Image:
        r = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
        image = Image.new("RGB", (size, size), (r(0, 60), r(0, 60), r(0, 60)))
        pen, colour = ImageDraw.Draw(image), (r(150, 256), r(150, 256), r(150, 256))
        half, cx, cy = r(size // 5, size // 3), r(size // 3, 2 * size // 3), r(size // 3, 2 * size // 3)
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            pen.ellipse(box, fill=colour)
        elif shape == "ring":
            pen.ellipse(box, outline=colour, width=max(2, half // 3))
        elif shape == "square":
            pen.rectangle(box, fill=colour)
        elif shape == "triangle":
            pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:
            pen.line((box[0], box[1], box[2], box[3]), fill=colour, width=3)
            pen.line((box[0], box[3], box[2], box[1]), fill=colour, width=3)
        return image

    for split, count in (("train", per_class), ("test", max(2, per_class // 4))):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw(shape).save(folder / f"{index:03d}.png")
    return root


def text_to_image_methods(unet_only: tuple[str, ...] = ("rece", "uce")) -> list[str]:
    """The registered methods that apply to SD-XL and SD3 models, less ``unet_only`` (pass ``()`` for a UNet's): the
    closed-form editors of a UNet's cross-attention, which an MMDiT lacks. AdvUnlearn and uce_adv, whose attacks live in
    SD 1.x/2.x's one CLIP encoder, are never among them."""
    from genunlearn.methods.registry import METHODS

    return sorted(name for name, spec in METHODS.items()
                  if (spec.kinds is None or "text-to-image" in spec.kinds) and name not in (*unet_only, "advunlearn", "uce_adv"))


def changed_by_two_iterations(task, forget: list[int], method: str, accelerator) -> list[str]:
    """The names of ``task.model``'s entries that ``method`` changed in 2 iterations of batch 2 erasing the prompt ids
    ``forget`` (ESD sampling x_t in 2 steps), after asserting every entry of the result is finite."""
    import genunlearn as gu

    import dataclasses

    from genunlearn.methods.registry import get_method

    split = gu.forget_split(task, classes=forget)
    wanted = {"steps": 2, "batch_size": 2, "epochs": None, "ddim_steps": 2}  # what the method has of them
    settings = {k: v for k, v in wanted.items() if k in {f.name for f in dataclasses.fields(get_method(method).config_class)}}
    after = gu.unlearn(task, split, method, accelerator=accelerator, **settings).model.state_dict()
    before = task.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    return [k for k in before if not torch.equal(before[k], after[k])]
