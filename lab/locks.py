"""Advisory file locks across processes (flock): every lock of the lab and of its harnesses.

The kernel drops a flock when its file is closed or its process dies, however it dies, so a
killed holder never leaves a stale lock behind.

    with file_lock(cache / ".key.lock"):      # wait for the lock, hold it for the block
        ...
    held = try_lock(run / ".owner")            # take it now or get None; held while `held` is open
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created, with its folder) for the block; waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def try_lock(path: Path, mode: str = "a") -> IO | None:
    """The open file of `path` holding an exclusive lock, taken without waiting; None when another
    process (or another open file of this one) holds it. The lock lasts until the file is closed."""
    f = open(path, mode)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def held_elsewhere(path: Path) -> bool:
    """Whether another open file holds a lock on `path` now: a shared lock is tried and dropped
    at once, so the caller never waits and never keeps the lock."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
