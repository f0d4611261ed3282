"""Where pretrained embedded models are cached: ``--cache-dir``, else ``$GENUNLEARN_CACHE``, else the user cache dir."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GENUNLEARN_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genunlearn"
