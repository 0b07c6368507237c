"""What one LSQ fake quantization costs on the CPU, forward and backward: qvit_export's (one autograd Function) against
the same maths composed from autograd ops (what lsq.py did before), on the deep probe's tensors, and a whole QAT
step of its W2A2 student through qvit-train's Trainer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lsq_speed.py   # -> benchmarks/results/lsq_speed.{md,json}

Both forms are checked first: the same forward bit for bit, the same gradients to float32 rounding. Figures are
medians of repeated runs on one thread; nothing else may run beside it (the training queue paused).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.lsq import WEIGHT, LSQQuantizer, _scale_grad  # noqa: E402

# (what, shape, per-channel weight?) at batch 128 on the deep probe (50 tokens, width 128, 2 heads of 64)
TENSORS = (("fc1 output / fc2 input, [128, 50, 512]", (128, 50, 512), False),
           ("q or k of both heads, [128, 2, 50, 64]", (128, 2, 50, 64), False),
           ("attention probabilities, [128, 2, 50, 50]", (128, 2, 50, 50), False),
           ("fc1 weight per channel, [512, 128]", (512, 128), True))


def composed(q: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The same fake quantization from autograd ops: round with a straight-through gradient, clamp, product."""
    n = x.numel() / (x.shape[0] if q.per_tensor else q.step.numel())
    s = _scale_grad(q.step.clamp_min(torch.finfo(q.step.dtype).tiny), 1.0 / math.sqrt(n * q.qmax))
    v = torch.clamp(x / s, q.qmin, q.qmax)
    return (v + (v.round() - v).detach()) * s


def quantizer(shape, weight: bool) -> LSQQuantizer:
    if weight:
        q = LSQQuantizer(2, (shape[0], 1), name="w", role=WEIGHT)
        q.set_step(torch.rand(shape[0], 1) * 0.05 + 0.01)
    else:
        q = LSQQuantizer(2, name="a")
        q.set_step(torch.tensor(0.4))
    return q


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def one(label, shape, weight, repeats) -> dict:
    torch.manual_seed(0)
    x = (torch.randn(shape) * (0.02 if weight else 1.0)).requires_grad_(True)
    up = torch.randn(shape)
    q = quantizer(shape, weight)
    grads = {}
    for name, fn in (("function", q), ("composed", lambda t: composed(q, t))):
        x.grad, q.step.grad = None, None
        out = fn(x)
        (out * up).sum().backward()
        grads[name] = (out.detach(), x.grad.clone(), q.step.grad.clone())
    (fa, xa, sa), (fb, xb, sb) = grads["function"], grads["composed"]
    if not torch.equal(fa, fb):
        raise SystemExit(f"{label}: the forwards differ")
    torch.testing.assert_close(xa, xb, rtol=1e-6, atol=0)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-6)

    def step(fn):
        def run():
            x.grad, q.step.grad = None, None
            (fn(x) * up).sum().backward()
        return run

    row = {"tensor": label, "elements": math.prod(shape)}
    for name, fn in (("composed", lambda t: composed(q, t)), ("function", q)):
        step(fn)()  # warm-up
        row[f"{name}_ms"] = timed(step(fn), repeats)
    row["speedup"] = row["composed_ms"] / row["function_ms"]
    return row


def student_step(irm, dgd: bool, steps: int) -> float:
    """img/s of the deep probe's W2A2 student (random teacher: speed does not depend on its weights)."""
    from probe_shapes import kwargs_of, timed_steps

    from qvit_export.checkpoint import save_checkpoint
    from qvit_export.recipe import load_recipe
    from qvit_export.timm_models import create_model
    from qvit_export.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        kw = kwargs_of((4, 128, 6, 2))
        save_checkpoint(Path(tmp) / "t.pt", create_model("vit_tiny_patch16_224", **kw),
                        model_name="vit_tiny_patch16_224", model_kwargs=kw)
        recipe = load_recipe("probe_deep_qat", {"teacher": str(Path(tmp) / "t.pt"), "w_bits": 2, "a_bits": 2,
                                                "irm": irm, "dgd": dgd, "dgd_form": "cosine", "train_limit": 4096,
                                                "val_limit": 128, "calibration_images": 256, "irm_steps": 0})
        trainer = Trainer(recipe, Path(tmp) / "run", progress=False)
        return 128 / statistics.median(timed_steps(trainer, steps, 3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lsq_speed"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    rows = [one(label, shape, weight, args.repeats) for label, shape, weight in TENSORS]
    for r in rows:
        print(f"{r['tensor']}: composed {r['composed_ms']:.2f} ms, function {r['function_ms']:.2f} ms "
              f"({r['speedup']:.2f}x)", flush=True)
    students = {}
    for label, irm, dgd in (("LSQ", False, False), ("IRM head + DGD cosine", "head", True)):
        students[label] = student_step(irm, dgd, args.steps)
        print(f"W2A2 student, {label}: {students[label]:.1f} img/s", flush=True)
    when = datetime.date.today().isoformat()
    lines = [f"LSQ fake quantization, forward + backward, float32 ({when}, {platform.machine()}, {threads} thread(s) "
             f"of {os.cpu_count()} cores, torch {torch.__version__}; median of {args.repeats}; W2A2 steps, per "
             "tensor for activations, per channel for the weight; both forms checked equal first: forward bit for "
             "bit, gradients to float32 rounding):", "",
             "| tensor | composed autograd ops ms | one autograd Function ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['tensor']} | {r['composed_ms']:.2f} | {r['function_ms']:.2f} | {r['speedup']:.2f}x |"
              for r in rows]
    shapes = json.loads((ROOT / "benchmarks" / "results" / "probe_shapes.json").read_text())
    before = next(r for r in shapes["rows"] if r["kwargs"]["depth"] == 6 and r["kwargs"]["embed_dim"] == 128
                  and r["kwargs"]["num_heads"] == 2)
    lines += ["", f"A whole QAT step of the deep probe's W2A2 student (qvit-train's Trainer, batches of 128, median of "
              f"{args.steps} steps after 3 warm-up steps; benchmarks/results/probe_shapes.md measured "
              f"{before['qat_img_s']:.0f} img/s for the IRM head + DGD student with the composed form on "
              f"{shapes['date']}, on a shared machine):", "",
              "| student | img/s | min per epoch of 60,000 |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {60000 / v / 60:.1f} |" for k, v in students.items()]
    out = Path(args.out)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "threads": threads, "tensors": rows,
                                                     "student_img_per_s": students}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
