"""Engine anatomy benchmark: what TensorRT-RTX builds for each export precision, read back from the engine.

    .venv/bin/python benchmarks/engine_anatomy.py [--models demo deit_tiny_patch16_224 ...] [--out benchmarks/results]

For the demo ViT (Fashion-MNIST), deit_tiny, deit_small and swin_tiny (photographs), W4A4, graphs in FP16
around the QDQ pairs (TensorRT's speed form), SM89 plans built ahead of time with no GPU:
- FP16 (the float model), int8, int4 (INT4 weight blocks under INT8 activations), int4-weight-only;
- per plan: kernels, INT8×INT8 GEMMs, GEMMs with INT4 weights dequantized inside, float GEMMs, per-inference
  weight conversions (casts), plan MB, ONNX MB, build seconds; a build that fails is a row with its reason;
- the INT4 block coverage: the share of the ≤4-bit MatMul weights that blocks of 64 and of 128 can hold.
Writes engine_anatomy.{md,json,png}. Models are random-init and calibrated on real images: the kernels TensorRT
picks do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvit_export import QuantConfig, QvitError, calibrate, create_model, quantize  # noqa: E402
from qvit_export.anatomy import summary_line  # noqa: E402
from qvit_export.data import fashion_mnist, photo_batch  # noqa: E402
from qvit_export.demo import DEMO_KWARGS, DEMO_MODEL  # noqa: E402
from qvit_export.engine import build_engine  # noqa: E402
from qvit_export.onnx_export import INT4_BLOCKS, ExportOptions, export_onnx, input_shape, int4_layers  # noqa: E402

from export_bench import export_fp  # noqa: E402  (benchmarks/ is the script's own folder)

MODELS = ("demo", "deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
PRECISIONS = ("fp16", "int8", "int4", "int4-weight-only")


def model_and_images(name: str):
    torch.manual_seed(0)
    if name == "demo":
        fp = create_model(DEMO_MODEL, **DEMO_KWARGS).eval()
        return fp, fashion_mnist("test", limit=64).tensors[0]
    fp = create_model(name).eval()
    return fp, photo_batch(fp)


def coverage(qm) -> dict[int, float]:
    """{block: share of the ≤4-bit MatMul weight elements that go to INT4 with that block}."""
    sizes = {name: m.weight.numel() for name, m in qm.named_modules()
             if hasattr(m, "weight_quantizer") and m.weight.dim() == 2 and m.weight_quantizer.bits <= 4}
    total = sum(sizes.values())
    return {block: round(sum(sizes[n] for n in int4_layers(qm, block)[0]) / total, 4) for block in INT4_BLOCKS}


def build_row(onnx_path: Path, plan_path: Path) -> dict:
    row = {"onnx_mb": round(onnx_path.stat().st_size / 1e6, 3)}
    try:
        report = build_engine(onnx_path, plan_path, target="tensorrt-rtx", compute_capability="sm89",
                              allow_float_gemms=True)
    except QvitError as e:
        return row | {"error": str(e)}
    return row | {"plan_mb": round(report["plan_bytes"] / 1e6, 3), "build_seconds": report["build_seconds"],
                  "summary": report["anatomy"]["summary"], "int8_weight_gemms": report["anatomy"]["int8_weight_gemms"],
                  "line": summary_line(report["anatomy"]),
                  "reasons": sorted({e["reason"] for e in report["anatomy"]["layers"] if e["reason"]})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tensorrt_rtx_bindings as trt

    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "tensorrt_rtx": trt.__version__, "target": "sm89", "bits": "W4A4", "graph_dtype": "fp16", "models": {}}
    jobs = [(name, precision) for name in args.models for precision in PRECISIONS]
    bar = tqdm(jobs, desc="build", unit="plan")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        current = None
        for name, precision in bar:
            bar.set_postfix_str(f"{name} {precision}")
            if current != name:
                fp, images = model_and_images(name)
                qm = calibrate(quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=True)), [images], irm_steps=0,
                               progress=False)
                results["models"][name] = {"int4_coverage": coverage(qm), "precisions": {}}
                current = name
            onnx_path = tmp / f"{name}_{precision}.onnx"
            start = time.perf_counter()
            if precision == "fp16":
                export_fp(fp, onnx_path, torch.float16, input_shape(fp))
            else:
                export_onnx(qm, onnx_path, ExportOptions(precision=precision, dtype="fp16"))
            row = build_row(onnx_path, tmp / f"{name}_{precision}.plan") | {
                "export_and_build_seconds": round(time.perf_counter() - start, 2)}
            results["models"][name]["precisions"][precision] = row
            tqdm.write(f"{name} {precision}: " + row.get("line", row.get("error", "")))
    (out / "engine_anatomy.json").write_text(json.dumps(results, indent=2))
    (out / "engine_anatomy.md").write_text(markdown(results))
    plot(results, out / "engine_anatomy.png")
    print((out / "engine_anatomy.md").read_text())
    return 0


def markdown(results: dict) -> str:
    lines = [f"# Engine anatomy ({results['date']})", "",
             f"TensorRT-RTX {results['tensorrt_rtx']}, plans built ahead of time for {results['target'].upper()} on a "
             f"CPU-only machine ({results['machine']}); {results['bits']} models, graphs in "
             f"{results['graph_dtype'].upper()} outside the QDQ pairs. Counts are per inference, read from the "
             "engine's own kernel listing (qvit_export/anatomy.py).", "",
             "| model | precision | kernels | quantized layers | int8 GEMMs | int4-weight GEMMs | int8-weight GEMMs "
             "| float GEMMs | weight casts | unmatched | plan MB | ONNX MB | build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in results["models"].items():
        for precision, row in model["precisions"].items():
            if "error" in row:
                lines.append(f"| {name} | {precision} | build failed: {row['error'][:160]} |||||||||| {row['onnx_mb']} | |")
                continue
            s = row["summary"]
            lines.append(f"| {name} | {precision} | {s['kernels']} | {s['quantized_layers']} | {s['int8_gemms']} | "
                         f"{s['int4_weight_gemms']} | {row['int8_weight_gemms']} | {s['float_gemms']} | "
                         f"{s['weight_casts']} | {s['unmatched']} | {row['plan_mb']:.2f} | {row['onnx_mb']:.2f} | "
                         f"{row['build_seconds']:.1f} |")
    lines += ["", "INT4 block coverage: share of the ≤4-bit MatMul weights that INT4 blocks can hold "
              "(the rest keep INT8 weights: K is no multiple of the block).", "",
              "| model | " + " | ".join(f"block {b}" for b in INT4_BLOCKS) + " |", "|---|" + "---|" * len(INT4_BLOCKS)]
    for name, model in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{model['int4_coverage'][b]:.0%}" for b in model["int4_coverage"]) + " |")
    reasons = sorted({r for m in results["models"].values() for row in m["precisions"].values()
                      for r in row.get("reasons", [])})
    if reasons:
        lines += ["", "Layers not on INT8×INT8 by the export's choice, with the reasons the reports give:", ""]
        lines += [f"- {r}" for r in reasons[:12]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = (("int8_gemms", "int8 GEMM"), ("int4_weight_gemms", "int4-weight GEMM"),
             ("int8_weight_gemms", "int8-weight GEMM"), ("float_gemms", "float GEMM"), ("weight_casts", "weight cast"))
    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), sharey=False)
    for ax, name in zip(axes if len(names) > 1 else [axes], names, strict=True):
        rows = results["models"][name]["precisions"]
        labels = list(rows)
        bottom = [0] * len(labels)
        for key, label in kinds:
            values = [(rows[p]["summary"].get(key) if key in rows[p]["summary"] else rows[p].get(key, 0))
                      if "summary" in rows[p] else 0 for p in labels]
            ax.bar(labels, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for i, p in enumerate(labels):
            if "error" in rows[p]:
                ax.text(i, 0.5, "build\nfailed", ha="center", fontsize=8)
            elif rows[p]["summary"]["quantized_layers"] == 0:
                ax.text(i, 0.5, "float\nmodel", ha="center", fontsize=7)
        ax.set_title(name.split("_patch")[0], fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    label = "GEMMs (split qkv: 3) + weight casts"
    axes[0].set_ylabel(label, fontsize=8) if len(names) > 1 else axes.set_ylabel(label, fontsize=8)
    (axes[0] if len(names) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
