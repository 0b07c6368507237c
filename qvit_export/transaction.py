"""The files one run writes, replaced together or not at all.

``OutputSet`` is what makes an export a transaction:
- before any work: output paths that coincide with each other or with an input are refused, and so are
  folders where a file is expected; each output is locked (``fcntl.flock`` on ``.<name>.lock`` beside it,
  released by the kernel even after SIGKILL), so a second run to the same outputs refuses with one line;
  temporary files that a killed run left for these outputs (``.<name>.<random>.tmp``) are removed;
- during the run every output is written to a staged temporary file beside its target (same file system);
- ``commit()`` hard-links each existing target aside, renames every staged file into place and removes the
  files that would now describe another output (e.g. an old parity report after ``--no-parity``), with
  SIGINT/SIGTERM held back; if a rename fails, the targets already replaced are put back;
- leaving without a commit (an error, a signal) removes every staged file: what was there stays byte-identical.
A SIGKILL in the middle of ``commit()`` (a few renames) is the one window it cannot close.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from . import interrupts
from .atomic import io_error, make_parents, remove_empty, temp_beside, temp_pattern
from .errors import QvitError


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_paths(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, outputs that coincide with each other or with an input (one-file commands)."""
    OutputSet(outputs, inputs)


COMMITTED: list[Path] = []  # every output this process has put in place, for the message of a late signal


@contextlib.contextmanager
def locked_outputs(outputs: dict[str, Path]):
    """Hold the locks of files a run writes one by one (atomically each, e.g. a training run's checkpoints),
    after removing the temporary files a killed run left for them; a second run to the same files refuses."""
    out = OutputSet(outputs)
    try:
        out._acquire()
        yield
    finally:
        out._unlock()
        remove_empty(out._created)  # a run that failed before writing leaves no folder behind


class OutputSet:
    """``outputs``: {label: path} written by the run (labels are the command's flag names, used in messages);
    ``inputs``: {label: path} read by it; ``removes``: files deleted at commit because the new set makes them
    wrong (stale reports, old failure evidence)."""

    def __init__(self, outputs: dict[str, Path | None], inputs: dict[str, Path | None] | None = None,
                 removes: list[Path] = ()):
        self.outputs = {label: Path(p) for label, p in outputs.items() if p is not None}
        self.inputs = {label: Path(p) for label, p in (inputs or {}).items() if p is not None}
        self.removes = [Path(p) for p in removes if p is not None]
        self._check()
        self.staged: dict[str, Path] = {}
        self._locks: list[tuple[Path, int]] = []
        self._created: list[Path] = []
        self.committed = False

    def _check(self) -> None:
        items = list(self.outputs.items())
        for i, (label, path) in enumerate(items):
            if path.is_dir():
                raise QvitError(f"{label} {path} is a folder: give a file name")
            for other, other_path in items[i + 1:]:
                if _same_file(path, other_path):
                    raise QvitError(f"{label} and {other} are the same file ({path}): give each output its own path")
            for other, in_path in self.inputs.items():
                if _same_file(path, in_path):
                    raise QvitError(f"{label} {path} would overwrite the input {other}: choose another output path")
        keep = [*self.outputs.values(), *self.inputs.values()]  # never remove what the run writes or reads
        self.removes = [p for p in self.removes if not any(_same_file(p, k) for k in keep)]

    # ---- locking -------------------------------------------------------------------------------------

    def _lock(self, path: Path, label: str) -> None:
        lock = path.with_name(f".{path.name}.lock")
        for _ in range(10):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise io_error(path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise QvitError(f"another run is writing {label} {path} (lock {lock.name} is held): wait for it to "
                                "finish or choose other output paths") from None
            # The holder before us may have unlinked the lock file after we opened it: lock the file on disk.
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    self._locks.append((lock, fd))
                    return
            except FileNotFoundError:
                pass
            os.close(fd)
        raise QvitError(f"cannot lock {lock}: another run keeps replacing it; wait for it to finish")

    def _unlock(self) -> None:
        for lock, fd in reversed(self._locks):
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
        self._locks.clear()

    # ---- the transaction -----------------------------------------------------------------------------

    def __enter__(self) -> "OutputSet":
        try:
            self._acquire()
            for label, path in self.outputs.items():
                self.staged[label] = temp_beside(path)
        except BaseException:
            self._abort()
            raise
        return self

    def _acquire(self) -> None:
        """Make the outputs' folders, lock every output (in one order, so two runs cannot deadlock), and remove
        what a killed run left for them."""
        for label, path in sorted(self.outputs.items(), key=lambda kv: os.path.realpath(kv[1])):
            self._created += make_parents(path)
            self._lock(path, label)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Temporary files a killed run left for these outputs: nobody else can be writing them (we hold the locks)."""
        for path in self.outputs.values():
            for stale in path.parent.glob(temp_pattern(path)):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def stage(self, label: str) -> Path:
        """The temporary file that becomes output ``label`` at commit."""
        return self.staged[label]

    def write(self, label: str, data: bytes) -> None:
        """Fill the staged file of output ``label``; a failed write is one line naming the output."""
        try:
            self.staged[label].write_bytes(data)
        except OSError as e:
            raise io_error(self.outputs[label], e) from None

    def __exit__(self, kind, exc, tb) -> None:
        if not self.committed:
            self._abort()
        else:
            self._unlock()

    def _abort(self) -> None:
        with interrupts.deferred():  # a second Ctrl-C must not leave staged files behind
            for tmp in self.staged.values():
                tmp.unlink(missing_ok=True)
            self.staged.clear()
            self._unlock()
            remove_empty(self._created)

    def commit(self) -> None:
        """Put every staged file in place, all of them or none."""
        with interrupts.deferred():
            backups: dict[Path, Path | None] = {}
            try:
                for label, target in self.outputs.items():
                    backups[target] = self._keep_aside(target)
                for path in self.removes:
                    if path.exists():
                        backups[path] = self._keep_aside(path)
                done: list[Path] = []
                current = None
                try:
                    for label, target in self.outputs.items():
                        current = target
                        os.replace(self.staged[label], target)
                        done.append(target)
                    for path in self.removes:
                        current = path
                        path.unlink(missing_ok=True)
                        done.append(path)
                except OSError as e:
                    for path in reversed(done):  # put back what was there
                        if backups.get(path) is not None:
                            os.replace(backups.pop(path), path)
                        else:
                            path.unlink(missing_ok=True)
                    raise io_error(current, e) from None
                self.committed = True
                COMMITTED.extend(self.outputs.values())
                self.staged.clear()
            finally:
                for backup in backups.values():
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                if not self.committed:
                    self._abort()

    @staticmethod
    def _keep_aside(path: Path) -> Path | None:
        """A hard link to the current file, so a failed commit can restore it; None when there is none."""
        if not path.exists():
            return None
        backup = temp_beside(path)
        try:
            backup.unlink()
            os.link(path, backup)
        except OSError:  # a file system without hard links: a copy does the same job
            import shutil

            try:
                shutil.copy2(path, backup)
            except OSError as e:
                backup.unlink(missing_ok=True)
                raise io_error(path, e) from None
        return backup
