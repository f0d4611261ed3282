"""An erasure's weight change as a LoRA (peft's layout, saved and loaded by diffusers): per Linear and Conv2d layer whose
weight changed, a truncated SVD of ``erased - original`` at a given rank, and where every adapted layer has a bias, the
bias change in ``lora_B``'s bias; ``pipe.load_lora_weights(folder)`` switches the erasure on,
``pipe.unload_lora_weights()`` off again, ``pipe.fuse_lora()`` merges it.

What a LoRA cannot carry stays behind and is reported: normalisation layers' affine changes, bias changes it does not
carry, and any other parameter outside a Linear or Conv2d. A conv kernel's change ``[out, in, kh, kw]`` is factored as ``[out, in·kh·kw]``: ``lora_A``
is a kh x kw conv to the rank, ``lora_B`` a 1x1 conv back (peft's Conv2d LoRA)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class LoraExport:
    """``layers``: peft-named tensors (``<module>.lora_A.weight``, ``.lora_B.weight``, ``.lora_B.bias``); ``ranks``: per
    module; ``relative_error``: ||ΔW - B·A||_F / ||ΔW||_F over every factored weight (0: exact); ``left_out``: names
    of changed parameters a LoRA does not carry (norms and the like)."""

    layers: dict[str, torch.Tensor]
    ranks: dict[str, int]
    relative_error: float
    left_out: list[str]

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.layers.values())

    def merged_into(self, original: nn.Module) -> nn.Module:
        """A copy of ``original`` with every layer's LoRA added to its weights (and bias): what the LoRA-loaded
        pipeline computes, as plain weights."""
        merged = copy.deepcopy(original)
        with torch.no_grad():
            for module_name in self.ranks:
                module = merged.get_submodule(module_name)
                down, up = self.layers[f"{module_name}.lora_A.weight"], self.layers[f"{module_name}.lora_B.weight"]
                delta = (up.flatten(1) @ down.flatten(1)).view_as(module.weight)
                module.weight += delta.to(module.weight.dtype)
                if module.bias is not None and f"{module_name}.lora_B.bias" in self.layers:
                    module.bias += self.layers[f"{module_name}.lora_B.bias"].to(module.bias.dtype)
        return merged


@torch.no_grad()
def lora_from_delta(original: nn.Module, erased: nn.Module, rank: int, biases: bool | None = None) -> LoraExport:
    """The LoRA of ``erased - original`` (same architecture) at ``rank`` (at most each layer's full rank). ``biases``:
    carry the bias changes in ``lora_B``'s bias (peft's ``lora_bias``, which then applies to every adapted layer):
    None carries them when every adapted layer has a bias, so that ``pipe.fuse_lora()`` can still merge the LoRA;
    True always (exact, but a layer without a bias then cannot be fused: Stable Diffusion's attention projections);
    False never. Bias changes not carried are listed in ``left_out``."""
    if rank < 1:
        raise ValueError(f"a LoRA rank is at least 1, got {rank}")
    before, after = dict(original.named_parameters()), dict(erased.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    adapted = [(name, module) for name, module in erased.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in changed]
    if biases is None:
        biases = all(module.bias is not None for _, module in adapted)
    layers, ranks, carried = {}, {}, set()
    residual = total = 0.0
    for module_name, module in adapted:
        delta = (after[f"{module_name}.weight"] - before[f"{module_name}.weight"]).double()
        flat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        kept = min(rank, len(s))
        up, down = u[:, :kept] * s[:kept].sqrt(), s[:kept].sqrt()[:, None] * vh[:kept]
        residual += float((flat - up @ down).pow(2).sum())
        total += float(flat.pow(2).sum())
        if isinstance(module, nn.Conv2d):
            up, down = up[:, :, None, None], down.view(kept, *delta.shape[1:])
        layers[f"{module_name}.lora_A.weight"] = down.float().contiguous()
        layers[f"{module_name}.lora_B.weight"] = up.float().contiguous()
        if biases and module.bias is not None:
            layers[f"{module_name}.lora_B.bias"] = (after[f"{module_name}.bias"] - before[f"{module_name}.bias"]).float()
            carried.add(f"{module_name}.bias")
        elif biases:  # lora_bias gives every adapted layer's lora_B a bias: zeros keep a bias-less layer exact
            layers[f"{module_name}.lora_B.bias"] = torch.zeros(delta.shape[0])
        ranks[module_name] = kept
        carried.add(f"{module_name}.weight")
    return LoraExport(layers, ranks, (residual / total) ** 0.5 if total else 0.0, sorted(changed - carried))


def save_lora(pipeline_class: type, export: LoraExport, folder: Path) -> Path:
    """Write ``export`` as the denoiser's LoRA (the UNet's, SD3's transformer's) with ``pipeline_class.save_lora_weights``
    (``pytorch_lora_weights.safetensors`` in ``folder``); returns the folder."""
    denoiser = "transformer" if "transformer" in pipeline_class._lora_loadable_modules else "unet"
    pipeline_class.save_lora_weights(str(folder), **{f"{denoiser}_lora_layers": export.layers}, safe_serialization=True)
    return folder


def export_lora(task, erased: nn.Module, rank: int, folder: str | Path, biases: bool | None = None) -> LoraExport:
    """Export the change from a text-to-image task's denoiser to ``erased`` as a LoRA in ``folder``, loadable onto the
    original pipeline with ``pipe.load_lora_weights(folder)`` (diffusers with peft); returns the export (ranks, the
    relative error of the factored weights, what it leaves out). ``biases``: see ``lora_from_delta``."""
    export = lora_from_delta(task.model, erased, rank, biases)
    save_lora(task.pipeline_class, export, Path(folder))
    return export
