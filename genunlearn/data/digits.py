"""scikit-learn's handwritten digits as an image dataset (embedded: no download).

Images are kept at their native 8x8: upsampling adds no information and multiplies
the compute of every forward pass (4x at 16x16), which matters on a 2-core CPU.
"""

from __future__ import annotations

import torch

from genunlearn.data.tensor_dataset import LabeledTensorDataset

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits_split(resolution: int = 8) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """The fixed, class-stratified train/test split of the 1,797 digits (1,437 / 360).

    Returns datasets of images ``[1, resolution, resolution]`` in [-1, 1] and int labels 0-9.
    """
    from sklearn.datasets import load_digits  # scikit-learn imported on use: it takes a second
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if resolution != 8:
        images = torch.nn.functional.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels.numpy(),
        random_state=DIGITS_SPLIT_SEED,
    )
    classes = [str(d) for d in range(10)]
    train = LabeledTensorDataset(images[train_idx], labels[train_idx], classes)
    test = LabeledTensorDataset(images[test_idx], labels[test_idx], classes)
    return train, test
