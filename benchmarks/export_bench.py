"""Export benchmark: ONNX Runtime CPU latency of the FP32 model vs our QDQ exports, export wall time of both
export routes (torch.export 'dynamo', the default, and PyTorch's deprecated TorchScript exporter), and
TensorRT-RTX plan sizes (FP16 / INT8 / INT4), measured side by side in one run.

    .venv/bin/python benchmarks/export_bench.py [--models deit_tiny_patch16_224 deit_small_patch16_224 ...]
                                                [--repeats 15] [--export-repeats 3] [--out benchmarks/results]

Models are random-init (no model hub here): latency and size do not depend on the weights' values. Latency
runs are interleaved round-robin across the variants of one model and batch size, so machine noise hits
them alike; the table reports medians and the ratio to FP32. Export times are medians of ``--export-repeats``
exports per route, the routes interleaved; each graph of a route is checked to hold the same QDQ nodes as the
other's before it is timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvit_export import QuantConfig, calibrate, create_model, quantize  # noqa: E402
from qvit_export.data import photo_batch  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx, onnx_model  # noqa: E402
from qvit_export.onnx_graph import qdq_counts, save_atomic  # noqa: E402
from qvit_export.onnx_routes import DEFAULT_ROUTE, ROUTES, route  # noqa: E402
from qvit_export.parity import ort_session  # noqa: E402


def export_fp(model, path: Path, dtype=torch.float32, shape=(3, 224, 224)) -> Path:
    """The float model as timm gives it, through the default export route at opset 18 (its lowest native one)."""
    model = model.to(dtype).eval()
    save_atomic(route(DEFAULT_ROUTE).trace(model, torch.zeros(2, *shape, dtype=dtype), 18, True), path)
    model.float()
    return path


def export_seconds(qm, repeats: int) -> dict[str, float]:
    """{route: median seconds of onnx_model (trace, onnxsim, checks)}, the routes interleaved."""
    times = {name: [] for name in ROUTES}
    counts = {}
    for _ in range(repeats):
        for name in ROUTES:
            start = time.perf_counter()
            graph = onnx_model(qm, ExportOptions(exporter=name))
            times[name].append(time.perf_counter() - start)
            counts[name] = qdq_counts(graph)
    if len({tuple(sorted(c.items())) for c in counts.values()}) != 1:
        raise SystemExit(f"the routes wrote different QDQ nodes: {counts}")
    return {name: statistics.median(t) for name, t in times.items()}


def latency(paths: dict[str, Path], images: torch.Tensor, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per run of each model at ``batch``, runs interleaved round-robin."""
    x = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch].numpy()
    sessions = {k: ort_session(p) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x.astype(np.float16 if "float16" in s.get_inputs()[0].type else np.float32)}
             for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def plan_size(onnx_path: Path, plan_path: Path) -> int | None:
    try:
        from qvit_export.engine import build_engine

        return build_engine(onnx_path, plan_path, target="tensorrt-rtx", compute_capability="sm89")["plan_bytes"]
    except Exception as e:  # noqa: BLE001 - report, don't stop the benchmark
        print(f"  plan for {onnx_path.name} not built: {e}")
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--plans-for", default="deit_small_patch16_224")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": date.today().isoformat(), "export_repeats": args.export_repeats, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
               f"{platform.processor() or 'cpu'}", "onnxruntime_threads": "default", "models": {}}
    import onnxruntime

    import onnxscript

    results["versions"] = {"torch": torch.__version__, "onnxscript": onnxscript.__version__,
                           "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            print(f"{name}:")
            torch.manual_seed(0)
            fp = create_model(name).eval()
            images = photo_batch(fp)
            paths = {"FP32": export_fp(fp, tmp / f"{name}_fp32.onnx")}
            row = {"export_seconds": {}, "onnx_mb": {}}
            for bits in (8, 4):
                qm = calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm=True)), [images], irm_steps=0)
                paths[f"W{bits}A{bits} QDQ"] = export_onnx(qm, tmp / f"{name}_w{bits}.onnx")
                seconds = export_seconds(qm, args.export_repeats)
                row["export_seconds"][f"W{bits}A{bits}"] = {k: round(v, 2) for k, v in seconds.items()}
                print(f"  W{bits}A{bits} export: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
                if name == args.plans_for:
                    row.setdefault("plans", {})
                    fp16 = export_fp(fp, tmp / f"{name}_fp16.onnx", torch.float16)
                    row["plans"]["FP16"] = plan_size(fp16, tmp / "fp16.plan")
                    prec = "int8" if bits == 8 else "int4"
                    q16 = export_onnx(qm, tmp / f"{name}_w{bits}_{prec}_fp16.onnx", ExportOptions(precision=prec, dtype="fp16"))
                    row["plans"][f"W{bits}A{bits} {prec.upper()} (fp16 graph)"] = plan_size(q16, tmp / f"{prec}.plan")
            row["onnx_mb"] = {k: round(p.stat().st_size / 1e6, 2) for k, p in paths.items()}
            for batch in (1, 32):
                med = latency(paths, images, batch, args.repeats if batch == 1 else max(5, args.repeats // 3))
                row[f"latency_ms_b{batch}"] = {k: round(v * 1e3, 2) for k, v in med.items()}
                print(f"  batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
            results["models"][name] = row
    (out / "export_bench.json").write_text(json.dumps(results, indent=2))
    (out / "export_bench.md").write_text(markdown(results))
    plot(results, out / "export_bench.png")
    print((out / "export_bench.md").read_text())
    return 0


def markdown(results: dict) -> str:
    lines = [f"# Export benchmark ({results['date']})", "",
             f"Machine: {results['machine']}; {', '.join(f'{k} {v}' for k, v in results['versions'].items())}. "
             "ONNX Runtime CPU execution provider, default graph optimizations; medians of interleaved runs.", "",
             "| model | variant | ONNX MB | batch 1 ms | vs FP32 | batch 32 ms | vs FP32 |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["models"].items():
        b1, b32 = row["latency_ms_b1"], row["latency_ms_b32"]
        for variant in b1:
            lines.append(f"| {name} | {variant} | {row['onnx_mb'][variant]} | {b1[variant]} | "
                         f"{b1[variant] / b1['FP32']:.2f}× | {b32[variant]} | {b32[variant] / b32['FP32']:.2f}× |")
    routes = list(ROUTES)
    lines += ["", "Export time (`onnx_model`: trace, onnxsim, checks; median of "
              f"{results.get('export_repeats', 1)}, routes interleaved), seconds:", "",
              "| model | bits | " + " | ".join(routes) + f" | {routes[0]} / {routes[1]} |",
              "|---|---|" + "---|" * (len(routes) + 1)]
    for name, row in results["models"].items():
        for bits, per_route in row["export_seconds"].items():
            lines.append(f"| {name} | {bits} | " + " | ".join(str(per_route[r]) for r in routes)
                         + f" | {per_route[routes[0]] / per_route[routes[1]]:.1f}× |")
    for name, row in results["models"].items():
        if "plans" in row:
            lines += ["", f"TensorRT-RTX 1.7 plans for {name}, built ahead of time for SM89 (no GPU):", "",
                      "| engine | plan MB |", "|---|---|"]
            lines += [f"| {k} | {v / 1e6:.1f} |" if v else f"| {k} | not built |" for k, v in row["plans"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 32), strict=True):
        names = list(results["models"])
        variants = list(results["models"][names[0]][f"latency_ms_b{batch}"])
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = [results["models"][n][f"latency_ms_b{batch}"][variant] for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=variant)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.split("_patch")[0] for n in names])
        ax.set_title(f"ONNX Runtime CPU, batch {batch}")
        ax.set_ylabel("median ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
