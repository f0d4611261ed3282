"""Shared fixtures: one pretrained cnn-digits model per test session, cached under a temp dir."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.storage.cache import CACHE_ENV

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The model cache for this session, also exported for subprocess tests."""
    path = tmp_path_factory.mktemp("genunlearn-cache")
    os.environ[CACHE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="session")
def cnn_task(cache_dir, accelerator):
    """cnn-digits pretrained once with its preset recipe (about 10 s on 2 cores)."""
    return load_task("cnn-digits", cache_dir=cache_dir, accelerator=accelerator)


@pytest.fixture(scope="session")
def class3_split(cnn_task):
    return make_forget_split(cnn_task.train_data, cnn_task.test_data, SplitSpec("class", classes=(3,)))
