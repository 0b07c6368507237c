"""Runtimes side by side: how much faster than float each export precision runs on the CPU runtimes we can measure,
and how often each runtime's top-1 agrees with PyTorch.

    .venv/bin/python benchmarks/runtimes.py                    # -> benchmarks/results/runtimes.{md,json,png}
    .venv/bin/python benchmarks/runtimes.py --check            # make bench-check: re-measure, compare with baseline
    .venv/bin/python benchmarks/runtimes.py --update-baseline  # a full run that also rewrites the baseline

Speed: deit_tiny, deit_small and swin_tiny (random init: latency does not depend on the weights' values; biases
drawn small and non-zero, as in a trained model, since onnxsim removes an Add of zeros), each exported as
- ``fp32``: the float model, through both export routes (TorchScript's GELU is one kernel in ONNX Runtime, the
  dynamo route's five); each runtime's ratio is to the faster of the two, measured in the same rounds;
- ``int8``: W8A8 PTQ without IRM (calibrated on the photographs), the default export;
- ``int4`` and ``int4-weight-only``: W4A4 PTQ with IRM, INT4 weight blocks of 64 under INT8 activations, and the
  same weights with activations in float.
Runtimes (RUNTIMES): ONNX Runtime CPU (its default session: every graph optimisation; for weight-only graphs also
at the MatMulNBits accuracy level the project chooses, parity.ORT_MATMULNBITS_ACCURACY_LEVEL) and OpenVINO CPU
(``INFERENCE_PRECISION_HINT=f32``, latency hint, static batch), where installed (the ``bench`` extra). Batches 1 and
32; for one model, batch and runtime every variant runs once per round, rounds interleaved, so machine noise hits
them alike (one runtime after another: two runtimes' thread pools would compete); the tables give medians and
ratios from one run (nothing else may run meanwhile: two processes that each use all cores slow each other far
more than twice).

Agreement: the demo ViT (its teacher trained by ``make demo``, or the test suite's), W8A8 and W4A4 PTQ on the shipped
Fashion-MNIST calibration set, every precision on the 10,000 test images: top-1 accuracy and top-1 agreement with
the PyTorch model (activation quantizers off for weight-only) in each runtime at its default settings.

Baseline: ``benchmarks/results/runtimes_baseline.json`` holds the ratios of a full run; ``--check`` measures them
again for deit_small with fewer rounds at batch 32 (a few minutes, no agreement part) and exits 1 naming each ratio
that got worse than its baseline by more than ``--tolerance`` (relative, default 0.15: 2-core machines are noisy).
"""
from __future__ import annotations

import argparse
import contextlib
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
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export import QuantConfig, calibrate, create_model, quantize, quantizers_disabled  # noqa: E402
from qvit_export.data import photo_batch  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from qvit_export.onnx_graph import save_atomic  # noqa: E402
from qvit_export.onnx_routes import ROUTES  # noqa: E402
from qvit_export.parity import ORT_MATMULNBITS_ACCURACY_LEVEL  # noqa: E402

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
PRECISIONS = ("int8", "int4", "int4-weight-only")
BASELINE = ROOT / "benchmarks" / "results" / "runtimes_baseline.json"
FP32 = ("fp32 (torchscript)", "fp32 (dynamo)")
# --check measures deit_small alone (the model of the speed targets): all three models took over 11 minutes on 2
# cores (2026-12-03), and at batch 1 it keeps the full run's 30 rounds, which cost seconds: with 15, OpenVINO's
# deit_small int8 ratio moved 29% on an unchanged graph
CHECK_MODELS = ("deit_small_patch16_224",)


# ---- runtimes ------------------------------------------------------------------------------------------------

RUNTIMES: dict[str, type] = {}


def register_runtime(cls):
    RUNTIMES[cls.name] = cls
    return cls


@register_runtime
class OnnxRuntime:
    """ONNX Runtime's CPU provider as a user gets it: every graph optimisation, default threads. One setting differs:
    its threads stop spinning when a run ends (``session.force_spinning_stop``). Interleaved with other sessions,
    a session's threads otherwise spin on after its run and take the cores from the next one: deit_small FP32 at
    batch 1 measured 101 ms so and 64 ms with the setting (2026-12-03); a single session of a user never meets that."""

    name = "onnxruntime"

    @staticmethod
    def available() -> bool:
        return True

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    @staticmethod
    def load(path: Path, batch: int, config: dict[str, str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]


@register_runtime
class OpenVino:
    """OpenVINO's CPU plugin reading the ONNX file directly, in FP32 (its default on CPUs with bf16 support is
    bf16, which would compare another precision), latency hint, the batch fixed when compiled."""

    name = "openvino"

    @staticmethod
    def available() -> bool:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def version() -> str:
        import openvino

        return openvino.__version__.split("-")[0]

    @staticmethod
    def load(path: Path, batch: int, config: dict[str, str] | None = None):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        shape = list(model.inputs[0].get_partial_shape().get_min_shape())
        model.reshape({model.inputs[0].get_any_name(): [batch, *shape[1:]]})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
                                      | (config or {}))
        request = compiled.create_infer_request()
        return lambda x: request.infer({0: x})[compiled.outputs[0]]


# ---- graphs --------------------------------------------------------------------------------------------------

def fp32_graphs(fp: torch.nn.Module, work: Path) -> dict[str, Path]:
    """The float model through both export routes (opset 17 for TorchScript, 18 for dynamo, dynamic batch)."""
    shape = (2, *photo_batch(fp).shape[1:])
    out = {}
    for label, route in zip(FP32, ("torchscript", "dynamo")):
        opset = 17 if route == "torchscript" else 18
        out[label] = save_atomic(ROUTES[route].trace(fp.eval(), torch.zeros(shape), opset, True),
                                 work / f"{route}_fp32.onnx")
    return out


def speed_graphs(name: str, work: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    fp = create_model(name).eval()
    with torch.no_grad():
        for pname, p in fp.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.02)
    images = photo_batch(fp)
    paths = fp32_graphs(fp, work)
    w8 = calibrate(quantize(fp, QuantConfig(w_bits=8, a_bits=8, irm=False)), [images], progress=False)
    paths["int8"] = export_onnx(w8, work / "int8.onnx")
    w4 = calibrate(quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=True)), [images], irm_steps=0, progress=False)
    for precision in ("int4", "int4-weight-only"):
        paths[precision] = export_onnx(w4, work / f"{precision}.onnx", ExportOptions(precision=precision))
    return paths


def variants(paths: dict[str, Path], runtime: str) -> dict[str, tuple[Path, dict]]:
    """{variant label: (graph, runtime config)}: every graph, and for ONNX Runtime the weight-only graph also at the
    accuracy level the project chooses (ORT's default is 4)."""
    out = {label: (path, {}) for label, path in paths.items()}
    if runtime == "onnxruntime":
        out[f"int4-weight-only (accuracy level {ORT_MATMULNBITS_ACCURACY_LEVEL})"] = (
            paths["int4-weight-only"], {"session.qdq_matmulnbits_accuracy_level": str(ORT_MATMULNBITS_ACCURACY_LEVEL)})
    return out


def measure(paths: dict[str, Path], runtimes: list[str], batch: int, rounds: int, images: np.ndarray) -> dict:
    """{runtime: {variant: median ms}} at ``batch``: one runtime after the other (two runtimes' thread pools would
    compete), within a runtime every variant once per round, so the machine's noise hits them alike."""
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])).astype(np.float32))
    out: dict = {}
    for runtime in runtimes:
        runs = {label: RUNTIMES[runtime].load(path, batch, config)
                for label, (path, config) in variants(paths, runtime).items()}
        for run in runs.values():  # warm-up
            run(x)
        times = {label: [] for label in runs}
        for _ in tqdm(range(rounds), desc=f"{runtime} batch {batch}", unit="round", leave=False):
            for label, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[label].append(1e3 * (time.perf_counter() - start))
        out[runtime] = {label: round(statistics.median(t), 3) for label, t in times.items()}
        del runs
    return out


def ratios(ms: dict) -> dict:
    """{runtime: {variant: ratio to the faster FP32 graph}}."""
    out = {}
    for runtime, row in ms.items():
        base = min(row[k] for k in FP32)
        out[runtime] = {k: round(v / base, 3) for k, v in row.items() if k not in FP32}
        out[runtime]["fp32 (dynamo)"] = round(row["fp32 (dynamo)"] / base, 3)
    return out


# ---- agreement on the demo -----------------------------------------------------------------------------------

def demo_teacher():
    from qvit_export import load_checkpoint
    from qvit_export.recipe import load_recipe
    from qvit_export.trainer import train_or_reuse

    for folder in (ROOT / "runs" / "demo" / "fp", ROOT / ".cache" / "tests" / "fp"):
        if (folder / "best.pt").is_file():
            return load_checkpoint(folder / "best.pt")
    return load_checkpoint(train_or_reuse(load_recipe("demo_fp"), ROOT / "runs" / "demo" / "fp"))


def agreement(runtimes: list[str], work: Path) -> list[dict]:
    from qvit_export.data import fashion_mnist
    from qvit_export.demo import calibration_batches

    test = fashion_mnist("test")
    images, labels = test.tensors[0], test.tensors[1].numpy()
    teacher = demo_teacher()
    rows = []
    for bits, precisions in ((8, ("int8",)), (4, PRECISIONS)):
        qm = calibrate(quantize(teacher, QuantConfig(w_bits=bits, a_bits=bits, irm=bits < 8)), calibration_batches(),
                       progress=False)
        for precision in precisions:
            path = export_onnx(qm, work / f"demo_w{bits}_{precision}.onnx", ExportOptions(precision=precision))
            off = precision == "int4-weight-only"
            with torch.no_grad(), quantizers_disabled(qm, weights=False) if off else contextlib.nullcontext():
                ref = torch.cat([qm(images[i:i + 500]) for i in range(0, len(images), 500)]).argmax(1).numpy()
            for runtime in runtimes:
                run = RUNTIMES[runtime].load(path, 500)
                got = np.concatenate([run(images[i:i + 500].numpy()) for i in range(0, len(images), 500)]).argmax(1)
                rows.append({"model": f"demo W{bits}A{bits} PTQ", "precision": precision, "runtime": runtime,
                             "top1": round(100 * float((got == labels).mean()), 2),
                             "pytorch_top1": round(100 * float((ref == labels).mean()), 2),
                             "agreement": round(100 * float((got == ref).mean()), 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- reports -------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [f"# CPU runtimes ({results['date']})", "",
             f"Machine: {results['machine']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ". "
             f"Medians of {results['rounds']['1']} (batch 1) and {results['rounds']['32']} (batch 32) interleaved "
             "rounds; ratio = variant ÷ the faster FP32 graph of the same runtime and batch (lower is faster). "
             "Command: `.venv/bin/python benchmarks/runtimes.py`.", "",
             "| model | variant | runtime | b1 ms | b1 ratio | b32 ms | b32 ratio |", "|---|---|---|---|---|---|---|"]
    for model, row in results["models"].items():
        for runtime in row["ms"]["1"]:
            base = {b: min(row["ms"][b][runtime][k] for k in FP32) for b in ("1", "32")}
            lines.append(f"| {model} | fp32 (faster route) | {runtime} | {base['1']:.1f} | 1.00 | {base['32']:.0f} | 1.00 |")
            for label in row["ratios"]["1"][runtime]:
                lines.append(f"| {model} | {label} | {runtime} | {row['ms']['1'][runtime][label]:.1f} | "
                             f"{row['ratios']['1'][runtime][label]:.2f} | {row['ms']['32'][runtime][label]:.0f} | "
                             f"{row['ratios']['32'][runtime][label]:.2f} |")
    if results.get("agreement"):
        lines += ["", "Top-1 on the 10,000 Fashion-MNIST test images (demo ViT, PTQ), each runtime at its default "
                      "settings, and agreement with the PyTorch model (weight-only: activation quantizers off):", "",
                  "| model | precision | runtime | top-1 % | PyTorch top-1 % | agreement % |", "|---|---|---|---|---|---|"]
        for r in results["agreement"]:
            lines.append(f"| {r['model']} | {r['precision']} | {r['runtime']} | {r['top1']:.2f} | "
                         f"{r['pytorch_top1']:.2f} | {r['agreement']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from qvit_export.plots import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, batch in zip(axes, ("1", "32")):
        labels, values = [], []
        for model in models:
            for runtime, row in results["models"][model]["ratios"][batch].items():
                for label in ("int8", "int4", "int4-weight-only"):
                    labels.append(f"{model.split('_patch')[0]}\n{label}\n{runtime[:4]}")
                    values.append(row[label])
        colors = ["tab:green" if v <= 0.5 else "tab:orange" if v < 1 else "tab:red" for v in values]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(values)), labels, fontsize=5.5)
        ax.set_title(f"batch {batch}: time ÷ FP32 (lower is faster)")
    fig.tight_layout()
    save_figure(fig, path)


def flat(results: dict) -> dict[str, float]:
    return {f"{model}/{label}/{runtime}/b{batch}": ratio
            for model, row in results["models"].items() for batch, by_runtime in row["ratios"].items()
            for runtime, by_label in by_runtime.items() for label, ratio in by_label.items()}


def check(results: dict, tolerance: float) -> int:
    if not BASELINE.is_file():
        print(f"no baseline at {BASELINE.relative_to(ROOT)}: run with --update-baseline first", file=sys.stderr)
        return 2
    base = json.loads(BASELINE.read_text())["ratios"]
    now = flat(results)
    worse = [(k, base[k], now[k]) for k in sorted(now) if k in base and now[k] > base[k] * (1 + tolerance)]
    missing = sorted(set(base) - set(now))
    print(f"{len(now)} ratios measured, {len(set(now) & set(base))} with a baseline; tolerance {tolerance:.0%}")
    moved = sorted(((now[k] / base[k] - 1, k) for k in now if k in base), key=lambda t: abs(t[0]))
    if moved:  # the noise to judge the tolerance by: the largest move either way
        change, key = moved[-1]
        print(f"largest move: {key} {now[key]:.2f} (baseline {base[key]:.2f}, {100 * change:+.0f}%)")
    for key, b, n in worse:
        print(f"WORSE  {key}: {n:.2f} (baseline {b:.2f}, +{100 * (n / b - 1):.0f}%)")
    if missing:
        print(f"not measured this time: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if not worse:
        print("no ratio is worse than its baseline beyond the tolerance")
    return 1 if worse else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help=f"default: {', '.join(MODELS)}; with --check, {CHECK_MODELS[0]}")
    parser.add_argument("--runtimes", nargs="+", default=[r for r in RUNTIMES if RUNTIMES[r].available()])
    parser.add_argument("--rounds", type=int, default=30, help="rounds at batch 1 (batch 32: a fourth, at least 5)")
    parser.add_argument("--check", action="store_true", help="re-measure (30/5 rounds) and compare with the baseline")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    missing = [r for r in args.runtimes if r not in RUNTIMES or not RUNTIMES[r].available()]
    if missing:
        print(f"error: runtime(s) {', '.join(missing)} not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    args.models = args.models or list(CHECK_MODELS if args.check else MODELS)
    rounds = {"1": args.rounds, "32": 5 if args.check else max(5, args.rounds // 4)}
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__} | \
        {r: RUNTIMES[r].version() for r in args.runtimes}
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "versions": versions, "rounds": rounds, "models": {}}
    del onnxruntime
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            work = Path(tmp) / name
            work.mkdir()
            print(f"{name}: exporting", flush=True)
            paths = speed_graphs(name, work)
            images = photo_batch(create_model(name)).numpy()
            row = {"ms": {}, "onnx_mb": {k: round(p.stat().st_size / 1e6, 2) for k, p in paths.items()}}
            for batch in (1, 32):
                row["ms"][str(batch)] = measure(paths, args.runtimes, batch, rounds[str(batch)], images)
            row["ratios"] = {b: ratios(ms) for b, ms in row["ms"].items()}
            results["models"][name] = row
            for b, by_runtime in row["ratios"].items():
                for runtime, r in by_runtime.items():
                    print(f"  batch {b} {runtime}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()), flush=True)
        if args.check:
            return check(results, args.tolerance)
        if not args.no_agreement:
            results["agreement"] = agreement(args.runtimes, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "runtimes.md").write_text(markdown(results))
    plot(results, out / "runtimes.png")
    if args.update_baseline:
        BASELINE.write_text(json.dumps({"date": results["date"], "machine": results["machine"],
                                        "versions": versions, "ratios": flat(results)}, indent=2) + "\n")
        print(f"baseline written: {BASELINE.relative_to(ROOT)}")
    print((out / "runtimes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
