"""What the probes' long runs leave in the repository (benchmarks/results/ledger/<probe>/), so that a queue of
hours outlives the machine it ran on: the trained teacher itself (teacher.pt, the run's best.pt, with
teacher.json: its recipe, SHA-256, top-1 and curve), one JSON per finished QAT student (its recipe and the
figures the reports read: start, final, curve, training time, attention diagnostics), and the measurements the
queue waits for (the PTQ bottleneck table, the DGD weights, the best choices).

Why: a run folder (runs/) holds what resuming needs (optimizer state, every epoch's last.pt) and is not kept
when the machine is replaced; twice the queue lost hours of training that way (the deep teacher at epoch 13 of
18, then every run). A ledger entry is a few kilobytes and is committed as it appears.

An entry counts only for the recipe and teacher it was made with: a student's recipe is stored with its teacher
named by SHA-256 instead of a path (no machine paths in the repository, and a retrained or replaced teacher does
not inherit its predecessor's students), and it is reused only if today's recipe trains as it
(``Recipe.trains_as``, keys added since at their defaults). The files are the project's own results, read with
json and ``torch.load(weights_only=True)`` like any checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from qvit_export.atomic import atomic_path, write_text
from qvit_export.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
LEDGER = ROOT / "benchmarks" / "results" / "ledger"

_DIGESTS: dict[tuple, str] = {}


def digest(path: Path) -> str:
    """'sha256:<hex>' of the file, cached until it changes (the queue asks for the teacher's on every look)."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


class Ledger:
    """One probe's entries, in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.teacher_path = self.folder / "teacher.pt"
        self.teacher_json = self.folder / "teacher.json"

    # ---- the teacher ----------------------------------------------------------------------------------

    def teacher(self, recipe: Recipe) -> dict | None:
        """teacher.json when teacher.pt is the very file it describes and was trained by ``recipe``, else None."""
        if not (self.teacher_json.is_file() and self.teacher_path.is_file()):
            return None
        entry = json.loads(self.teacher_json.read_text())
        if entry.get("sha256") != digest(self.teacher_path) or not recipe.trains_as(entry.get("recipe", {})):
            return None
        return entry

    def publish_teacher(self, run: Path, recipe: Recipe, state: dict) -> dict:
        """Keep a finished teacher run (``run``/best.pt and its training state from last.pt)."""
        from qvit_export.checkpoint import read_checkpoint

        best = read_checkpoint(run / "best.pt")
        history = state["extra"]["train_state"]["history"]
        with atomic_path(self.teacher_path) as tmp:
            shutil.copyfile(run / "best.pt", tmp)
        entry = {"recipe": recipe.to_dict(), "sha256": digest(self.teacher_path), "top1": best["metrics"]["top1"],
                 "best_epoch": best["extra"]["epoch"], "epochs": recipe.epochs,
                 "train_minutes": sum(r["seconds"] or 0 for r in history) / 60, "device": state["extra"].get("device"),
                 "curve": [[r["epoch"], r["val_top1"], r["seconds"]] for r in history]}
        write_text(self.teacher_json, json.dumps(entry, indent=2))
        return entry

    # ---- students --------------------------------------------------------------------------------------

    def _student_path(self, name: str) -> Path:
        return self.folder / "students" / f"{name}.json"

    @staticmethod
    def _saved_recipe(recipe: Recipe, teacher: Path) -> dict:
        return recipe.to_dict() | {"teacher": digest(teacher)}

    def student(self, name: str, recipe: Recipe, teacher: Path) -> dict | None:
        """The figures of student ``name`` trained by ``recipe`` from the teacher file ``teacher``, else None."""
        path = self._student_path(name)
        if not path.is_file() or not teacher.is_file():
            return None
        entry = json.loads(path.read_text())
        saved = entry.get("recipe", {})
        if saved.get("teacher") != digest(teacher) or not recipe.trains_as(saved | {"teacher": recipe.teacher}):
            return None
        return entry["row"]

    def publish_student(self, name: str, recipe: Recipe, teacher: Path, row: dict) -> None:
        write_text(self._student_path(name), json.dumps({"recipe": self._saved_recipe(recipe, teacher), "row": row},
                                                        indent=2))

    # ---- measurements the queue waits for ---------------------------------------------------------------

    def file(self, name: str) -> Path:
        return self.folder / name
