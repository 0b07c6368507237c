"""What ``--attention fused`` costs in accuracy and what it saves in the plan, on trained low-bit students.

    .venv/bin/python benchmarks/attention_modes.py --student NAME=CKPT [--student ...] [--out benchmarks/results]

For each student (a checkpoint of ours, trained on Fashion-MNIST) and each attention mode:
- top-1 on the 10,000 Fashion-MNIST test images through ONNX Runtime, of the ``int8`` export (FP32 graph), beside
  the student's own top-1 in PyTorch (the trained b-bit function) and the share of test images whose ONNX top-1
  equals PyTorch's;
- the share of attention probabilities (softmax outputs, every block, head and query of the first 500 test
  images) whose code passes the b-bit range, the only place where ``fused`` and ``exact`` differ in the
  probabilities;
- the SM89 plan of the FP16 export at batch 1 and 32 (TensorRT-RTX, ahead of time): kernels, fused attention
  blocks, MB moved and the estimate on the profiles built as SM89 (plan_cost.py).
Writes attention_modes.{md,json}. ``exact`` is the trained maths; ``fused`` is what TensorRT fuses.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvit_export import load_checkpoint  # noqa: E402
from qvit_export.config import ATTENTION_MODES  # noqa: E402
from qvit_export.data import fashion_mnist  # noqa: E402
from qvit_export.engine import build_plan  # noqa: E402
from qvit_export.evaluation import evaluate  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from qvit_export.parity import OnnxModule  # noqa: E402
from qvit_export.plan_cost import GPU_PROFILES  # noqa: E402


@torch.no_grad()
def passing_share(model, images: torch.Tensor) -> float:
    """Percent of attention-probability codes past the b-bit range (clamped by ``exact``, kept by ``fused``)."""
    from qvit_export.layers import QuantAttentionMixin

    counts = {"past": 0, "all": 0}
    hooks = []
    for _, attn in model.named_modules():
        if isinstance(attn, QuantAttentionMixin):
            q = attn.attn_quantizer

            def hook(m, inputs, output, q=q):
                codes = torch.round(inputs[0].float() / q.scale().float())
                counts["past"] += int((codes > q.qmax).sum())
                counts["all"] += codes.numel()
            hooks.append(q.register_forward_hook(hook))
    try:
        for x in images.split(100):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return 100.0 * counts["past"] / max(counts["all"], 1)


def plan_row(model, tmp: Path, mode: str, batch: int) -> dict:
    path = export_onnx(model, tmp / f"{mode}_fp16.onnx", ExportOptions(dtype="fp16", attention=mode))
    report = build_plan(path, "tensorrt-rtx", "sm89", fixed_batch=batch, progress=False)[1]
    cost, attention = report["cost"], report["anatomy"]["attention"]
    return {"kernels": cost["kernels"], "fused": f"{attention['fused']}/{attention['blocks']}",
            "mb": round(cost["mb"]["total"], 2),
            "estimated_ms": {n: cost["estimated_ms"][n] for n, p in GPU_PROFILES.items()
                             if p.compute_capability == "sm89"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", required=True, metavar="NAME=CKPT")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    test = fashion_mnist("test")
    results = {"date": date.today().isoformat(), "images": len(test), "students": {}}
    for spec in args.student:
        name, _, ckpt = spec.partition("=")
        model = load_checkpoint(ckpt).eval()
        cfg = model.qvit_config
        row = {"checkpoint": Path(ckpt).name, "bits": f"W{cfg.w_bits}A{cfg.a_bits}", "irm": cfg.irm,
               "pytorch_top1": evaluate(model, test, desc=f"{name} PyTorch")["top1"],
               "past_range_percent": round(passing_share(model, test.tensors[0][:500]), 4), "modes": {}}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for mode in ATTENTION_MODES:
                path = export_onnx(model, tmp / f"{mode}.onnx", ExportOptions(attention=mode))
                onnx_model = OnnxModule(path)
                metrics = evaluate(onnx_model, test, desc=f"{name} ORT {mode}")
                row["modes"][mode] = {"ort_top1": metrics["top1"],
                                      "plans": {f"b{b}": plan_row(model, tmp, mode, b) for b in (1, 32)}}
                print(name, mode, row["modes"][mode], flush=True)
        results["students"][name] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_modes.json").write_text(json.dumps(results, indent=2))
    (out / "attention_modes.md").write_text(markdown(results))
    print((out / "attention_modes.md").read_text())
    return 0


def markdown(results: dict) -> str:
    lines = [f"# Attention below 8 bits: fused or exact ({results['date']})", "",
             f"Top-1 on the {results['images']:,} Fashion-MNIST test images through ONNX Runtime (int8 export, FP32 "
             "graph); plans: FP16 export, TensorRT-RTX, SM89, fixed batch, read from the kernel listing "
             "(estimates, not timings).", "",
             "| student | bits | IRM | PyTorch top-1 | probabilities past the b-bit range | mode | ORT top-1 | Δ vs "
             "PyTorch | kernels b1 | fused b1 | MB b1 | est. ms b1 (rtx4090 / l4) | MB b32 | est. ms b32 (rtx4090 / l4) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["students"].items():
        for mode, m in row["modes"].items():
            b1, b32 = m["plans"]["b1"], m["plans"]["b32"]
            ms1 = " / ".join(f"{b1['estimated_ms'][p]:.3f}" for p in ("rtx4090", "l4") if p in b1["estimated_ms"])
            ms32 = " / ".join(f"{b32['estimated_ms'][p]:.3f}" for p in ("rtx4090", "l4") if p in b32["estimated_ms"])
            lines.append(f"| {name} | {row['bits']} | {row['irm']} | {row['pytorch_top1']:.2f} | "
                         f"{row['past_range_percent']:.3f}% | {mode} | {m['ort_top1']:.2f} | "
                         f"{m['ort_top1'] - row['pytorch_top1']:+.2f} | {b1['kernels']} | {b1['fused']} | {b1['mb']} | "
                         f"{ms1} | {b32['mb']} | {ms32} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
