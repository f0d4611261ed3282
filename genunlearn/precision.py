"""The numerics a run computes in: device type, mixed precision and TF32, set explicitly (fp32 with TF32 off unless
asked), the same for the model before and after, and recorded in reports and cache keys.

``--mixed_precision auto`` is the one setting that takes accelerate's (the launcher's ``--mixed_precision`` or
``accelerate config``); every other value, the default ``no`` included, overrides it. TF32 (NVIDIA Ampere and
later: float32 matrix products and convolutions on a 10-bit mantissa) is off unless ``tf32`` asks for it; torch's
own default turns it on for cuDNN convolutions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from genunlearn.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line's parser stays light
    from accelerate import Accelerator

MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")


def accelerate_mixed_precision(setting: str | None) -> str | None:
    """The ``Accelerator(mixed_precision=...)`` argument for a genunlearn setting (None: ``no``; ``auto``: None, so
    that accelerate reads the launcher's); a UserError for an unknown one."""
    setting = "no" if setting is None else setting
    if setting not in MIXED_PRECISIONS:
        raise UserError(f"unknown --mixed-precision {setting!r}; use {', '.join(MIXED_PRECISIONS)} (auto: the launcher's)")
    return None if setting == "auto" else setting


def _backends() -> list:
    """The TF32-switchable backends that have the per-backend ``fp32_precision`` setting (torch 2.9 and later)."""
    import torch

    return [b for b in (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
            if hasattr(b, "fp32_precision")]


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for float32 matrix products and cuDNN convolutions (a no-op on a CPU)."""
    import torch

    backends = _backends()
    if backends:
        for backend in backends:
            backend.fp32_precision = "tf32" if enabled else "ieee"
    else:  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether float32 matrix products or cuDNN convolutions may run in TF32 (``none`` follows torch's global
    setting, which is IEEE unless changed)."""
    import torch

    backends = _backends()
    if backends:
        inherited = getattr(torch.backends, "fp32_precision", "none")
        return any(b.fp32_precision == "tf32" or (b.fp32_precision == "none" and inherited == "tf32") for b in backends[:2])
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def numerics(accelerator: Accelerator) -> dict:
    """What a result depends on beside its inputs and seed: ``{"device_type", "mixed_precision", "tf32", "noise"}``
    (``tf32``: whether it applies, so always False off a CUDA device; ``noise``: the scheme of ``genunlearn.noise``).
    Part of every cache key and of every report's ``environment``."""
    from genunlearn.noise import SCHEME

    device = accelerator.device.type
    return {"device_type": device, "mixed_precision": str(accelerator.mixed_precision),
            "tf32": device == "cuda" and tf32_enabled(), "noise": SCHEME}


def numerics_tag(accelerator: Accelerator) -> str:
    """``numerics`` as a short name for cache folders, e.g. ``cpu-no-cpu-streams-1`` or ``cuda-bf16-tf32-...``."""
    record = numerics(accelerator)
    tf32 = "-tf32" if record["tf32"] else ""
    return f"{record['device_type']}-{record['mixed_precision']}{tf32}-{record['noise']}"
