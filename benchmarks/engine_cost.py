"""What each TensorRT plan costs, read from its kernel listing: the FP16 float model against our exports.

    .venv/bin/python benchmarks/engine_cost.py [--models demo deit_tiny_patch16_224 ...] [--batches 1 32]
                                               [--targets sm89 sm86] [--out benchmarks/results]

Per model (random init, calibrated on real images: which kernels TensorRT picks does not depend on the weights'
values) and per plan, built ahead of time with TensorRT-RTX at a fixed batch (so that every tensor of the
listing has known dimensions): kernels, attention blocks run as one fused kernel, MB read and written by all
kernels (weights; activations = kernel inputs and outputs; of them FP32), GEMM work by datatype, and the
estimate on the GPU profiles of qvit_export/plan_cost.py built as that target, with its ratio to the FP16 float
model's plan. Plans: the FP16 float model; ``int8`` W8A8 with IRM off, head and token; ``int8`` W4A4 (IRM head)
with ``--attention fused`` and ``exact``; ``int4`` and ``int4-weight-only`` W4A4. Graphs in FP16 outside the QDQ
pairs. Writes engine_cost.{md,json,png}; a run goes on from the JSON it finds (one row at a time, resumable).

Estimates, not timings: no GPU here runs a TensorRT-RTX plan (docs/results.md says how far off the estimate is
from published measurements).

    .venv/bin/python benchmarks/engine_cost.py --check            # make bench-check: rebuild the baseline's plans
    .venv/bin/python benchmarks/engine_cost.py --update-baseline  # rewrite benchmarks/results/engine_cost_baseline.json

The baseline holds deit_small's SM89 batch-1 plans (FP16, int8 W8A8 IRM off and head, W4A4 fused): kernels, fused
attention blocks and MB moved. They are read from the plan, not timed, so ``--check`` allows no tolerance: a plan
with more kernels, fewer fused blocks or more bytes than its baseline is named, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvit_export import QuantConfig, QvitError, calibrate, create_model, quantize  # noqa: E402
from qvit_export.data import fashion_mnist, photo_batch  # noqa: E402
from qvit_export.demo import DEMO_KWARGS, DEMO_MODEL  # noqa: E402
from qvit_export.engine import build_plan  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx, input_shape  # noqa: E402
from qvit_export.plan_cost import GPU_PROFILES  # noqa: E402

from export_bench import export_fp  # noqa: E402  (benchmarks/ is the script's own folder)

MODELS = {  # name: (timm name, create_model kwargs)
    "demo": (DEMO_MODEL, DEMO_KWARGS),
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "eva02_tiny": ("eva02_tiny_patch14_224", {}),
    # DINOv2-S/14 with 4 registers at 224 px (261 tokens): at its 518-px default, 1,374 tokens pass the 512 that
    # TensorRT's INT8 fused attention takes (docs/design.md)
    "dinov2_s_reg4": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
}
# (row name, bits, IRM, export precision, attention)
PLANS = (("fp16", None, None, None, None),
         ("int8 W8A8 irm-off", 8, False, "int8", "fused"),
         ("int8 W8A8 irm-head", 8, "head", "int8", "fused"),
         ("int8 W8A8 irm-token", 8, "token", "int8", "fused"),
         ("int8 W4A4 fused", 4, "head", "int8", "fused"),
         ("int8 W4A4 exact", 4, "head", "int8", "exact"),
         ("int4 W4A4", 4, "head", "int4", "fused"),
         ("int4-weight-only W4A4", 4, "head", "int4-weight-only", "fused"))


def model_and_images(key: str):
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    fp = create_model(name, **kwargs).eval()
    images = fashion_mnist("test", limit=64).tensors[0] if key == "demo" else photo_batch(fp)
    return fp, images


def row_of(report: dict, target: str) -> dict:
    cost, anatomy = report["cost"], report["anatomy"]
    profiles = {name: p for name, p in GPU_PROFILES.items() if p.compute_capability == target}
    return {"kernels": anatomy["summary"]["kernels"], "attention": anatomy.get("attention"),
            "float_gemms": anatomy["summary"]["float_gemms"], "weight_casts": anatomy["summary"]["weight_casts"],
            "cost": cost, "estimated_ms": {name: cost["estimated_ms"][name] for name in profiles},
            "build_seconds": report["build_seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--targets", nargs="+", default=["sm89"])
    parser.add_argument("--plans", nargs="+", default=[p[0] for p in PLANS])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--check", action="store_true", help="rebuild the baseline's plans and compare (no tolerance)")
    parser.add_argument("--update-baseline", action="store_true", help="rewrite the baseline from the results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tensorrt_rtx_bindings as trt

    if args.check:  # fresh builds in a scratch folder, the committed results untouched
        import shutil

        scratch = Path(tempfile.mkdtemp(prefix="engine-cost-check-"))
        try:
            main(["--models", *CHECK["models"], "--plans", *CHECK["plans"], "--batches", "1", "--targets", "sm89",
                  "--out", str(scratch)])
            return check(json.loads((scratch / "engine_cost.json").read_text()))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    path = out / "engine_cost.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    results |= {"date": date.today().isoformat(), "tensorrt_rtx": trt.__version__, "graph_dtype": "fp16",
                "profiles": {name: p.to_dict() for name, p in GPU_PROFILES.items()}}
    plans = [p for p in PLANS if p[0] in args.plans]
    jobs = [(m, p) for m in args.models for p in plans]
    bar = tqdm(jobs, desc="plans", unit="graph")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        current, quantized = None, {}
        for key, (row, bits, irm, precision, attention) in bar:
            bar.set_postfix_str(f"{key} {row}")
            rows = results["models"].setdefault(key, {})
            wanted = [(t, b) for t in args.targets for b in args.batches if f"{t} b{b}" not in rows.get(row, {})]
            if not wanted:
                continue
            if current != key:
                fp, images = model_and_images(key)
                current, quantized = key, {}
            onnx_path = tmp / f"{key}_{row.replace(' ', '_')}.onnx"
            if bits is None:
                export_fp(fp, onnx_path, torch.float16, input_shape(fp))
            else:
                if (bits, irm) not in quantized:
                    quantized[bits, irm] = calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm=irm)),
                                                     [images], irm_steps=0, progress=False)
                export_onnx(quantized[bits, irm], onnx_path,
                            ExportOptions(precision=precision, dtype="fp16", attention=attention))
            for target, batch in wanted:
                start = time.perf_counter()
                try:
                    _, report, _ = build_plan(onnx_path, "tensorrt-rtx", target, fixed_batch=batch, progress=False)
                    entry = row_of(report, target)
                except QvitError as e:
                    entry = {"error": str(e)}
                entry["seconds"] = round(time.perf_counter() - start, 1)
                rows.setdefault(row, {})[f"{target} b{batch}"] = entry
                path.write_text(json.dumps(results, indent=2))
                tqdm.write(f"{key} {row} {target} b{batch}: " + (
                    f"{entry['kernels']} kernels, {entry['attention']['fused']}/{entry['attention']['blocks']} fused, "
                    f"{entry['cost']['mb']['total']:.1f} MB" if "error" not in entry else entry["error"]))
    (out / "engine_cost.md").write_text(markdown(results))
    plot(results, out / "engine_cost.png")
    print((out / "engine_cost.md").read_text())
    if args.update_baseline:
        BASELINE.write_text(json.dumps({"date": results["date"], "tensorrt_rtx": results["tensorrt_rtx"],
                                        "plans": baseline_figures(results)}, indent=2) + "\n")
        print(f"baseline written: {BASELINE.name}")
    return 0


BASELINE = Path(__file__).resolve().parent / "results" / "engine_cost_baseline.json"
CHECK = {"models": ["deit_small"], "plans": ["fp16", "int8 W8A8 irm-off", "int8 W8A8 irm-head", "int8 W4A4 fused"],
         "column": "sm89 b1"}


def baseline_figures(results: dict) -> dict[str, dict]:
    """{model/plan: {kernels, fused, mb}} of the baseline's plans in ``results``."""
    out = {}
    for key in CHECK["models"]:
        for row in CHECK["plans"]:
            e = results["models"].get(key, {}).get(row, {}).get(CHECK["column"])
            if e and "error" not in e:
                att = e["attention"] or {}
                fused = att["fused"] if att.get("blocks") else e["cost"]["fused_attention_kernels"]
                out[f"{key}/{row}"] = {"kernels": e["kernels"], "mb": round(e["cost"]["mb"]["total"], 3), "fused": fused}
    return out


def check(results: dict) -> int:
    """1 if any plan of the baseline got more kernels, fewer fused attention blocks or more bytes than it had."""
    if not BASELINE.is_file():
        print(f"no baseline at {BASELINE.name}: run with --update-baseline first", file=sys.stderr)
        return 1
    base, now = json.loads(BASELINE.read_text())["plans"], baseline_figures(results)
    worse = []
    for name, b in base.items():
        n = now.get(name)
        if n is None:
            worse.append(f"{name}: not built")
            continue
        for key, bad in (("kernels", n["kernels"] > b["kernels"]), ("fused", n["fused"] < b["fused"]),
                         ("mb", n["mb"] > b["mb"] * 1.001)):
            if bad:
                worse.append(f"{name}: {key} {n[key]} (baseline {b[key]})")
        print(f"{name}: {n['kernels']} kernels (baseline {b['kernels']}), {n['fused']} fused ({b['fused']}), "
              f"{n['mb']} MB ({b['mb']})")
    for line in worse:
        print("WORSE  " + line)
    if not worse:
        print("no plan is worse than its baseline")
    return 1 if worse else 0


def _fp16(rows: dict, column: str) -> dict | None:
    base = rows.get("fp16", {}).get(column)
    return base if base and "error" not in base else None


def markdown(results: dict) -> str:
    lines = [f"# Engine cost ({results['date']})", "",
             f"TensorRT-RTX {results['tensorrt_rtx']}, plans built ahead of time on a CPU-only machine at a fixed batch, "
             "graphs in FP16 outside the QDQ pairs, random-init models calibrated on real images. Figures are read from "
             "each plan's kernel listing (qvit_export/plan_cost.py): **estimates, not timings** (no GPU here runs a "
             "plan). ÷ FP16: the same figure for the FP16 float model's plan of the same target and batch.", ""]
    profiles = results["profiles"]
    for key, rows in results["models"].items():
        columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c.split()[0], int(c.split()[1][1:])))
        for column in columns:
            target = column.split()[0]
            names = [n for n, p in profiles.items() if p["compute_capability"] == target]
            base = _fp16(rows, column)
            lines += [f"## {key}, {column}", "",
                      "| plan | kernels | fused attention | MB moved | ÷ FP16 | weights MB | activations MB | of them FP32 "
                      "| INT8 GOPs | FP16 GOPs | " + " | ".join(f"{n} ms (÷ FP16)" for n in names) + " |",
                      "|---|" + "---|" * (10 + len(names))]
            for row, entries in rows.items():
                e = entries.get(column)
                if e is None:
                    continue
                if "error" in e:
                    lines.append(f"| {row} | build failed: {e['error'][:150]} |" + " |" * (9 + len(names)))
                    continue
                mb, gops = e["cost"]["mb"], e["cost"]["gops"]
                ratio = f"{mb['total'] / base['cost']['mb']['total']:.2f}" if base else "-"
                ms = [f"{e['estimated_ms'][n]:.3f} ({e['estimated_ms'][n] / base['estimated_ms'][n]:.2f})" if base
                      else f"{e['estimated_ms'][n]:.3f}" for n in names]
                att = e["attention"] or {}
                fused = f"{att['fused']}/{att['blocks']}" if att.get("blocks") else \
                    f"{e['cost']['fused_attention_kernels']} kernels"  # a float model: no quantized attention to name
                lines.append(f"| {row} | {e['kernels']} | {fused} | {mb['total']:.1f} | {ratio} | "
                             f"{mb['weights']:.1f} | {mb['activations']:.1f} | {mb['fp32_activations']:.1f} | "
                             f"{gops.get('Int8', 0):.2f} | {gops.get('Half', 0):.2f} | " + " | ".join(ms) + " |")
            lines.append("")
    lines += ["GPU profiles (qvit_export/plan_cost.py, sources in docs/results.md):", "",
              "| profile | built as | GB/s | INT8 TOPS | FP16 TFLOPS | launch µs |", "|---|---|---|---|---|---|"]
    for name, p in profiles.items():
        lines.append(f"| {name} | {p['compute_capability']} | {p['bandwidth_gbs']} | {p['int8_tops']} | "
                     f"{p['fp16_tflops']} | {p['launch_us']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """MB moved and estimated ms (first profile of the target) per plan, ÷ the FP16 plan, batch 1 and the largest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        rows = results["models"][key]
        columns = sorted({c for r in rows.values() for c in r if c.startswith("sm89")}, key=lambda c: int(c.split()[1][1:]))
        names = [r for r in rows if r != "fp16"]
        width = 0.8 / max(len(columns), 1)
        for i, column in enumerate(columns):
            base = _fp16(rows, column)
            if base is None:
                continue
            values = [rows[r][column]["cost"]["mb"]["total"] / base["cost"]["mb"]["total"]
                      if column in rows[r] and "error" not in rows[r][column] else 0 for r in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=f"MB moved ÷ FP16, {column}")
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(names))], names, rotation=60, fontsize=7,
                      ha="right")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
