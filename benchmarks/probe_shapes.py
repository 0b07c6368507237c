"""How fast candidate probe shapes train on ONE core: what sized the deep probe (models/probe_deep_*.yaml).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_shapes.py   # -> benchmarks/results/probe_shapes.{md,json}

For each candidate ViT on Fashion-MNIST (28x28 grey, 10 classes): FP training steps (a teacher's, recipe
probe_fp) and QAT steps (a W2A2 student with IRM head, soft distillation and DGD on, the most expensive
student of the ablation; recipe probe_qat) of 128 images, through qvit-train's own Trainer, timed after
warm-up steps; the figure is the median over the timed steps, in images per second, and the minutes one
epoch of 60,000 images takes at that rate. The teacher weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.checkpoint import save_checkpoint  # noqa: E402
from qvit_export.recipe import load_recipe  # noqa: E402
from qvit_export.timm_models import create_model  # noqa: E402
from qvit_export.trainer import Trainer  # noqa: E402

BASE = {"img_size": 28, "in_chans": 1, "num_classes": 10}
# name: (patch, width, depth, heads); head_dim = width / heads
CANDIDATES = {
    "current probe (p4 w128 d2 h4)": (4, 128, 2, 4),
    "p4 w128 d4 h2 (hd64)": (4, 128, 4, 2),
    "p4 w128 d6 h2 (hd64)": (4, 128, 6, 2),
    "p4 w192 d4 h3 (hd64)": (4, 192, 4, 3),
    "p4 w192 d6 h3 (hd64, DeiT-Ti width)": (4, 192, 6, 3),
    "p4 w128 d6 h4 (hd32)": (4, 128, 6, 4),
    "p2 w128 d4 h2 (hd64, 197 tokens)": (2, 128, 4, 2),
}


def kwargs_of(shape) -> dict:
    patch, width, depth, heads = shape
    return BASE | {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads}


def timed_steps(trainer: Trainer, steps: int, warmup: int) -> list[float]:
    """Seconds per training step of the trainer's own _step, on real training batches."""
    batches = iter(trainer.loader)
    trainer.net.train()
    times = []
    for i in range(warmup + steps):
        x, y = next(batches)
        start = time.perf_counter()
        trainer._step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(name: str, shape, steps: int, warmup: int, workdir: Path) -> dict:
    kwargs = kwargs_of(shape)
    torch.manual_seed(0)
    fp_recipe = load_recipe("probe_fp", {"model_kwargs": kwargs, "val_limit": 100})
    fp = Trainer(fp_recipe, workdir / "fp", progress=False)
    fp_times = timed_steps(fp, steps, warmup)
    teacher = save_checkpoint(workdir / "teacher.pt", create_model(fp_recipe.model, **kwargs))
    qat_recipe = load_recipe("probe_qat", {"teacher": str(teacher), "w_bits": 2, "a_bits": 2, "irm": "head",
                                           "dgd": True, "dgd_form": "cosine", "calibration_images": 256, "irm_steps": 0,
                                           "val_limit": 100})
    qat = Trainer(qat_recipe, workdir / "qat", progress=False)
    qat_times = timed_steps(qat, steps, warmup)
    batch = fp_recipe.batch_size
    fp_rate, qat_rate = batch / statistics.median(fp_times), batch / statistics.median(qat_times)
    tokens = (28 // shape[0]) ** 2 + 1
    row = {"name": name, "kwargs": kwargs, "tokens": tokens, "head_dim": shape[1] // shape[3],
           "params_m": sum(p.numel() for p in fp.model.parameters()) / 1e6,
           "fp_img_s": fp_rate, "qat_img_s": qat_rate,
           "fp_epoch_min": 60000 / fp_rate / 60, "qat_epoch_min": 60000 / qat_rate / 60}
    print(f"{name}: FP {fp_rate:.0f} img/s ({row['fp_epoch_min']:.1f} min/epoch), QAT W2A2 {qat_rate:.0f} img/s "
          f"({row['qat_epoch_min']:.1f} min/epoch)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="measure these candidates only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_shapes"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CANDIDATES:
            rows.append(measure(name, CANDIDATES[name], args.steps, args.warmup, Path(tmp) / str(len(rows))))
    when = datetime.date.today().isoformat()
    lines = [f"Training speed of candidate probe shapes ({when}, {platform.machine()}, {threads} thread(s) of "
             f"{os.cpu_count()} cores, torch {torch.__version__}; batches of 128 Fashion-MNIST images through "
             f"qvit-train's Trainer, median of {args.steps} steps after {args.warmup} warm-up steps; QAT = W2A2, "
             "IRM head, soft distillation and DGD on; the machine was shared, so rates are indicative):", "",
             "| shape | tokens | head_dim | params (M) | FP img/s | FP min/epoch | QAT img/s | QAT min/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokens']} | {r['head_dim']} | {r['params_m']:.2f} | {r['fp_img_s']:.0f} | "
                     f"{r['fp_epoch_min']:.1f} | {r['qat_img_s']:.0f} | {r['qat_epoch_min']:.1f} |")
    out = Path(args.out)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "threads": threads, "steps": args.steps,
                                                     "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
