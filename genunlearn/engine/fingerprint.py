"""Content hashes of models and datasets, for cache keys."""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from genunlearn.data.folders import ImageFolderDataset
from genunlearn.data.tensor_dataset import LabeledTensorDataset


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_fingerprint(tensors: dict) -> str:
    """SHA-256 (16 hex digits) over a dict of tensors' keys, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name in sorted(tensors, key=str):
        value = tensors[name]
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(_tensor_bytes(value))
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) over every state-dict entry's name, dtype, shape and bytes."""
    return tensors_fingerprint(model.state_dict())


def text_encoder_fingerprints(holder) -> list[str]:
    """``model_fingerprint`` of each text encoder a text-to-image pipeline or task holds (``text_encoder``, and SD-XL's
    ``text_encoder_2``, SD3's ``text_encoder_3``)."""
    return [model_fingerprint(getattr(holder, name)) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(holder, name, None) is not None]


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """A content hash for the datasets genunlearn builds (subsets of them included); None if unknown."""
    if isinstance(dataset, Subset):
        base = dataset_fingerprint(dataset.dataset)
        if base is None:
            return None
        indices = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return hashlib.sha256(base.encode() + _tensor_bytes(indices)).hexdigest()[:16]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_fingerprint(part) for part in dataset.datasets]
        if None in parts:
            return None
        return hashlib.sha256(("concat:" + ",".join(parts)).encode()).hexdigest()[:16]
    if isinstance(dataset, LabeledTensorDataset):
        return hashlib.sha256(_tensor_bytes(dataset.images) + _tensor_bytes(dataset.targets)).hexdigest()[:16]
    if isinstance(dataset, ImageFolderDataset):
        return dataset.fingerprint()
    return None
