"""The Q-ViT ablation on the stronger probe (issue 13): the probe teacher (models/probe_fp.yaml, trained here if
missing) and QAT students (models/probe_qat.yaml: 3 epochs on all 60,000 training images) at each bit width and
seed: LSQ alone, + IRM (each variant), + DGD, + IRM + DGD. All students share one recipe, so the quantization
method is the only difference.

    .venv/bin/python benchmarks/ablation_long.py             # -> benchmarks/results/ablation_long.{md,json,png}
    .venv/bin/python benchmarks/ablation_long.py --report    # tables and plot from the finished runs, no training
    .venv/bin/python benchmarks/ablation_long.py --teacher-only   # the probe teacher alone (make probe-teacher)

Each run lives in runs/probe/<student>_w<b>a<b>_s<seed>/: a finished run is reused, an interrupted one continues
exactly where it stopped (the trainer's resume), so the command can be stopped (Ctrl-C, or a session's end) and
started again until the table is whole. Before each run it prints what is done, what is left and an estimate of
the time left; the results are rewritten after every finished run, a run still missing shows as "–".

The figures: top-1 on the 10,000 test images at the calibrated start (epoch 0) and after the last epoch (not the
best epoch: no choosing on the test set), mean of the seeds. Runs are ordered so that the comparisons that
decide most come first (see STUDENTS).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.plots import save_figure  # noqa: E402
from qvit_export.checkpoint import read_checkpoint  # noqa: E402
from qvit_export.data import fashion_mnist  # noqa: E402
from qvit_export.recipe import Recipe, load_recipe  # noqa: E402
from qvit_export.evaluation import evaluate  # noqa: E402
from qvit_export.config import IRM_VARIANTS  # noqa: E402
from qvit_export.trainer import finished_run, saved_run, train_or_reuse  # noqa: E402


@dataclass(frozen=True)
class Student:
    """One column of the ablation: which IRM variant (False: none) and whether DGD is on."""
    label: str
    irm: bool | str
    dgd: bool
    tier: int  # run order: 0 first

    @property
    def slug(self) -> str:
        parts = ["lsq"] + ([f"irm_{self.irm}"] if self.irm else []) + (["dgd"] if self.dgd else [])
        return "_".join(parts)


# Table order; ``tier`` is the run order. The paper's method against the baseline first; then, as that showed
# Q-ViT behind LSQ at both widths (2026-12-01), each component alone (first the IRM that starts nearest the
# teacher with its quantizers off, then DGD), then the other IRM variants, then the variants with DGD.
STUDENTS = (
    Student("LSQ", False, False, 0),
    Student("+DGD", False, True, 2),
    Student("+IRM token", "token", False, 3),
    Student("+IRM head", "head", False, 1),
    Student("+IRM blend", "blend", False, 3),
    Student("Q-ViT (IRM token + DGD cosine; the paper's IRM)", "token", True, 0),
    Student("IRM head + DGD", "head", True, 4),
    Student("IRM blend + DGD", "blend", True, 4),
)
BY_SLUG = {s.slug: s for s in STUDENTS}


@dataclass(frozen=True)
class Job:
    student: Student
    bits: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.student.slug}_w{self.bits}a{self.bits}_s{self.seed}"


def student_recipe(args, teacher: Path, job: Job) -> Recipe:
    overrides = {"name": job.name, "teacher": str(teacher), "w_bits": job.bits, "a_bits": job.bits,
                 "irm": job.student.irm, "dgd": job.student.dgd, "seed": job.seed}
    if job.student.dgd:
        overrides["dgd_form"] = "cosine"  # the form this ablation measured (2026-12-01), whatever DGD's default is
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return load_recipe(args.recipe, overrides)


def training_seconds(state: dict) -> float:
    return sum(row["seconds"] or 0 for row in state["extra"]["train_state"]["history"])


def run_states(args, teacher: Path, jobs: list[Job], workdir: Path) -> dict[Job, tuple[Recipe, dict | None]]:
    """Each job's recipe and saved training state (``saved_run``: None when nothing of that recipe is saved), each
    last.pt read once."""
    recipes = {job: student_recipe(args, teacher, job) for job in jobs}
    return {job: (recipes[job], saved_run(workdir / job.name, recipes[job])) for job in jobs}


def result_row(job: Job, out: Path, recipe: Recipe, state: dict | None) -> dict | None:
    """What the tables need from a finished run; None while it is not finished."""
    if state is None or finished_run(out, recipe, state) is None:
        return None
    history = state["extra"]["train_state"]["history"]
    return {"student": job.student.slug, "label": job.student.label, "bits": job.bits, "seed": job.seed,
            "start": history[0]["val_top1"] if history[0]["epoch"] == 0 else None,
            "final": history[-1]["val_top1"], "best": max(row["val_top1"] for row in history),
            "curve": [[row["epoch"], row["val_top1"]] for row in history],
            "train_seconds": training_seconds(state), "run": str(out)}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def summarise(fp_top1: float, rows: list[dict], bits_list, seeds) -> tuple[str, list[dict]]:
    table = []
    for bits in bits_list:
        lsq = [r["final"] for r in rows if r["bits"] == bits and r["student"] == "lsq"]
        lsq_mean = statistics.mean(lsq) if len(lsq) == len(seeds) else None
        for student in STUDENTS:
            runs = [r for r in rows if r["bits"] == bits and r["student"] == student.slug]
            finals = [r["final"] for r in runs]
            starts = [r["start"] for r in runs if r["start"] is not None]
            whole = len(runs) == len(seeds)
            mean = statistics.mean(finals) if finals else None
            table.append({"bits": bits, "student": student.slug, "label": student.label, "seeds_done": len(runs),
                          "start": statistics.mean(starts) if starts else None, "final": mean, "whole": whole,
                          "spread": max(finals) - min(finals) if finals else None, "values": finals,
                          "vs_fp": mean - fp_top1 if mean is not None else None,
                          "vs_lsq": mean - lsq_mean if mean is not None and lsq_mean is not None else None})

    def cell(value, fmt="{:.2f}"):
        return "–" if value is None else fmt.format(value)

    lines = [f"| W/A | student | start (epoch 0) | final top-1 % (mean of {len(seeds)} seeds) | spread | vs FP | "
             "vs LSQ | seeds |", "|---|---|---|---|---|---|---|---|",
             f"| 32/32 | FP teacher | | {fp_top1:.2f} | | | | |"]
    for t in table:
        final = cell(t["final"]) + ("" if t["whole"] or t["final"] is None else
                                    f" ({t['seeds_done']} of {len(seeds)} seeds)")
        lines.append(f"| {t['bits']}/{t['bits']} | {t['label']} | {cell(t['start'])} | {final} | "
                     f"{cell(t['spread'])} | {cell(t['vs_fp'], '{:+.2f}')} | {cell(t['vs_lsq'], '{:+.2f}')} | "
                     f"{', '.join(f'{v:.2f}' for v in t['values']) or '–'} |")
    return "\n".join(lines), table


def plot(fp_top1: float, rows: list[dict], bits_list, path: Path) -> None:
    """Validation top-1 per epoch (0 = the calibrated start), one panel per bit width: each run thin, the mean of
    its seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bits_list), figsize=(6.2 * len(bits_list), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bits in zip(axes[0], bits_list, strict=True):
        for i, student in enumerate(STUDENTS):
            runs = [r for r in rows if r["bits"] == bits and r["student"] == student.slug]
            if not runs:
                continue
            color = colors[i % len(colors)]
            for r in runs:
                epochs, top1 = zip(*r["curve"], strict=True)
                ax.plot(epochs, top1, color=color, lw=0.7, alpha=0.5)
            length = min(len(r["curve"]) for r in runs)
            epochs = [runs[0]["curve"][k][0] for k in range(length)]
            mean = [statistics.mean(r["curve"][k][1] for r in runs) for k in range(length)]
            ax.plot(epochs, mean, "o-", color=color, lw=2, ms=4, label=f"{student.label} ({mean[-1]:.2f})")
        ax.axhline(fp_top1, color="k", ls="--", lw=1, label=f"FP teacher {fp_top1:.2f}")
        ax.set_xticks(sorted({epoch for r in rows for epoch, _ in r["curve"]}))
        ax.set_title(f"W{bits}A{bits}")
        ax.set_xlabel("epoch (0 = calibrated start)")
        ax.set_ylabel("Fashion-MNIST top-1 % (10,000 test images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Q-ViT ablation on the probe (thin: each seed; thick: mean of seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def irm_starts(args, teacher: Path, fp: dict, workdir: Path) -> dict:
    """Top-1 of each IRM variant's converted student with its quantizers off, fitted as the runs fit it (seed 0):
    what IRM alone costs before QAT begins. Cached in the workdir for this teacher."""
    from qvit_export.quantize import quantizers_disabled
    from qvit_export.trainer import Trainer

    cache = workdir / "irm_start.json"
    key = {"teacher": str(teacher), "teacher_top1": fp["top1"], "recipe": args.recipe}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["top1"]
    top1 = {}
    for variant in IRM_VARIANTS:  # the student as its QAT run starts: calibrated and IRM-fitted by the trainer
        recipe = load_recipe(args.recipe, {"teacher": str(teacher), "irm": variant, "seed": 0})
        model = Trainer(recipe, workdir / "irm_start", progress=False).model
        with quantizers_disabled(model):
            top1[variant] = evaluate(model, fashion_mnist("test"), progress=False)["top1"]
        print(f"IRM {variant}, quantizers off: {top1[variant]:.2f}% (teacher {fp['top1']:.2f}%)", flush=True)
    write_text(cache, json.dumps({"key": key, "top1": top1}, indent=2))
    return top1


def write_results(args, argv, teacher: Path, fp: dict, jobs: list[Job], workdir: Path) -> str:
    rows = [row for job, (recipe, state) in run_states(args, teacher, jobs, workdir).items()
            if (row := result_row(job, workdir / job.name, recipe, state)) is not None]
    markdown, table = summarise(fp["top1"], rows, args.bits, args.seeds)
    recipe = load_recipe(args.recipe)
    when = datetime.date.today().isoformat()
    epochs = args.epochs or recipe.epochs
    header = (f"Q-ViT ablation on the probe ({when}, {platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}): teacher {teacher} ({fp['epochs']} epochs, {fp['train_minutes']:.0f} min of "
              f"training, {fp['top1']:.2f}%); each "
              f"student: recipe {args.recipe}, {epochs} epochs of QAT on all {recipe.train_limit or 60000} "
              f"training images, lr {recipe.lr:g}, soft logit distillation (weight {recipe.distill_weight}), "
              f"DGD weight {recipe.dgd_weight:g}, IRM fitted with {recipe.irm_steps} steps ('blend' is not "
              f"fitted: it starts at the teacher). {len(rows)} of {len(jobs)} runs finished; top-1 on the 10,000 "
              "test images after the last epoch.\n\n"
              f"Command: `.venv/bin/python benchmarks/ablation_long.py {' '.join(argv)}`\n\n")
    starts = irm_starts(args, teacher, fp, workdir)
    markdown += ("\n\nWhere each IRM variant starts with its quantizers off (fitted as the runs fit it, seed 0; "
                 f"teacher {fp['top1']:.2f}%): " + ", ".join(f"{v} {t:.2f}%" for v, t in starts.items()) + ".")
    out = Path(args.out)
    write_text(out.with_suffix(".md"), header + markdown + "\n")
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "teacher": str(teacher), "fp": fp,
                                                     "irm_start_quantizers_off": starts,
                                                     "recipe": recipe.to_dict(), "args": vars(args), "runs": rows,
                                                     "table": table}, indent=2))
    if rows:
        plot(fp["top1"], rows, args.bits, out.with_suffix(".png"))
    return header + markdown


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-recipe", default="probe_fp", help="recipe of the FP teacher (trained if missing)")
    p.add_argument("--recipe", default="probe_qat", help="recipe every student shares")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--students", nargs="+", choices=list(BY_SLUG), default=list(BY_SLUG),
                   help="which students (default: all)")
    p.add_argument("--epochs", type=int, help="QAT epochs (default: the recipe's)")
    p.add_argument("--workdir", default="runs/probe")
    p.add_argument("--report", action="store_true", help="write the results from the finished runs and stop")
    p.add_argument("--teacher-only", action="store_true", help="train (or continue) the teacher, print its top-1, stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside a run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablation_long"))
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    teacher_recipe = load_recipe(args.teacher_recipe)
    teacher = workdir / "fp" / "best.pt"
    if finished_run(teacher.parent, teacher_recipe) is None:
        if args.report:
            raise SystemExit(f"error: the teacher {teacher} is not trained yet: run without --report")
        print(f"training the teacher ({args.teacher_recipe}, {teacher_recipe.epochs} epochs) in {teacher.parent}")
        train_or_reuse(teacher_recipe, teacher.parent, progress=not args.no_progress)
    best = read_checkpoint(teacher)  # its metrics: validation on the same 10,000 test images
    fp = {"top1": best["metrics"]["top1"], "epochs": teacher_recipe.epochs, "best_epoch": best["extra"]["epoch"],
          "train_minutes": training_seconds(saved_run(teacher.parent, teacher_recipe)) / 60}

    if args.teacher_only:
        print(f"teacher {teacher}: top-1 {fp['top1']:.2f}% on the 10,000 test images (best of "
              f"{fp['epochs']} epochs: epoch {fp['best_epoch']}; {fp['train_minutes']:.0f} min of training)")
        return 0
    chosen = [BY_SLUG[slug] for slug in args.students]
    jobs = [Job(s, bits, seed) for tier in sorted({s.tier for s in chosen}) for s in chosen if s.tier == tier
            for bits in args.bits for seed in args.seeds]
    if not args.report:
        started, walls = time.perf_counter(), []  # walls: whole runs timed in this call (calibration included)
        for i, job in enumerate(jobs, 1):
            states = run_states(args, teacher, jobs, workdir)
            recipe, state = states[job]
            out = workdir / job.name
            if finished_run(out, recipe, state) is not None:
                continue
            done = [j for j, (r, st) in states.items() if st is not None and finished_run(workdir / j.name, r, st)]
            left = len(jobs) - len(done)
            if walls:
                eta = f", about {minutes(statistics.median(walls) * left)} left"
            elif done:  # finished in an earlier call: only their training time is known
                took = statistics.median(training_seconds(states[j][1]) for j in done)
                eta = f", at least {minutes(took * left)} left (training time alone)"
            else:
                eta = ""
            partial = state is not None
            where = f" (continuing after epoch {state['extra']['epoch']})" if partial else ""
            print(f"[{i}/{len(jobs)}] {job.name}{where}: {len(done)} done, {left} left{eta}", flush=True)
            begun = time.perf_counter()
            train_or_reuse(recipe, out, progress=not args.no_progress)
            if not partial:
                walls.append(time.perf_counter() - begun)
            write_results(args, argv, teacher, fp, jobs, workdir)
        print(f"all {len(jobs)} runs finished ({minutes(time.perf_counter() - started)} in this call)")
    print(write_results(args, argv, teacher, fp, jobs, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
