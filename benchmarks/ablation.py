"""The Q-ViT ablation on Fashion-MNIST with the demo ViT: the FP teacher, and at each bit width four QAT students
(LSQ baseline, +IRM, +DGD, +IRM+DGD) over several seeds. All students get the same recipe (demo_w4a4 with the
overrides below, soft logit distillation included), so IRM and DGD are the only differences.

    .venv/bin/python benchmarks/ablation.py            # -> benchmarks/results/ablation.{md,json,png}

Runs land in runs/ablation/<variant>_w<b>a<b>_s<seed>/ and a finished run is reused, so the command can be
stopped and started again. Validation is the full 10,000-image test set; the figure is the best epoch's top-1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.plots import save_figure  # noqa: E402
from qvit_export.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from qvit_export.data import fashion_mnist  # noqa: E402
from qvit_export.recipe import load_recipe  # noqa: E402
from qvit_export.train import evaluate  # noqa: E402
from qvit_export.trainer import train_or_reuse  # noqa: E402

VARIANTS = {"LSQ": (False, False), "+IRM": (True, False), "+DGD": (False, True), "+IRM+DGD": (True, True)}


def teacher_path(args) -> Path:
    path = Path(args.teacher)
    return path if path.is_file() else train_or_reuse(load_recipe("demo_fp"), path.parent)


def run_variant(args, teacher: Path, variant: str, bits: int, seed: int) -> dict:
    irm, dgd = VARIANTS[variant]
    name = f"{variant.strip('+').replace('+', '_').lower()}_w{bits}a{bits}_s{seed}"
    overrides = {"name": name, "teacher": str(teacher), "w_bits": bits, "a_bits": bits, "irm": irm, "dgd": dgd,
                 "seed": seed, "epochs": args.epochs, "train_limit": args.train_limit, "irm_steps": args.irm_steps}
    if args.dgd_weight is not None:
        overrides["dgd_weight"] = args.dgd_weight
    start = time.perf_counter()
    best = train_or_reuse(load_recipe("demo_w4a4", overrides), Path(args.workdir) / name, progress=False)
    return {"variant": variant, "bits": bits, "seed": seed, "top1": read_checkpoint(best)["metrics"]["top1"],
            "seconds": time.perf_counter() - start, "run": str(best.parent)}


def summarise(fp_top1: float, rows: list[dict], bits_list, seeds) -> tuple[str, list[dict]]:
    table = []
    for bits in bits_list:
        for variant in VARIANTS:
            values = [r["top1"] for r in rows if r["bits"] == bits and r["variant"] == variant]
            table.append({"bits": bits, "variant": variant, "mean": statistics.mean(values),
                          "spread": max(values) - min(values), "values": values})
    lines = [f"| W/A | student | top-1 % (mean of {len(seeds)} seeds) | spread (max−min) | vs FP | seeds |",
             "|---|---|---|---|---|---|",
             f"| 32/32 | FP teacher | {fp_top1:.2f} | | | |"]
    for t in table:
        lines.append(f"| {t['bits']}/{t['bits']} | {t['variant']} | {t['mean']:.2f} | {t['spread']:.2f} | "
                     f"{t['mean'] - fp_top1:+.2f} | {', '.join(f'{v:.2f}' for v in t['values'])} |")
    return "\n".join(lines), table


def plot(fp_top1: float, table: list[dict], bits_list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.2
    for i, variant in enumerate(VARIANTS):
        xs = [b + (i - 1.5) * width for b in range(len(bits_list))]
        entries = [next(t for t in table if t["bits"] == bits and t["variant"] == variant) for bits in bits_list]
        means = [t["mean"] for t in entries]
        lows = [t["mean"] - min(t["values"]) for t in entries]
        highs = [max(t["values"]) - t["mean"] for t in entries]
        ax.bar(xs, means, width, yerr=[lows, highs], capsize=3, label=variant)
    ax.axhline(fp_top1, color="k", ls="--", lw=1, label=f"FP teacher {fp_top1:.2f}")
    ax.set_xticks(range(len(bits_list)), [f"W{b}A{b}" for b in bits_list])
    ax.set_ylabel("Fashion-MNIST top-1 %")
    lowest = min(min(t["values"]) for t in table)
    ax.set_ylim(max(0, lowest - 5), max(fp_top1, max(max(t["values"]) for t in table)) + 2)
    ax.legend(fontsize=8, ncol=3, loc="lower left")
    ax.set_title("Q-ViT ablation, demo ViT (bars: mean; whiskers: min–max over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/demo_fp/best.pt", help="FP teacher (trained with demo_fp if missing)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=10000, help="training images per epoch (CPU budget)")
    p.add_argument("--irm-steps", type=int, default=100)
    p.add_argument("--dgd-weight", type=float, help="default: the demo_w4a4 recipe's")
    p.add_argument("--workdir", default="runs/ablation")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablation"))
    args = p.parse_args(argv)

    teacher = teacher_path(args)
    fp = evaluate(load_checkpoint(teacher), fashion_mnist("test"), progress=False)["top1"]
    rows = []
    jobs = [(v, b, s) for b in args.bits for s in args.seeds for v in VARIANTS]
    for i, (variant, bits, seed) in enumerate(jobs, 1):
        row = run_variant(args, teacher, variant, bits, seed)
        rows.append(row)
        took = f"{row['seconds']:.0f} s"
        print(f"[{i}/{len(jobs)}] W{bits}A{bits} {variant:<9} seed {seed}: top-1 {row['top1']:.2f}% ({took})", flush=True)

    markdown, table = summarise(fp, rows, args.bits, args.seeds)
    when = datetime.date.today().isoformat()
    dgd_weight = args.dgd_weight if args.dgd_weight is not None else load_recipe("demo_w4a4")["dgd_weight"]
    header = (f"Q-ViT ablation on Fashion-MNIST ({when}, {platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}): demo ViT, teacher {teacher}; each student: recipe demo_w4a4, "
              f"{args.epochs} epoch(s) of QAT on {args.train_limit} training images, soft logit distillation, "
              f"DGD weight {dgd_weight}, IRM fitted with {args.irm_steps} steps; top-1 on the 10,000 test images.\n\n"
              f"Command: `.venv/bin/python benchmarks/ablation.py {' '.join(argv or sys.argv[1:])}`\n\n")
    out = Path(args.out)
    write_text(out.with_suffix(".md"), header + markdown + "\n")
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "fp_top1": fp, "args": vars(args), "runs": rows,
                                                     "table": table}, indent=2))
    plot(fp, table, args.bits, out.with_suffix(".png"))
    print(header + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
