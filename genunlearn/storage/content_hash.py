"""Content hashes of files, each read once: remembered by path, size, inode and change times (in memory and in
``file_hashes.json`` under the model cache), so unchanged folders are not re-read and changed ones always are."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from genunlearn.errors import UserError
from genunlearn.storage.cache import cache_root
from genunlearn.storage.files import atomic_write_text

MEMO_FILE = "file_hashes.json"
_memo: dict[str, list] = {}


def _identity(stat: os.stat_result) -> list[int]:
    """What changes when a file's bytes may have: size, inode, modification and status-change times (a rename or a
    copy over the file changes one of them)."""
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def file_hashes(paths: list[Path]) -> list[str]:
    """The SHA-256 of each file's bytes, in order."""
    memo_path = cache_root() / MEMO_FILE
    if not _memo and memo_path.is_file():
        try:
            _memo.update(json.loads(memo_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            pass  # a damaged memo only costs re-reading the files
    hashes, changed = [], False
    for path in paths:
        key, identity = str(Path(path).resolve()), _identity(os.stat(path))
        known = _memo.get(key)
        if known is None or known[:4] != identity:
            known = [*identity, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
            _memo[key], changed = known, True
        hashes.append(known[4])
    if changed:
        try:
            atomic_write_text(memo_path, json.dumps(_memo))
        except UserError:
            pass  # an unwritable memo only costs re-reading the files next time
    return hashes
