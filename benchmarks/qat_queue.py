"""A resumable queue of training jobs that one or more worker processes share (benchmarks/ablation_deep.py and
benchmarks/bottleneck.py): teachers, measurements and QAT students, each with the jobs it waits for.

A worker takes the first job, in priority order, whose prerequisites are finished and which no live process has
claimed (a claim is a file in <workdir>/.claims holding the claimant's pid; a dead claimant's claim is taken
over), runs it and starts again; while nothing is ready it waits. Every job is resumable: a finished run is
reused, an interrupted one continues exactly where it stopped (trainer.train_or_reuse), so workers may be
stopped (SIGSTOP/SIGCONT, kill) and started again at any time, and two of them never train the same run.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ledger import Ledger  # noqa: E402

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.errors import QvitError  # noqa: E402
from qvit_export.recipe import Recipe, load_recipe  # noqa: E402
from qvit_export.trainer import finished_run, read_resume, train_or_reuse  # noqa: E402

DIAGNOSTIC_IMAGES = 1000  # test images the attention diagnostics of each final student look at


@dataclass(frozen=True)
class Probe:
    """A teacher recipe, the recipe its students share, where its runs live and where what they leave is kept
    (``ledger``: a folder of benchmarks/ledger.py's, or None to keep nothing beyond the run folders)."""
    name: str
    teacher_recipe: str
    student_recipe: str
    workdir: Path
    ledger_dir: Path | None = None

    @cached_property
    def ledger(self) -> Ledger | None:
        return None if self.ledger_dir is None else Ledger(self.ledger_dir)

    @cached_property
    def fp_recipe(self) -> Recipe:
        return load_recipe(self.teacher_recipe)

    @property
    def teacher_dir(self) -> Path:
        return self.workdir / "fp"

    def _kept_teacher(self) -> dict | None:
        return None if self.ledger is None else self.ledger.teacher(self.fp_recipe)

    @property
    def teacher(self) -> Path:
        """The kept teacher once there is one, else the teacher run's best.pt (which may still be training)."""
        return self.ledger.teacher_path if self._kept_teacher() is not None else self.teacher_dir / "best.pt"

    def teacher_done(self) -> bool:
        """Whether the teacher is final: kept in the ledger, or its run finished (then it is kept now, before any
        student names it)."""
        if self._kept_teacher() is not None:
            return True
        state = saved_run(self.teacher_dir, self.fp_recipe)
        if finished_run(self.teacher_dir, self.fp_recipe, state) is None:
            return False
        if self.ledger is not None:
            self.ledger.publish_teacher(self.teacher_dir, self.fp_recipe, state)
        return True

    def fp(self) -> dict:
        """The teacher's top-1 (its best epoch, on the 10,000 test images) and training time."""
        kept = self._kept_teacher()
        if kept is not None:
            return {k: kept[k] for k in ("top1", "epochs", "best_epoch", "train_minutes")}
        from qvit_export.checkpoint import read_checkpoint

        best = read_checkpoint(self.teacher)
        return {"top1": best["metrics"]["top1"], "epochs": self.fp_recipe.epochs, "best_epoch": best["extra"]["epoch"],
                "train_minutes": training_seconds(saved_run(self.teacher_dir, self.fp_recipe)) / 60}

    def keep(self, name: str) -> Path:
        """Where a measurement the queue waits for is kept: the ledger when there is one, else the run folder."""
        return self.ledger.file(name) if self.ledger is not None else self.workdir / name


_STATES: dict[tuple, dict | None] = {}


def saved_run(out: Path, recipe: Recipe) -> dict | None:
    """trainer.saved_run, with what the queue needs of each last.pt (recipe, epoch, history) kept in memory until
    the file changes: workers look at every run each time they choose a job, and a last.pt also holds the
    optimizer state."""
    path = out / "last.pt"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _STATES:
        try:
            extra = read_resume(path)["extra"]
            _STATES[key] = {"extra": {"recipe": extra.get("recipe", {}), "epoch": extra["epoch"],
                                      "device": extra.get("device"),
                                      "train_state": {"history": extra["train_state"]["history"]}}}
        except QvitError:  # being written, or damaged: the trainer replaces it
            return None
    state = _STATES[key]
    return state if state is not None and recipe.trains_as(state["extra"]["recipe"]) else None


def training_seconds(state: dict | None) -> float:
    return 0.0 if state is None else sum(row["seconds"] or 0 for row in state["extra"]["train_state"]["history"])


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class Job:
    """One unit of work: ``run()`` does it (resumably), ``done()`` says whether it is finished, ``ready()``
    whether what it needs is. ``tier``: lower runs first."""
    name: str
    tier: int
    run: Callable[[], None]
    done: Callable[[], bool]
    ready: Callable[[], bool] = lambda: True
    kind: str = "student"
    seconds: Callable[[], float] = field(default=lambda: 0.0)


def student_recipe(probe: Probe, name: str, overrides: dict) -> Recipe:
    return load_recipe(probe.student_recipe, {"name": name, "teacher": str(probe.teacher)} | overrides)


def student_state(probe: Probe, name: str, overrides: dict) -> tuple[Recipe, dict | None]:
    recipe = student_recipe(probe, name, overrides)
    return recipe, saved_run(probe.workdir / name, recipe)


def run_row(probe: Probe, name: str, overrides: dict) -> dict | None:
    """A finished student's figures (None while unfinished): top-1 on the test images at the calibrated start
    (epoch 0) and after the last epoch (not the best: no choosing on the test set), its curve, its training
    time, and the attention diagnostics of its final model when they exist. From the ledger when it keeps the
    run, else from the run folder."""
    recipe, state = student_state(probe, name, overrides)
    if probe.ledger is not None and probe.teacher_done():
        kept = probe.ledger.student(name, recipe, probe.teacher)
        if kept is not None:
            return kept
    return folder_row(probe, name, recipe, state)


def folder_row(probe: Probe, name: str, recipe: Recipe, state: dict | None) -> dict | None:
    """run_row from the run folder alone."""
    out = probe.workdir / name
    if state is None or finished_run(out, recipe, state) is None:
        return None
    history = state["extra"]["train_state"]["history"]
    row = {"name": name, "start": history[0]["val_top1"] if history[0]["epoch"] == 0 else None,
           "final": history[-1]["val_top1"], "curve": [[r["epoch"], r["val_top1"]] for r in history],
           "train_seconds": training_seconds(state), "device": state["extra"]["device"],
           "dgd_weight": recipe.dgd_weight if recipe.dgd else None}
    diag = read_diagnostics(out)
    if diag is not None:
        row["attention"] = diag["attention"]
    return row


def read_diagnostics(out: Path) -> dict | None:
    path = out / "attention.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    last = out / "last.pt"
    return data if last.is_file() and data.get("last_mtime") == last.stat().st_mtime_ns else None


def diagnose(probe: Probe, out: Path, images: int = DIAGNOSTIC_IMAGES) -> None:
    """The attention diagnostics (qvit_export.attention) of the run's final model (last.pt) against the teacher,
    on the first ``images`` test images, written to <run>/attention.json."""
    import torch

    from qvit_export.attention import attention_diagnostics
    from qvit_export.checkpoint import load_checkpoint
    from qvit_export.data import fashion_mnist

    student, teacher = load_checkpoint(out / "last.pt"), load_checkpoint(probe.teacher)
    test = fashion_mnist("test")
    x = torch.stack([test[i][0] for i in range(images)])
    form = student.qvit_checkpoint["extra"]["recipe"].get("dgd_form", "cosine")
    entries = attention_diagnostics(student, teacher, x, dgd_form=form, progress=False)
    write_text(out / "attention.json", json.dumps({"images": images, "last_mtime": (out / "last.pt").stat().st_mtime_ns,
                                                   "attention": entries}, indent=2))


def student_job(probe: Probe, name: str, tier: int, overrides: Callable[[], dict | None],
                progress: bool = False, extra_ready: Callable[[], bool] = lambda: True) -> Job:
    """A QAT student of ``probe``: trained (or reused, or continued), then diagnosed. ``overrides`` returns its
    recipe overrides, or None while they cannot be known yet (a choice that waits for other runs)."""
    def done() -> bool:
        """Kept in the ledger with its diagnostics, or finished and diagnosed in its folder (then kept now)."""
        o = overrides()
        if o is None or not probe.teacher_done():
            return False
        recipe, state = student_state(probe, name, o)
        if probe.ledger is not None:
            kept = probe.ledger.student(name, recipe, probe.teacher)
            if kept is not None and "attention" in kept:
                return True
        row = folder_row(probe, name, recipe, state)
        if row is None or "attention" not in row:
            return False
        if probe.ledger is not None:
            probe.ledger.publish_student(name, recipe, probe.teacher, row)
        return True

    def run() -> None:
        recipe = student_recipe(probe, name, overrides())
        out = probe.workdir / name
        train_or_reuse(recipe, out, progress=progress)
        if read_diagnostics(out) is None:
            diagnose(probe, out)
        done()  # keeps it in the ledger

    def seconds() -> float:
        o = overrides()
        return 0.0 if o is None else training_seconds(student_state(probe, name, o)[1])

    return Job(name=f"{probe.name}/{name}", tier=tier, run=run, done=done, seconds=seconds,
               ready=lambda: probe.teacher_done() and extra_ready() and overrides() is not None)


def teacher_job(probe: Probe, progress: bool = False, tier: int = -1) -> Job:
    def run() -> None:
        train_or_reuse(probe.fp_recipe, probe.teacher_dir, progress=progress)
        probe.teacher_done()  # keeps it in the ledger

    return Job(name=f"{probe.name}/fp", tier=tier, kind="teacher", done=probe.teacher_done, run=run)


# ---- claims -------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_path(workdir: Path, job: Job) -> Path:
    return workdir / ".claims" / (job.name.replace("/", "__") + ".claim")


def claim(workdir: Path, job: Job) -> bool:
    """Take ``job`` for this process; False when a live process holds it."""
    path = claim_path(workdir, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            path.unlink(missing_ok=True)  # its claimant died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(workdir: Path, job: Job) -> None:
    claim_path(workdir, job).unlink(missing_ok=True)


def claimed_by_other(workdir: Path, job: Job) -> bool:
    path = claim_path(workdir, job)
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and _alive(pid)


def work(jobs: Callable[[], list[Job]], claims_dir: Path, after_each: Callable[[], None], poll: float = 60.0,
         stop_when_blocked: bool = False) -> int:
    """Run jobs until every one is done: the first ready, unclaimed one in (tier, list) order each time. Prints
    what is done, left and an estimate of the time left before each job. Returns how many jobs this call ran."""
    ran, walls = 0, []
    waiting_since = None
    failed: set[str] = set()  # jobs that raised in this worker: left to the other worker or a restart
    while True:
        listed = jobs()
        order = sorted(range(len(listed)), key=lambda i: (listed[i].tier, i))
        pending = [listed[i] for i in order if not listed[i].done()]
        if not pending:
            print(f"all {len(listed)} jobs done ({ran} run by this worker)", flush=True)
            return ran
        job = next((j for j in pending if j.name not in failed and j.ready() and not claimed_by_other(claims_dir, j)
                    and claim(claims_dir, j)), None)
        if job is None:
            if stop_when_blocked:
                print(f"{len(pending)} jobs left, none ready or unclaimed: stopping", flush=True)
                return ran
            if waiting_since is None:
                waiting_since = time.time()
                busy = [j.name for j in pending if claimed_by_other(claims_dir, j)]
                print(f"waiting: {len(pending)} jobs left, none ready for this worker (running elsewhere: "
                      f"{', '.join(busy) or 'none'})", flush=True)
            time.sleep(poll)
            continue
        waiting_since = None
        students = [j for j in listed if j.kind == "student"]
        done = [j for j in students if j.done()]
        took = [s for j in done if (s := j.seconds())]
        left = len([j for j in pending if j.kind == "student"])
        if walls:
            eta = f", about {minutes(statistics.median(walls) * left / 2)} left with two workers"
        elif took:
            eta = f", at least {minutes(statistics.median(took) * left / 2)} left with two workers (training time)"
        else:
            eta = ""
        print(f"[{time.strftime('%H:%M')}] {job.name}: {len(done)} of {len(students)} students done, {left} left{eta}",
              flush=True)
        begun = time.perf_counter()
        try:
            job.run()
        except Exception:  # noqa: BLE001 - one broken job must not stop an unattended queue
            import traceback

            traceback.print_exc()
            print(f"{job.name} failed: this worker leaves it (restart the worker to retry it)", flush=True)
            failed.add(job.name)
            continue
        finally:
            release(claims_dir, job)
        if job.kind == "student":
            walls.append(time.perf_counter() - begun)
        ran += 1
        after_each()
