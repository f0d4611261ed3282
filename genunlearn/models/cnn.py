"""A small BatchNorm CNN for 8x8 digits, registered with timm as ``genunlearn_cnn``."""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (strides 1, 2, 2), global average pool, linear head.

    Input ``[B, in_chans, H, W]``; output logits ``[B, num_classes]``. Follows timm's
    model interface (``forward_features``, ``forward_head``, ``get_classifier``).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * width
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 4 * width, 2),
        )
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


# timm's record of the architecture: no published weights (genunlearn pretrains it), inputs in [-1, 1].
default_cfgs = generate_default_cfgs({
    "genunlearn_cnn": {"num_classes": 10, "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0,
                       "interpolation": "bilinear", "first_conv": "features.0.0", "classifier": "fc"},
})


@register_model
def genunlearn_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """timm entry point; ``pretrained`` loads the folder or hub id given as ``local-dir:``/``hf-hub:`` (no
    published weights exist: genunlearn pretrains it locally)."""
    return build_model_with_cfg(SmallCNN, "genunlearn_cnn", pretrained, **kwargs)
