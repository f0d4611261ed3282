"""FID: the two libraries agree on the same features, a set against itself is ~0, and FID grows with noise."""

from __future__ import annotations

import pytest
import torch

from genunlearn import UserError
from genunlearn.eval.fid import ClassifierFeatures, InceptionFeatures, extract_features, fid_from_features, frechet_distance


def _features(seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, 16, generator=torch.Generator().manual_seed(99)) / 4
    return (torch.randn(400, 16, generator=generator, dtype=torch.float64) @ mixing.double()) * scale + shift


def test_clean_fid_and_torchmetrics_agree_on_the_same_features():
    real = _features(0)
    for generated in (_features(1), _features(2, shift=0.3), _features(3, scale=1.5)):
        ours, theirs = fid_from_features(real, generated, "torchmetrics"), fid_from_features(real, generated, "clean-fid")
        assert ours > 0 and abs(ours - theirs) <= 1e-3 * ours


def test_fid_of_a_set_against_itself_is_zero():
    real = _features(0)
    for library in ("torchmetrics", "clean-fid"):
        assert fid_from_features(real, real, library) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="unknown FID library"):
        fid_from_features(real, real, "pytorch-fid")


def test_fid_grows_with_noise(cnn_task):
    """cnn-digits features: test digits with more and more Gaussian noise drift further from the training digits."""
    features = ClassifierFeatures(cnn_task.model)
    real = torch.stack([cnn_task.train_data[i][0] for i in range(len(cnn_task.train_data))])
    test = torch.stack([cnn_task.test_data[i][0] for i in range(len(cnn_task.test_data))])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(test.shape, generator=generator)
    reference = extract_features(real, features)
    values = [fid_from_features(reference, extract_features((test + sigma * noise).clamp(-1, 1), features))
              for sigma in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert values == sorted(values) and values[-1] > 10 * values[0]
    assert frechet_distance(real, test, features) == pytest.approx(values[0], rel=1e-9)


def test_inception_needs_local_weights(tmp_path):
    with pytest.raises(UserError, match="no Inception weights"):
        InceptionFeatures(tmp_path / "missing.pth")
