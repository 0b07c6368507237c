"""The plan-cost estimate (qvit_export/plan_cost.py) against GPU latencies that others published.

    .venv/bin/python benchmarks/cost_check.py [--out benchmarks/results]

No GPU here runs a TensorRT plan, so the estimate is checked against measurements nobody here made: for each
published row, the same architecture (timm's vit_base_patch16_224, random init; the kernels TensorRT picks do not
depend on the weights) is exported as the FP16 float model and as our default ``int8`` W8A8 (IRM off, calibrated
on the photographs), built with TensorRT-RTX for the GPU's compute capability at the published batch, and its
estimate on that GPU's profile set beside the published figure. Writes cost_check.{md,json}.

The published rows (their software is not ours: the ratio of estimate to measurement, and whether INT8 ÷ FP16
lands on the same side of 1, are what the check reads):
- Jetson Orin Nano, TensorRT 10.3, batch 1 (onnxsim repository, scripts/nvidia/README.md): FP16 5.68 ms; INT8 on
  the Linear layers only (NVIDIA Model Optimizer) 4.92 ms;
- T4, FasterTransformer's ViT (docs/vit_guide.md, "INT8 vs. FP16 speedup on ViT", B_16-224, T4 at 1590 MHz):
  batch 1 FP16 3.43 ms, INT8 2.16 ms; batch 32 FP16 57.22 ms, INT8 35.43 ms.
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

from qvit_export import QuantConfig, calibrate, create_model, quantize  # noqa: E402
from qvit_export.data import photo_batch  # noqa: E402
from qvit_export.engine import build_plan  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx, float_baseline  # noqa: E402
from qvit_export.onnx_graph import save_atomic  # noqa: E402

MODEL = "vit_base_patch16_224"
# (GPU profile, target, batch, published FP16 ms, published INT8 ms, source)
PUBLISHED = (("orin-nano", "sm86", 1, 5.68, 4.92,
              "onnxsim repository, scripts/nvidia/README.md: TensorRT 10.3, INT8 on the Linears only"),
             ("t4", "sm75", 1, 3.43, 2.16, "FasterTransformer docs/vit_guide.md, B_16-224, fused INT8 attention"),
             ("t4", "sm75", 32, 57.22, 35.43, "FasterTransformer docs/vit_guide.md, B_16-224, fused INT8 attention"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    fp = create_model(MODEL).eval()
    qm = calibrate(quantize(fp, QuantConfig(w_bits=8, a_bits=8, irm=False)), [photo_batch(fp)], irm_steps=0,
                   progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graphs = {"fp16": save_atomic(float_baseline(qm), tmp / "fp16.onnx"),
                  "int8": export_onnx(qm, tmp / "int8.onnx", ExportOptions(dtype="fp16"))}
        for profile, target, batch, fp16_ms, int8_ms, source in PUBLISHED:
            row = {"profile": profile, "target": target, "batch": batch, "source": source,
                   "published_ms": {"fp16": fp16_ms, "int8": int8_ms}, "estimated_ms": {}, "kernels": {}, "mb": {}}
            for name, path in graphs.items():
                cost = build_plan(path, "tensorrt-rtx", target, fixed_batch=batch, progress=False)[1]["cost"]
                row["estimated_ms"][name] = cost["estimated_ms"][profile]
                row["kernels"][name], row["mb"][name] = cost["kernels"], round(cost["mb"]["total"], 2)
            print(row, flush=True)
            rows.append(row)
    results = {"date": date.today().isoformat(), "model": MODEL, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_check.json").write_text(json.dumps(results, indent=2))
    (out / "cost_check.md").write_text(markdown(results))
    print((out / "cost_check.md").read_text())
    return 0


def markdown(results: dict) -> str:
    lines = [f"# The plan-cost estimate against published latencies ({results['date']})", "",
             f"{results['model']}, random init; our plans: TensorRT-RTX, FP16 float model and our default int8 "
             "(W8A8, IRM off, fused attention), at the published batch, estimated on the GPU's profile "
             "(qvit_export/plan_cost.py). Published: others' software on a real GPU.", "",
             "| GPU | batch | kernels FP16 / int8 | MB FP16 / int8 | est. FP16 ms | published FP16 ms | est. ÷ published "
             "| est. int8 ms | published INT8 ms | est. ÷ published | est. INT8 ÷ FP16 | published INT8 ÷ FP16 | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        e, p = r["estimated_ms"], r["published_ms"]
        lines.append(f"| {r['profile']} ({r['target']}) | {r['batch']} | {r['kernels']['fp16']} / {r['kernels']['int8']} | "
                     f"{r['mb']['fp16']} / {r['mb']['int8']} | {e['fp16']:.2f} | {p['fp16']} | {e['fp16'] / p['fp16']:.2f} | "
                     f"{e['int8']:.2f} | {p['int8']} | {e['int8'] / p['int8']:.2f} | {e['int8'] / e['fp16']:.2f} | "
                     f"{p['int8'] / p['fp16']:.2f} | {r['source']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
