"""FID between image sets: features from one extractor, the Fréchet distance from torchmetrics or clean-fid.

Extractors: a classifier's pooled pre-logit features (the offline default: the task's classifier, or any timm
model through ``PreparedClassifier``), or the FID Inception-v3 from a local weights file. Both libraries get
the very same feature matrices, so they differ only in their matrix square root (torchmetrics: eigenvalues
of Σ₁Σ₂; clean-fid: scipy's sqrtm).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from genunlearn.errors import UserError
from genunlearn.eval.pixels import uint8_rgb
from genunlearn.models.peft import classifier_head

FEATURE_BATCH = 512
FID_LIBRARIES = {"torchmetrics": "torchmetrics", "clean-fid": "clean-fid"}  # name -> distribution
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class ClassifierFeatures(nn.Module):
    """A classifier's pre-logit features ``[B, num_features]`` for images in [-1, 1]: a timm-style model's pooled
    ``forward_head(..., pre_logits=True)``, or for any other model the input of its last ``nn.Linear`` (its head)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.timm_style = hasattr(classifier, "forward_head") and hasattr(classifier, "num_features")
        if self.timm_style:
            self.num_features = int(classifier.num_features)
            return
        self.head = classifier_head(classifier)
        self.num_features = self.head.in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.timm_style:
            return self.classifier.forward_head(self.classifier.forward_features(images), pre_logits=True)
        captured = []
        hook = self.head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
        try:
            self.classifier(images)
        finally:
            hook.remove()
        return captured[-1].flatten(1)


def check_inception_file(weights: str | Path) -> None:
    """A UserError naming the FID Inception-v3's weights file unless it is at ``weights``."""
    if not Path(weights).is_file():
        raise UserError(
            f"no Inception weights at {weights}; download {INCEPTION_WEIGHTS_FILE} (torch-fidelity's release) where "
            "there is a network and pass its path, or use the classifier's features (the default)"
        )


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 (torch-fidelity's port of the TF graph, as torchmetrics uses it): 2048-d pool features
    of images ``[B, C, H, W]`` in [-1, 1] (grey images repeated to RGB, quantised to uint8 like saved PNGs)."""

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        check_inception_file(weights)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(uint8_rgb(images)).reshape(len(images), -1)


class _Precomputed(nn.Module):
    """Passes feature rows through, so torchmetrics' metric consumes features we extracted once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: nn.Module) -> torch.Tensor:
    """``[N, D]`` float64 features (CPU) of images ``[N, C, H, W]`` in [-1, 1], batched on the extractor's device."""
    device = next(extractor.parameters()).device
    parts = [extractor(images[i : i + FEATURE_BATCH].to(device)).double().cpu() for i in range(0, len(images), FEATURE_BATCH)]
    return torch.cat(parts)


def fid_from_features(real: torch.Tensor, generated: torch.Tensor, library: str = "torchmetrics") -> float:
    """FID between two feature sets ``[N, D]``, ``[M, D]`` (N, M >= 2) computed by ``library``; clamped at 0 (a set
    against itself can come out at -1e-13 from rounding)."""
    if library == "torchmetrics":
        metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
        metric.update(real.double(), real=True)
        metric.update(generated.double(), real=False)
        value = float(metric.compute())
    elif library == "clean-fid":
        from cleanfid.fid import fid_from_feats

        value = float(fid_from_feats(real.double().numpy(), generated.double().numpy()))
    else:
        raise UserError(f"unknown FID library {library!r}; use {' or '.join(FID_LIBRARIES)}")
    return max(0.0, value)


def bootstrap_fid_std(real: torch.Tensor, generated: list[torch.Tensor], library: str = "torchmetrics", draws: int = 50,
                      seed: int = 0) -> float:
    """The FID's sampling spread from the generated side: its standard deviation over ``draws`` resamplings (with
    replacement, within each group of ``generated``, e.g. one ``[N_c, D]`` per class) against the fixed ``real``
    features ``[N, D]``. An estimate of the FID's standard error at this sample size."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        resampled = [group[torch.randint(len(group), (len(group),), generator=generator)] for group in generated]
        values.append(fid_from_features(real, torch.cat(resampled), library))
    return float(torch.tensor(values).std())


def frechet_distance(real: torch.Tensor, generated: torch.Tensor, features: nn.Module, library: str = "torchmetrics") -> float:
    """FID between ``real`` and ``generated`` images ``[N, C, H, W]`` in [-1, 1] under ``features``."""
    return fid_from_features(extract_features(real, features), extract_features(generated, features), library)


def library_version(library: str) -> str:
    """``"<library> <version>"`` for reports."""
    return f"{library} {version(FID_LIBRARIES[library])}"

