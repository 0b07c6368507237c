"""The Q-ViT ablation on the deep probe (issue 24): the deep teacher (models/probe_deep_fp.yaml: depth 6, 2 heads
of 64) and one-epoch QAT students (models/probe_deep_qat.yaml) at W2A2 and W3A3, 2 seeds: LSQ, + IRM (head,
token), + DGD in each form (cosine, gram-row, gram) at the weight that balances its gradient with the task's and
at the paper's weight 1, IRM + DGD with the best of each, and the paper's configuration (IRM token + DGD
gram-row); every final student's attention diagnostics (qvit_export.attention) beside its accuracy.

    .venv/bin/python benchmarks/ablation_deep.py --worker    # work through the queue (start two: one core each)
    .venv/bin/python benchmarks/ablation_deep.py --report    # -> benchmarks/results/ablation_deep.{md,json,png}
    .venv/bin/python benchmarks/ablation_deep.py --teacher-only

The queue (benchmarks/qat_queue.py) also holds the bottleneck analysis's QAT runs (benchmarks/bottleneck.py) and
both teachers; every worker rewrites both reports after each job. Runs live in <workdir-root>/deep/<student>/ (the
2-block probe's in <workdir-root>/probe/); a finished run is reused, an interrupted one continues exactly, so
workers can be stopped and started again until the tables are whole. Order: the comparisons that decide most
first (LSQ and IRM head, both seeds), then the components (IRM token, each DGD form) and the deep bottleneck
runs, then the 2-block probe's teacher and its bottleneck runs, then IRM + DGD with the best of each (chosen
once both seeds of its candidates are finished, then kept), then the paper's configuration, then the weight-1
runs. What finishes is kept in benchmarks/results/ledger/ (benchmarks/ledger.py), to be committed.

The figures: top-1 on the 10,000 test images after the last epoch (no choosing the best epoch on the test set),
mean of the seeds; diagnostics on the first 1,000 test images, mean over the blocks and seeds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bottleneck  # noqa: E402
from ledger import digest  # noqa: E402
from qat_queue import Job, Probe, run_row, student_job, teacher_job, work  # noqa: E402

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.config import DGD_FORMS  # noqa: E402
from qvit_export.recipe import load_recipe  # noqa: E402

BITS = (2, 3)
SEEDS = (0, 1)
IRM_CHOICES = ("head", "token")


@dataclass(frozen=True)
class Student:
    """One row of the ablation. ``irm``: False, a variant, or 'best' (the better of IRM_CHOICES at that width);
    ``form``: None (no DGD), a DGD form, or 'best' (the best balanced form at that width); ``weight``: 'balanced'
    (measured on this teacher, per form) or a number."""
    label: str
    slug: str
    irm: bool | str
    form: str | None
    weight: str | float
    tier: int


STUDENTS = (
    Student("LSQ", "lsq", False, None, "balanced", 0),
    Student("+IRM head", "lsq_irm_head", "head", None, "balanced", 0),
    Student("+IRM token", "lsq_irm_token", "token", None, "balanced", 1),
    *(Student(f"+DGD {f}", f"lsq_dgd_{f}", False, f, "balanced", 1) for f in DGD_FORMS),
    Student("IRM (best) + DGD (best form)", "best_irm_best_dgd", "best", "best", "balanced", 2),
    Student("Q-ViT as written (IRM token + DGD gram-row)", "lsq_irm_token_dgd_gram-row", "token", "gram-row",
            "balanced", 3),
    *(Student(f"+DGD {f}, weight 1 (the paper's)", f"lsq_dgd_{f}_w1", False, f, 1.0, 4) for f in DGD_FORMS),
)
BY_SLUG = {s.slug: s for s in STUDENTS}


def job_name(student: Student, bits: int, seed: int) -> str:
    return f"{student.slug}_w{bits}a{bits}_s{seed}"


# ---- choices that wait for runs ------------------------------------------------------------------------

class Choices:
    """The DGD weights measured on the teacher, and the 'best' IRM and form per width once known (kept in
    <workdir>/choices.json, so that a choice made never changes under a finished run)."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.path = probe.keep("choices.json")
        self.balance_path = probe.keep("dgd_balance.json")

    def _saved(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def balance(self) -> dict | None:
        if not self.balance_path.is_file():
            return None
        data = json.loads(self.balance_path.read_text())
        return data if data.get("teacher") == digest(self.probe.teacher) else None

    def weight(self, form: str) -> float | None:
        data = self.balance()
        return None if data is None else data["weights"][form]

    def _mean(self, student: Student, bits: int) -> float | None:
        finals = []
        for seed in SEEDS:
            row = run_row(self.probe, job_name(student, bits, seed), overrides(self, student, bits, seed) or {})
            if row is None:
                return None
            finals.append(row["final"])
        return statistics.mean(finals)

    def best(self, what: str, bits: int) -> str | None:
        """'irm' or 'form' at ``bits``: the saved choice, else made now if every candidate run is finished."""
        saved = self._saved()
        key = f"w{bits}a{bits}"
        if what in saved.get(key, {}):
            return saved[key][what]
        candidates = ({v: BY_SLUG[f"lsq_irm_{v}"] for v in IRM_CHOICES} if what == "irm"
                      else {f: BY_SLUG[f"lsq_dgd_{f}"] for f in DGD_FORMS})
        means = {name: self._mean(s, bits) for name, s in candidates.items()}
        if any(m is None for m in means.values()):
            return None
        choice = max(means, key=means.get)
        saved.setdefault(key, {})[what] = choice
        saved[key][what + "_means"] = means
        write_text(self.path, json.dumps(saved, indent=2))
        return choice


def overrides(choices: Choices, student: Student, bits: int, seed: int) -> dict | None:
    """The student's recipe overrides, or None while a choice or the DGD weights are still unknown."""
    irm = choices.best("irm", bits) if student.irm == "best" else student.irm
    form = choices.best("form", bits) if student.form == "best" else student.form
    if irm is None or (student.form is not None and form is None):
        return None
    out = {"w_bits": bits, "a_bits": bits, "irm": irm, "dgd": form is not None, "seed": seed}
    if form is not None:
        weight = choices.weight(form) if student.weight == "balanced" else student.weight
        if weight is None:
            return None
        out |= {"dgd_form": form, "dgd_weight": weight}
    return out


# ---- the DGD weights ---------------------------------------------------------------------------------

def measure_balance(probe: Probe, choices: Choices) -> None:
    """Per DGD form, the weight that brings DGD's gradient level with the task's at the start of QAT
    (benchmarks/dgd_balance.py's measure): the median over this teacher's W2A2 and W3A3 students, without IRM
    and with IRM head, rounded to 2 significant digits."""
    import torch

    from dgd_balance import measure
    from qvit_export.trainer import Trainer

    rows = []
    for bits in BITS:
        for irm in (False, "head"):
            recipe = load_recipe(probe.student_recipe, {"teacher": str(probe.teacher), "w_bits": bits,
                                                                   "a_bits": bits, "irm": irm, "val_limit": 100})
            trainer = Trainer(recipe, probe.workdir / "dgd_balance_scratch", progress=False)
            for form in DGD_FORMS:
                torch.manual_seed(0)
                rows.append(measure(trainer, form=form))
                r = rows[-1]
                print(f"DGD balance W{bits}A{bits} irm={irm} {form}: DGD {r['dgd']:.2f}, gradient {r['ratio']:.1f}x "
                      f"the task's (level weight {1 / r['ratio']:.4f})", flush=True)
    weights = {form: float(f"{statistics.median(1 / r['ratio'] for r in rows if r['form'] == form):.2g}")
               for form in DGD_FORMS}
    write_text(choices.balance_path, json.dumps({"teacher": digest(probe.teacher), "weights": weights, "rows": rows},
                                                indent=2))


# ---- jobs ----------------------------------------------------------------------------------------------

def all_jobs(probes: dict[str, Probe], args) -> list[Job]:
    deep = probes["deep"]
    choices = Choices(deep)
    progress = not args.no_progress
    # the 2-block probe's teacher (only its W2A2 bottleneck runs need it) after the deep probe's first students
    jobs = [teacher_job(deep, progress), teacher_job(probes["probe"], progress, tier=12)]
    for probe in probes.values():  # the PTQ rows of the bottleneck tables as soon as the teacher is final (minutes)
        cache = probe.keep(f"ptq_bottleneck_{probe.name}.json")
        jobs.append(Job(name=f"{probe.name}/ptq_bottleneck", tier=-1, kind="measure", ready=probe.teacher_done,
                        done=lambda p=probe, c=cache: bottleneck.ptq_table(p.teacher, c, compute=False) is not None,
                        run=lambda p=probe, c=cache: bottleneck.ptq_table(p.teacher, c)))
    jobs.append(Job(name="deep/dgd_balance", tier=5, kind="measure", ready=deep.teacher_done,
                    done=lambda: choices.balance() is not None, run=lambda: measure_balance(deep, choices)))
    for student in STUDENTS:
        for seed in SEEDS:
            for bits in BITS:
                jobs.append(student_job(deep, job_name(student, bits, seed), student.tier * 10 + seed,
                                        lambda s=student, b=bits, sd=seed: overrides(choices, s, b, sd),
                                        progress=progress))
    names = {j.name for j in jobs}  # the bottleneck's 'everything' rows on the deep probe are the LSQ students
    return jobs + [j for j in bottleneck.qat_jobs(probes, progress) if j.name not in names]


# ---- report --------------------------------------------------------------------------------------------

DIAG_KEYS = ("q_entropy", "k_entropy", "attn_kl", "attn_distance", "attn_distance_fp", "dgd_cosine")


def diag_means(row: dict) -> dict | None:
    """Means over the blocks of one run's diagnostics; DGD in the cosine form for every run, so rows compare."""
    entries = row.get("attention")
    if not entries:
        return None
    out = {}
    for key in DIAG_KEYS:
        values = [e["dgd_forms"]["cosine"] if key == "dgd_cosine" else e[key] for e in entries]
        out[key] = None if any(v is None for v in values) else statistics.mean(values)
    return out


def summarise(probe: Probe, choices: Choices, fp_top1: float) -> list[dict]:
    table = []
    for bits in BITS:
        for student in STUDENTS:
            o = {seed: overrides(choices, student, bits, seed) for seed in SEEDS}
            runs = [r for seed in SEEDS if o[seed] is not None
                    and (r := run_row(probe, job_name(student, bits, seed), o[seed])) is not None]
            finals = [r["final"] for r in runs]
            starts = [r["start"] for r in runs if r["start"] is not None]
            diags = [d for r in runs if (d := diag_means(r)) is not None]
            diag = {k: (statistics.mean(d[k] for d in diags) if diags and all(d[k] is not None for d in diags)
                        else None) for k in DIAG_KEYS}
            first = next((v for v in o.values() if v is not None), None)
            table.append({"bits": bits, "student": student.slug, "label": student.label, "seeds_done": len(runs),
                          "whole": len(runs) == len(SEEDS), "values": finals,
                          "final": statistics.mean(finals) if finals else None,
                          "start": statistics.mean(starts) if starts else None,
                          "spread": max(finals) - min(finals) if finals else None,
                          "irm": first["irm"] if first else None, "dgd_form": first.get("dgd_form") if first else None,
                          "dgd_weight": first.get("dgd_weight") if first else None,
                          "diagnostics": diag, "per_block": [r.get("attention") for r in runs], "runs": runs})
    for bits in BITS:
        lsq = next(t for t in table if t["bits"] == bits and t["student"] == "lsq")
        for t in table:
            if t["bits"] == bits:
                t["vs_fp"] = t["final"] - fp_top1 if t["final"] is not None else None
                t["vs_lsq"] = (t["final"] - lsq["final"] if t["final"] is not None and lsq["whole"] and t["whole"]
                               else None)
    return table


def cell(value, fmt="{:.2f}"):
    return "–" if value is None else fmt.format(value)


def markdown_table(fp_top1: float, table: list[dict]) -> str:
    lines = ["| W/A | student | IRM | DGD form (weight) | start | final top-1 % (mean of 2 seeds) | spread | vs FP | vs LSQ "
             "| H(q) bits | H(k) bits | attn KL bits | attn distance px (FP) | DGD cosine | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 32/32 | FP teacher | | | | {fp_top1:.2f} | | | | | | | | | |"]
    for t in table:
        d = t["diagnostics"]
        form = "–" if t["dgd_form"] is None else f"{t['dgd_form']} ({t['dgd_weight']:g})"
        final = cell(t["final"]) + ("" if t["whole"] or t["final"] is None else f" ({t['seeds_done']} of 2 seeds)")
        dist = "–" if d["attn_distance"] is None else f"{d['attn_distance']:.2f} ({d['attn_distance_fp']:.2f})"
        lines.append(f"| {t['bits']}/{t['bits']} | {t['label']} | {t['irm'] or ('–' if t['irm'] is False else '?')} "
                     f"| {form} | {cell(t['start'])} | {final} | {cell(t['spread'])} | {cell(t['vs_fp'], '{:+.2f}')} "
                     f"| {cell(t['vs_lsq'], '{:+.2f}')} | {cell(d['q_entropy'], '{:.3f}')} | "
                     f"{cell(d['k_entropy'], '{:.3f}')} | {cell(d['attn_kl'], '{:.3f}')} | {dist} | "
                     f"{cell(d['dgd_cosine'], '{:.1f}')} | {', '.join(f'{v:.2f}' for v in t['values']) or '–'} |")
    return "\n".join(lines)


def targets(table: list[dict]) -> list[str]:
    """The issue's targets, checked on what is finished."""
    out = []
    for bits, need in ((2, 1.0), (3, 0.3)):
        rows = [t for t in table if t["bits"] == bits and t["whole"] and t["student"] != "lsq"]
        lsq = next(t for t in table if t["bits"] == bits and t["student"] == "lsq")
        if not rows or not lsq["whole"]:
            out.append(f"W{bits}A{bits}: not measured yet (LSQ or every Q-ViT configuration unfinished).")
            continue
        best = max(rows, key=lambda t: t["final"])
        met = "met" if best["vs_lsq"] >= need else "missed"
        line = (f"W{bits}A{bits}: the best Q-ViT configuration, {best['label']} ({best['final']:.2f}), is "
                f"{best['vs_lsq']:+.2f} against LSQ ({lsq['final']:.2f}): target LSQ + {need:.1f} {met}")
        dl, db = lsq["diagnostics"], best["diagnostics"]
        if dl["attn_kl"] is not None and db["attn_kl"] is not None:
            line += (f"; its attention KL from the teacher {db['attn_kl']:.3f} bits against LSQ's {dl['attn_kl']:.3f} "
                     f"({'lower' if db['attn_kl'] < dl['attn_kl'] else 'not lower'})")
        for variant in IRM_CHOICES:
            irm = next(t for t in table if t["bits"] == bits and t["student"] == f"lsq_irm_{variant}")
            di = irm["diagnostics"]
            if irm["whole"] and di["q_entropy"] is not None and dl["q_entropy"] is not None:
                raised = di["q_entropy"] > dl["q_entropy"] and di["k_entropy"] > dl["k_entropy"]
                line += (f"; IRM {variant}: H(q) {di['q_entropy']:.3f} / H(k) {di['k_entropy']:.3f} bits against LSQ's "
                         f"{dl['q_entropy']:.3f} / {dl['k_entropy']:.3f} ({'raised' if raised else 'not raised'})")
        out.append(line + ".")
    return out


def per_block_table(table: list[dict]) -> str:
    """Per block, mean of the seeds: LSQ, the IRM students and the best configuration."""
    lines = []
    for bits in BITS:
        rows = [t for t in table if t["bits"] == bits and t["student"] in ("lsq", "lsq_irm_head", "lsq_irm_token",
                                                                             "best_irm_best_dgd")
                and t["per_block"] and all(t["per_block"])]
        if not rows:
            continue
        lines += [f"\nW{bits}A{bits}, per block (mean of the seeds done): H(q) / H(k) bits, attention KL bits, "
                  "attention distance px (teacher's in brackets)\n",
                  "| block | " + " | ".join(t["label"] for t in rows) + " |", "|---|" + "---|" * len(rows)]
        for i, entry in enumerate(rows[0]["per_block"][0]):
            cells = []
            for t in rows:
                es = [pb[i] for pb in t["per_block"]]
                def m(k, es=es):
                    return statistics.mean(e[k] for e in es)
                cells.append(f"{m('q_entropy'):.2f} / {m('k_entropy'):.2f}, KL {m('attn_kl'):.3f}, "
                             f"{m('attn_distance'):.1f} ({m('attn_distance_fp'):.1f})")
            lines.append(f"| {entry['block']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(fp_top1: float, table: list[dict], path: Path) -> None:
    """Per width: final top-1 of every student (bars: mean; dots: seeds), and per block the q-code entropy,
    the attention KL from the teacher and the attention distance of each finished student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qvit_export.plots import save_figure

    fig, axes = plt.subplots(len(BITS), 4, figsize=(22, 5 * len(BITS)), squeeze=False)
    colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]  # 20 distinct: one per student row
    for row_axes, bits in zip(axes, BITS, strict=True):
        rows = [t for t in table if t["bits"] == bits]
        ax = row_axes[0]
        for i, t in enumerate(rows):
            if t["final"] is not None:
                ax.barh(i, t["final"], color=colors[i % len(colors)], alpha=0.7)
                ax.plot(t["values"], [i] * len(t["values"]), "k.", ms=5)
        ax.axvline(fp_top1, color="k", ls="--", lw=1, label=f"FP teacher {fp_top1:.2f}")
        lsq = rows[0]["final"]
        if lsq is not None:
            ax.axvline(lsq, color="tab:gray", ls=":", lw=1, label=f"LSQ {lsq:.2f}")
        finals = [t["final"] for t in rows if t["final"] is not None] + [fp_top1]
        ax.set_xlim(min(finals) - 1.5, max(finals) + 0.5)
        ax.set_yticks(range(len(rows)), [t["label"] for t in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"W{bits}A{bits}: top-1 % after QAT (10,000 test images)")
        ax.legend(fontsize=7)
        for ax, key, title in ((row_axes[1], "q_entropy", "quantized q code entropy (bits)"),
                               (row_axes[2], "attn_kl", "KL(teacher ‖ student) of attention rows (bits)"),
                               (row_axes[3], "attn_distance", "attention distance (px), teacher dashed")):
            fp_drawn = False
            for i, t in enumerate(rows):
                blocks = [pb for pb in t["per_block"] if pb]
                if not blocks:
                    continue
                n = len(blocks[0])
                ax.plot(range(n), [statistics.mean(pb[b][key] for pb in blocks) for b in range(n)], "o-",
                        color=colors[i % len(colors)], ms=3, lw=1, label=t["label"])
                if key == "attn_distance" and not fp_drawn:
                    ax.plot(range(n), [statistics.mean(pb[b]["attn_distance_fp"] for pb in blocks) for b in range(n)],
                            "k--", lw=2, label="FP teacher")
                    fp_drawn = True
            ax.set_xlabel("block")
            ax.set_title(f"W{bits}A{bits}: {title}")
            ax.grid(alpha=0.3)
        if row_axes[1].get_legend_handles_labels()[0]:
            row_axes[1].legend(fontsize=6)
    fig.suptitle("Q-ViT ablation on the deep probe (means of the seeds done)")
    fig.tight_layout()
    save_figure(fig, path)


def write_results(probes: dict[str, Probe], args) -> str | None:
    deep = probes["deep"]
    if not deep.teacher_done():
        return None
    choices = Choices(deep)
    fp = deep.fp()
    table = summarise(deep, choices, fp["top1"])
    recipe = load_recipe(deep.student_recipe)
    balance = choices.balance()
    weights = ("; DGD weights that balance its gradient with the task's on this teacher (median over W2A2/W3A3 "
               "students without IRM and with IRM head): " + ", ".join(f"{f} {w:g}" for f, w in balance["weights"].items())
               if balance else "; DGD weights not measured yet")
    saved = choices._saved()
    chosen = "; ".join(f"{k}: IRM {v.get('irm', '?')}, DGD form {v.get('form', '?')}" for k, v in saved.items())
    done = sum(len(t["runs"]) for t in table)
    where = Counter(r.get("device") or "a device not recorded" for t in table for r in t["runs"])
    when = datetime.date.today().isoformat()
    header = (f"Q-ViT ablation on the deep probe ({when}, {platform.machine()}, {os.cpu_count()} cores): teacher "
              f"{deep.teacher_recipe} ({fp['epochs']} epochs, {fp['train_minutes']:.0f} min of training, "
              f"{fp['top1']:.2f}%); each student: recipe {deep.student_recipe}, {recipe.epochs} epoch(s) of QAT on "
              f"{recipe.train_limit or 60000} training images, lr {recipe.lr:g}, soft logit distillation (weight "
              f"{recipe.distill_weight}), IRM fitted with {recipe.irm_steps} steps{weights}. Best choices "
              f"(made once both seeds of the candidates finished): {chosen or 'not made yet'}. {done} of "
              f"{len(STUDENTS) * len(BITS) * len(SEEDS)} runs finished ("
              f"{', '.join(f'{n} trained on {d}' for d, n in where.most_common()) or 'none'}; "
              f"{'bf16 autocast on CUDA' if recipe.amp else 'fp32 everywhere'}); "
              "top-1 on the 10,000 test images after the last epoch; diagnostics (qvit-report --attention) of each final student on the first 1,000 test images, "
              "mean over the blocks and the seeds.\n\n")
    text = (header + markdown_table(fp["top1"], table) + "\n\nTargets (mean of 2 seeds):\n\n"
            + "\n".join(f"- {line}" for line in targets(table)) + "\n" + per_block_table(table) + "\n")
    out = Path(args.results) / "ablation_deep"
    write_text(out.with_suffix(".md"), text)
    balance = {k: v for k, v in balance.items() if k != "teacher"} if balance else None  # no machine paths
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "fp": fp, "recipe": recipe.to_dict(), "dgd_balance": balance,
                                                     "choices": saved, "table": table}, indent=2))
    if any(t["final"] is not None for t in table):
        plot(fp["top1"], table, out.with_suffix(".png"))
    return text


def write_all(probes, args) -> None:
    try:
        bottleneck.write_report(args, probes, compute_ptq=False)
        write_results(probes, args)
    except Exception as e:  # noqa: BLE001 - a report failing must not stop the training queue
        print(f"report not written ({type(e).__name__}: {e})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bottleneck.add_common_args(p)
    p.add_argument("--worker", action="store_true", help="work through the queue until every job is done")
    p.add_argument("--report", action="store_true", help="write the results from the finished runs and stop")
    p.add_argument("--teacher-only", action="store_true", help="train (or continue) the deep teacher and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside a run")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks when nothing is ready")
    args = p.parse_args(argv)
    probes = bottleneck.probes_from(args)
    if args.teacher_only:
        teacher_job(probes["deep"], not args.no_progress).run()
        fp = probes["deep"].fp()
        print(f"deep teacher: top-1 {fp['top1']:.2f}% (best epoch {fp['best_epoch']} of {fp['epochs']}, "
              f"{fp['train_minutes']:.0f} min of training)")
        return 0
    if args.worker:
        work(lambda: all_jobs(probes, args), probes["deep"].workdir, lambda: write_all(probes, args), poll=args.poll)
    print(bottleneck.write_report(args, probes, compute_ptq=False))
    print(write_results(probes, args) or "the deep teacher is not trained yet: no ablation table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
