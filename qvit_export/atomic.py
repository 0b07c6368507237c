"""Atomic file writes: write beside the target, rename on success, leave nothing behind on failure."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import QvitError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise QvitError(f"{path} is a directory: give a file name")
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # folders we make, deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _remove_empty(created)
        raise QvitError(f"cannot write to {path.parent} ({e.strerror}): choose a writable output path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Undo the folders a failed write created (those still empty), deepest first."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
