"""Atomic file writes: write beside the target, rename on success, leave nothing behind on failure.

Temporary files are named ``.<target name>.<random>.tmp`` in the target's folder, so the next run that writes
the same target recognises (and removes) what a killed run left (transaction.py).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from pathlib import Path

from .errors import QvitError

_WHY = {errno.ENOSPC: ("the disk is full", "free space"), errno.EDQUOT: ("the disk quota is exceeded", "free space"),
        errno.EFBIG: ("the file is too large for this file system or process limit", "write elsewhere"),
        errno.EACCES: ("permission denied", "choose a writable output path"),
        errno.EPERM: ("permission denied", "choose a writable output path"),
        errno.EROFS: ("read-only file system", "choose a writable output path"),
        errno.ENOENT: ("a file or folder was removed while it was written", "run again"),
        errno.EIO: ("input/output error", "check the disk")}
_RANDOM = "[a-z0-9_]" * 8  # tempfile.mkstemp's random part: 8 of these characters, never a dot


def temp_pattern(path: Path) -> str:
    """The glob of the temporary files written for ``path`` (in its folder), and of no other file's."""
    return f".{glob.escape(path.name)}.{_RANDOM}.tmp"


def evidence_path(report_path) -> Path:
    """Where a failed run puts its report: ``x.parity.json`` -> ``x.parity.failed.json``, never over the report
    of the output still in place."""
    report_path = Path(report_path)
    return report_path.with_name(report_path.name.removesuffix(".json") + ".failed.json")


def io_error(path, exc: BaseException) -> QvitError:
    """One line for a failed write of ``path``: what the system said and what to do."""
    if isinstance(exc, OSError):
        why, todo = _WHY.get(exc.errno, (exc.strerror or type(exc).__name__, "choose another output path"))
    else:  # torch.save reports a failed write as RuntimeError("... file write failed") and loses errno
        why, todo = "the write failed (is the disk full?)", "free space or choose another output path"
    return QvitError(f"cannot write {path}: {why}; {todo} (nothing was replaced)")


def is_write_failure(exc: BaseException) -> bool:
    # torch.save's zip writer: "PytorchStreamWriter failed writing ...", "[enforce fail at inline_container.cc] ..."
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and any(
        marker in str(exc) for marker in ("PytorchStreamWriter", "inline_container", "file write failed")))


def make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing folders; return them deepest first (to undo with ``remove_empty``)."""
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(created)
        raise io_error(path, e) from None
    return created


def temp_beside(path: Path) -> Path:
    """A new, empty temporary file next to ``path`` (mode from the umask, not mkstemp's private 0600)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise io_error(path, e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise QvitError(f"{path} is a directory: give a file name")
    created = make_parents(path)
    try:
        tmp = temp_beside(path)
    except QvitError:
        remove_empty(created)
        raise
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        if is_write_failure(e):
            raise io_error(path, e) from None
        raise


def remove_empty(folders: list[Path]) -> None:
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
