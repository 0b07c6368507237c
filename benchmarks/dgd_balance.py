"""Why DGD needs a weight: at the start of QAT, how large is its gradient next to the task loss's?

    .venv/bin/python benchmarks/dgd_balance.py        # -> benchmarks/results/dgd_balance.{md,json}

For the probe teacher's W4A4 and W2A2 students (recipe probe_qat; without IRM and with each fitted IRM variant),
calibrated as qvit-train does, one batch of 256 training images: the task loss (the recipe's 0.5 CE + 0.5 soft
distillation), DGD in its cosine form at weight 1 (measure(form=...) takes the others), the gradient norms of both on the transformer blocks'
weight matrices, their ratio and cosine, and the weight that would bring the two gradients level (1/ratio).
--recipe demo_w4a4 --teacher runs/demo/fp/best.pt measures the demo student instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.distill import dgd_loss, logit_distillation, tapped  # noqa: E402
from qvit_export.recipe import Recipe, load_recipe  # noqa: E402
from qvit_export.trainer import Trainer, read_resume  # noqa: E402


def fresh_student(recipe_name: str, teacher: str, bits: int, irm: bool | str) -> Trainer:
    """A student as QAT starts: calibrated (IRM fitted) by the trainer, as qvit-train would."""
    recipe = load_recipe(recipe_name, {"teacher": teacher, "w_bits": bits, "a_bits": bits, "irm": irm,
                                       "val_limit": 100})
    return Trainer(recipe, Path("runs/dgd_balance"), progress=False)


def trained_student(run: Path) -> Trainer:
    """A student where its QAT run ended (the run's last.pt); the run folder is only read."""
    resume = read_resume(run / "last.pt")
    return Trainer(Recipe.from_saved(resume["extra"]["recipe"]), Path("runs/dgd_balance"), resume=resume, progress=False)


def measure(trainer: Trainer, images: int = 256, form: str = "cosine") -> dict:
    """Task loss, DGD (weight 1, in ``form``) and their gradients on the blocks' weight matrices, for one batch."""
    bits, irm = trainer.recipe.quant.w_bits, trainer.recipe.quant.irm
    x = torch.stack([trainer.train_set[i][0] for i in range(images)])
    y = torch.tensor([trainer.train_set[i][1] for i in range(images)])
    model = trainer.model.train()
    weights = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim > 1 and "quantizer" not in n]
    with tapped(model, trainer.teacher) as (student_tap, teacher_tap):
        logits = model(x)
        with torch.no_grad():
            teacher_logits = trainer.teacher(x)
        dgd = dgd_loss(student_tap, teacher_tap, form)
    alpha = trainer.recipe.distill_weight
    task = (1 - alpha) * F.cross_entropy(logits, y) + alpha * logit_distillation(logits, teacher_logits, "soft")
    g_task = torch.autograd.grad(task, weights, retain_graph=True)
    g_dgd = torch.autograd.grad(dgd, weights, allow_unused=True)
    g_dgd = [torch.zeros_like(w) if g is None else g for g, w in zip(g_dgd, weights, strict=True)]
    n_task = torch.sqrt(sum((g ** 2).sum() for g in g_task)).item()
    n_dgd = torch.sqrt(sum((g ** 2).sum() for g in g_dgd)).item()
    cos = (sum((a * b).sum() for a, b in zip(g_task, g_dgd, strict=True)) / (n_task * n_dgd)).item()
    return {"bits": bits, "irm": irm, "form": form, "task_loss": task.item(), "dgd": dgd.item(), "grad_task": n_task,
            "grad_dgd": n_dgd, "ratio": n_dgd / n_task, "cosine": cos, "dgd_weight": trainer.recipe.dgd_weight}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="probe_qat", help="the student recipe (default probe_qat)")
    p.add_argument("--teacher", help="FP teacher (default: the recipe's)")
    p.add_argument("--irm", nargs="+", default=["none", "token", "head"], help="IRM variants to measure (none: no IRM)")
    p.add_argument("--runs", nargs="+", type=Path,
                   help="measure these finished QAT runs where they ended instead (-> dgd_balance_end.{md,json})")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = args.teacher or load_recipe(args.recipe).teacher
    if args.runs:
        rows = [measure(trained_student(run)) | {"run": str(run)} for run in args.runs]
    else:
        rows = [measure(fresh_student(args.recipe, teacher, bits, False if irm == "none" else irm))
                for irm in args.irm for bits in (4, 2)]
    lines = ["| student | task loss | DGD (weight 1) | ‖∇ task‖ | ‖∇ DGD‖ | ratio | cosine | level weight | "
             "ratio × recipe weight |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        irm = f" + IRM {r['irm']}" if r["irm"] else ""
        name = Path(r["run"]).name if "run" in r else f"W{r['bits']}A{r['bits']}{irm}"
        lines.append(f"| {name} | {r['task_loss']:.3f} | {r['dgd']:.1f} | {r['grad_task']:.2f} | "
                     f"{r['grad_dgd']:.1f} | {r['ratio']:.0f}× | {r['cosine']:+.3f} | {1 / r['ratio']:.4f} | "
                     f"{r['ratio'] * r['dgd_weight']:.2f} ({r['dgd_weight']:g}) |")
    level = statistics.median(1 / r["ratio"] for r in rows)
    when = datetime.date.today().isoformat()
    where = f"at the end of the QAT runs {', '.join(r['run'] for r in rows)}" if args.runs else "at the start of QAT"
    text = (f"DGD against the task loss {where} ({when}; recipe {args.recipe}, teacher {teacher}; one "
            "batch of 256 Fashion-MNIST training images; gradients on the blocks' weight matrices; level weight = "
            "the DGD weight at which both gradients have the same norm):\n\n" + "\n".join(lines) +
            f"\n\nMedian level weight: {level:.4f}.\n")
    out = ROOT / "benchmarks" / "results" / ("dgd_balance_end" if args.runs else "dgd_balance")
    write_text(out.with_suffix(".md"), text)
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "recipe": args.recipe, "teacher": teacher,
                                                     "rows": rows, "median_level_weight": level}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
