"""Content hashes of files, each read once: remembered by path, size, inode and change times (in memory and in
``file_hashes.json`` in the run's model cache), so unchanged folders are not re-read and changed ones always are."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from genunlearn.errors import UserError
from genunlearn.storage.cache import cache_root
from genunlearn.storage.files import atomic_write_text

MEMO_FILE = "file_hashes.json"
_memos: dict[Path, dict[str, list]] = {}  # memo file -> {resolved path: [size, inode, mtime, ctime, sha256]}


def _identity(stat: os.stat_result) -> list[int]:
    """What changes when a file's bytes may have: size, inode, modification and status-change times (a rename or a
    copy over the file changes one of them)."""
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def file_hashes(paths: list[Path], cache: Path | None = None) -> list[str]:
    """The SHA-256 of each file's bytes, in order; remembered in ``cache`` (default: ``cache_root()``)."""
    memo_path = (cache or cache_root()) / MEMO_FILE
    memo = _memos.get(memo_path)
    if memo is None:
        memo = _memos[memo_path] = _read_memo(memo_path)
    hashes, changed = [], False
    for path in paths:
        key, identity = str(Path(path).resolve()), _identity(os.stat(path))
        known = memo.get(key)
        if known is None or known[:4] != identity:
            known = [*identity, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
            memo[key], changed = known, True
        hashes.append(known[4])
    if changed:
        try:
            atomic_write_text(memo_path, json.dumps(memo))
        except UserError:
            pass  # an unwritable memo only costs re-reading the files next time
    return hashes


def tree_fingerprint(path: Path, cache: Path | None = None) -> str | None:
    """A 16-hex digest of a file, or of a folder's files (relative paths and contents, links followed), or None when
    ``path`` does not exist."""
    path = Path(path)
    if path.is_file():
        files, names = [path], [path.name]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        names = [str(p.relative_to(path)) for p in files]
    else:
        return None
    digest = hashlib.sha256()
    for name, content in zip(names, file_hashes(files, cache)):
        digest.update(f"{name}:{content}\n".encode())
    return digest.hexdigest()[:16]


def _read_memo(path: Path) -> dict[str, list]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # none yet, or damaged: that only costs re-reading the files
    return memo if isinstance(memo, dict) else {}
