"""The on-disk kernel cache shared by backends.

Loading follows try_load -> lock -> try_load -> build -> load, so concurrent processes build an
entry once. Entries are text with a checked hash (never pickle); a missing or corrupt entry is a
miss, not a crash.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from .. import config

_HEADER = "# ssmc-cache sha256="


def cache_root(backend: str) -> Path:
    root = config.cache_dir() / backend
    root.mkdir(parents=True, exist_ok=True)
    return root


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def read_checked(path: Path) -> str | None:
    """The entry's body if the file exists and its hash line matches; otherwise None."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    first, _, body = text.partition("\n")
    if not first.startswith(_HEADER) or first[len(_HEADER):] != _digest(body):
        return None
    return body


def write_checked(path: Path, body: str) -> None:
    """Atomic write: a reader sees the old entry, the new entry, or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HEADER}{_digest(body)}\n{body}")
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock beside `path` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_or_build_text(path: Path, build) -> tuple[str, bool]:
    """Return (body, built_now). `build()` makes the body when no valid entry exists."""
    body = read_checked(path)
    if body is not None:
        return body, False
    with file_lock(path):
        body = read_checked(path)
        if body is not None:
            return body, False
        body = build()
        write_checked(path, body)
        return body, True
