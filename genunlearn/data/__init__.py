"""Datasets (embedded digits, image folders) and forget splits."""

from genunlearn.data.digits import load_digits_split
from genunlearn.data.folders import ImageFolderDataset, default_transform
from genunlearn.data.split import ForgetSplit, SplitSpec, make_forget_split
from genunlearn.data.tensor_dataset import LabeledDataset, LabeledTensorDataset

__all__ = [
    "ForgetSplit",
    "ImageFolderDataset",
    "LabeledDataset",
    "LabeledTensorDataset",
    "SplitSpec",
    "default_transform",
    "load_digits_split",
    "make_forget_split",
]
