"""Folder locks: one genunlearn process at a time writes an output folder or fills a cache entry.

The lock is a file beside the folder (``.NAME.lock``) created with ``O_EXCL`` and holding the owner's pid and host.
A lock whose owner process is gone (same host) is stale: it is taken over, with a message."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from genunlearn.errors import UserError

WRITING_GRACE_S = 10.0  # a lock file still empty this long after its creation belongs to a process that died writing it


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``, beside its resolved path: a link to a folder shares the folder's lock."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _owner(path: Path) -> dict | None:
    """The lock's owner record; ``{}`` while its creator is still writing it; None once the file is gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def _is_stale(path: Path, owner: dict) -> bool:
    if not owner:
        try:
            return time.time() - path.stat().st_mtime > WRITING_GRACE_S
        except FileNotFoundError:
            return False
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take_over(path: Path, owner: dict) -> None:
    """Remove a stale lock, atomically (a rename only one taker wins), and say so."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    aside.unlink(missing_ok=True)
    print(f"taking over the stale lock {path} (its owner, pid {owner.get('pid', '?')}, is no longer running)",
          file=sys.stderr, flush=True)


def acquire(folder: Path, *, wait: bool, poll_s: float = 0.5) -> Path:
    """Create ``folder``'s lock file. A live owner's lock: a UserError naming it, or (``wait``) poll until it goes."""
    folder = Path(folder)
    path = lock_path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; choose another folder")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not path.parent.is_dir():
                raise UserError(f"cannot create {folder}: {path.parent} is a file; choose another folder") from None
            owner = _owner(path)
            if owner is None:
                continue
            if _is_stale(path, owner):
                _take_over(path, owner)
                continue
            if not wait:
                raise UserError(f"{folder} is in use by another genunlearn run (pid {owner.get('pid', '?')} on "
                                f"{owner.get('host', '?')}); wait for it to finish or choose another --output-dir "
                                f"(a lock left by a crash on another machine: delete {path})") from None
            time.sleep(poll_s)
            continue
        except OSError as exc:
            raise UserError(f"cannot write {folder} ({exc.strerror}: {exc.filename}); choose a writable folder") from None
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, handle)
        return path


def release(path: Path) -> None:
    """Remove the lock file if this process still owns it."""
    owner = _owner(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def main_process_lock(folder: Path, accelerator: Accelerator, *, wait: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock on the main process for the block; every process raises the same UserError when it is
    held by another run (``wait=False``)."""
    held, failure = None, [None]
    if accelerator.is_main_process:
        try:
            held = acquire(folder, wait=wait)
        except UserError as exc:
            failure = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise UserError(failure[0])
    try:
        yield
    finally:
        if held is not None:
            release(held)
