"""Peers side by side: the same FP models quantized by us, by ONNX Runtime's quantize_static and by NVIDIA Model
Optimizer's ONNX PTQ; Fashion-MNIST top-1 in ONNX Runtime, ORT CPU latency at batch 1 and 32, TensorRT-RTX build.

    .venv/bin/python benchmarks/peers.py          # -> benchmarks/results/peers.{md,json}

Models: the demo ViT trained on Fashion-MNIST (`make demo` makes runs/demo/fp and runs/demo/w4a4), and
deit_small random-init (speed and size only; calibrated on scikit-image's photographs). Model Optimizer
replaces onnxruntime with onnxruntime-gpu, so it lives in its own virtual environment (.cache/peers/modelopt,
created here on first use, or QVIT_MODELOPT_VENV) and runs as a subprocess.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export import QuantConfig, calibrate, create_model, load_checkpoint, quantize  # noqa: E402
from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.data import fashion_mnist, photo_batch  # noqa: E402
from qvit_export.demo import calibration_batches  # noqa: E402
from qvit_export.errors import QvitError  # noqa: E402
from qvit_export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from qvit_export.parity import ort_session  # noqa: E402

MODELOPT_VENV = Path(os.environ.get("QVIT_MODELOPT_VENV", ROOT / ".cache" / "peers" / "modelopt"))
MODELOPT_SCRIPT = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
src, dst, mode, calib = sys.argv[1:5]
kwargs = {"calibration_method": "rtn_dq"} if mode == "int4" else {"calibration_method": "max"}
quantize(onnx_path=src, quantize_mode=mode, calibration_data=np.load(calib), output_path=dst,
         calibration_eps=["cpu"], **kwargs)
"""


def fp_onnx(model: torch.nn.Module, path: Path) -> Path:
    """The FP model as plain ONNX (opset 17, dynamic batch): what the peers quantize."""
    c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), torch.zeros(1, c, h, w), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def ort_static(src: Path, dst: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calib[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, extra_options={"QuantizeBias": False})
    return dst


def modelopt_python() -> Path:
    python = MODELOPT_VENV / "bin" / "python"
    if not python.is_file():
        print(f"installing NVIDIA Model Optimizer into {MODELOPT_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MODELOPT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "nvidia-modelopt[onnx]"], check=True)
    return python


def modelopt(src: Path, dst: Path, mode: str, calib_file: Path) -> Path:
    result = subprocess.run([str(modelopt_python()), "-c", MODELOPT_SCRIPT, str(src), str(dst), mode, str(calib_file)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not dst.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QvitError(f"Model Optimizer {mode} failed: {tail[0][:200]}")
    return dst


# Label suffix of a variant run in ONNX Runtime's default session rather than the project's: the two differ only in
# MatMulNBits' accuracy level (4 by default, 1 in ours), so the weight-only INT4 graphs are measured both ways.
ORT_DEFAULTS = " · ORT default session"


def session(path: Path, label: str = ""):
    """The session the project evaluates its exports with (every graph optimisation; MatMulNBits at the accuracy
    level parity uses), or ONNX Runtime's default one for labels ending in ORT_DEFAULTS."""
    if not label.endswith(ORT_DEFAULTS):
        return ort_session(path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def top1(path: Path, images: np.ndarray, labels: np.ndarray, label: str = "") -> float:
    sess = session(path, label)
    name = sess.get_inputs()[0].name
    hits = sum(int((sess.run(None, {name: images[i:i + 500]})[0].argmax(1) == labels[i:i + 500]).sum())
               for i in range(0, len(images), 500))
    return 100.0 * hits / len(images)


def latencies(paths: dict[str, Path], sample: np.ndarray, repeats: int) -> dict[str, dict[int, float]]:
    """Median ms per run at batch 1 and 32, the variants interleaved so they share the machine's noise."""
    sessions = {k: session(p, k) for k, p in paths.items()}
    times = {k: {1: [], 32: []} for k in paths}
    for batch in (1, 32):
        x = np.ascontiguousarray(sample[:batch])
        for sess in sessions.values():
            sess.run(None, {sess.get_inputs()[0].name: x})  # warm-up
        for _ in range(repeats if batch == 1 else max(3, repeats // 4)):
            for k, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, {sess.get_inputs()[0].name: x})
                times[k][batch].append(1000 * (time.perf_counter() - start))
    return {k: {b: statistics.median(v) for b, v in t.items()} for k, t in times.items()}


def plan(path: Path) -> dict:
    from qvit_export.engine import build_engine

    try:
        built = build_engine(path, path.with_suffix(".plan"), target="tensorrt-rtx", compute_capability="sm89")
        return {"built": True, "plan_mb": built["plan_bytes"] / 1e6}
    except QvitError as e:
        return {"built": False, "error": str(e)[:160]}


def variants(model_name: str, work: Path, fp_model, calib: np.ndarray, qat_ckpt: Path | None) -> dict[str, Path]:
    calib_file = work / "calibration.npy"
    np.save(calib_file, calib)
    out = {"FP32": fp_onnx(fp_model, work / "fp32.onnx")}
    batches = [torch.from_numpy(calib[i:i + 256]) for i in range(0, len(calib), 256)]
    w8 = calibrate(quantize(fp_model, QuantConfig(w_bits=8, a_bits=8, irm=False)), batches)
    out["ours W8A8 PTQ"] = export_onnx(w8, work / "ours_w8a8.onnx", ExportOptions(precision="int8"))
    if qat_ckpt is not None:
        w4, how = load_checkpoint(qat_ckpt), "QAT"
    else:
        w4, how = calibrate(quantize(fp_model, QuantConfig(w_bits=4, a_bits=4, irm=False)), batches), "PTQ"
    out[f"ours W4A4 {how} (INT4)"] = export_onnx(w4, work / "ours_w4a4.onnx", ExportOptions(precision="int4"))
    # the same 4-bit weights under float activations: ORT's MatMulNBits, Model Optimizer INT4's counterpart
    out[f"ours W4 weight-only {how} (INT4)"] = export_onnx(w4, work / "ours_w4.onnx",
                                                           ExportOptions(precision="int4-weight-only"))
    out["ORT quantize_static INT8"] = ort_static(out["FP32"], work / "ort_int8.onnx", calib)
    for mode in ("int8", "int4"):
        try:
            out[f"ModelOpt {mode.upper()}"] = modelopt(out["FP32"], work / f"modelopt_{mode}.onnx", mode, calib_file)
        except QvitError as e:
            print(f"{model_name}: {e}", flush=True)
            out[f"ModelOpt {mode.upper()}"] = None
    for label in [k for k in out if "weight-only" in k or k == "ModelOpt INT4"]:
        out[label + ORT_DEFAULTS] = out[label]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/peers")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)
    fp_ckpt, qat_ckpt = ROOT / "runs/demo/fp/best.pt", ROOT / "runs/demo/w4a4/best.pt"
    if not (fp_ckpt.is_file() and qat_ckpt.is_file()):
        print("error: run 'make demo' first: the peers start from its teacher and W4A4 student", file=sys.stderr)
        return 2
    test = fashion_mnist("test")
    images, labels = test.tensors[0].numpy(), test.tensors[1].numpy()
    rows = []
    deit = create_model("deit_small_patch16_224")
    photos = photo_batch(deit).numpy()
    for model_name, fp_model, calib, qat, accuracy in (
            ("demo ViT (Fashion-MNIST)", load_checkpoint(fp_ckpt), torch.cat(calibration_batches()).numpy(), qat_ckpt, True),
            ("deit_small (random init)", deit, np.concatenate([photos] * 4), None, False)):
        work = Path(args.workdir) / model_name.split()[0].lower().replace("_", "-")
        work.mkdir(parents=True, exist_ok=True)
        paths = variants(model_name, work, fp_model, calib, qat)
        ready = {k: v for k, v in paths.items() if v is not None}
        speed = latencies(ready, images if accuracy else photos.repeat(2, axis=0), args.repeats)
        for label, path in paths.items():
            row = {"model": model_name, "variant": label, "ok": path is not None}
            if path is not None:
                row |= {"onnx_mb": path.stat().st_size / 1e6, "b1_ms": speed[label][1], "b32_ms": speed[label][32],
                        "top1": top1(path, images, labels, label) if accuracy else None} | plan(path)
            rows.append(row)
            print(row, flush=True)
    fp32 = {r["model"]: r for r in rows if r["variant"] == "FP32" and r["ok"]}
    for r in rows:
        if r["ok"] and r["model"] in fp32:
            r["b1_ratio"] = r["b1_ms"] / fp32[r["model"]]["b1_ms"]
            r["b32_ratio"] = r["b32_ms"] / fp32[r["model"]]["b32_ms"]
    lines = ["| model | variant | FMNIST top-1 % (ORT) | ORT b1 ms (÷ FP32) | ORT b32 ms (÷ FP32) | ONNX MB | "
             "TRT-RTX plan (SM89) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['variant']} | failed | | | | |")
            continue
        acc = f"{r['top1']:.2f}" if r["top1"] is not None else "n/a (random init)"
        engine = f"{r['plan_mb']:.1f} MB" if r.get("built") else f"failed: {r.get('error', '')[:60]}"
        b1 = f"{r['b1_ms']:.2f} ({r['b1_ratio']:.2f}×)" if "b1_ratio" in r else f"{r['b1_ms']:.2f}"
        b32 = f"{r['b32_ms']:.1f} ({r['b32_ratio']:.2f}×)" if "b32_ratio" in r else f"{r['b32_ms']:.1f}"
        lines.append(f"| {r['model']} | {r['variant']} | {acc} | {b1} | {b32} | {r['onnx_mb']:.2f} | {engine} |")
    when = datetime.date.today().isoformat()
    header = (f"Peers on {when}, {platform.machine()}, {torch.get_num_threads()} CPU threads, ONNX Runtime CPU "
              f"(medians of interleaved runs; every variant in the session the project evaluates exports with). "
              f"Command: `.venv/bin/python benchmarks/peers.py`\n\n")
    out = ROOT / "benchmarks" / "results" / "peers"
    write_text(out.with_suffix(".md"), header + "\n".join(lines) + "\n")
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "rows": rows}, indent=2))
    print(header + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
