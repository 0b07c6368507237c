"""The embedded default: a small ViT on Fashion-MNIST, from an FP teacher to a W4A4 Q-ViT deployed as a plan.

    python -m qvit_export.demo [--workdir runs/demo]

1. FP teacher (recipe models/demo_fp.yaml, qvit-train's engine), 2. PTQ baselines (W8A8, W4A4) calibrated on
the shipped calibration set calib/fashion-mnist.json (1,024 class-balanced training images), 3. the W4A4 Q-ViT student (recipe models/demo_w4a4.yaml: calibrate, then QAT with IRM and
logit distillation), 4. qvit-export's steps on the student, for int8 (the fastest engine) and int4-weight-only (the
smallest): QDQ ONNX, parity against PyTorch on all 10,000 test images through ONNX Runtime, accuracy there,
and a TensorRT-RTX plan for SM89 with its anatomy (which kernel runs each quantized layer, in which types). Finished runs are
reused, so a second run only re-measures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .calibrate import calibrate
from .calibration_set import read_manifest
from .checkpoint import load_checkpoint, save_checkpoint
from .config import QuantConfig
from .data import fashion_mnist
from .errors import QvitError
from .quantize import quantize
from .recipe import load_recipe
from .evaluation import evaluate
from .trainer import train_or_reuse

_FP = load_recipe("demo_fp")
DEMO_MODEL, DEMO_KWARGS = _FP.model, dict(_FP.model_kwargs)
CALIBRATION_SET = "fashion-mnist"  # calib/fashion-mnist.json: 1,024 training images, 102-103 per class


def calibration_batches(batch_size: int = 256) -> list[torch.Tensor]:
    """The images of the demo's calibration set (checked against its manifest), as a list of batches."""
    return read_manifest(CALIBRATION_SET).batches(None, batch_size, progress=False)


def ptq(teacher: torch.nn.Module, cfg: QuantConfig, data=CALIBRATION_SET) -> torch.nn.Module:
    """Post-training quantization: convert, calibrate (on the demo's calibration set unless ``data`` says), stop."""
    return calibrate(quantize(teacher, cfg), data)


DEPLOYED = (("int8", "W4A4 Q-ViT, INT8"), ("int4-weight-only", "Q-ViT, INT4 w-only"))


def deploy_student(ckpt: Path, workdir: Path, test_set) -> dict:
    """The library's deploy for one checkpoint, per precision (int8: the fastest engine; int4-weight-only: the
    smallest): ONNX, parity on the test set, ORT accuracy, TensorRT-RTX plan for SM89 and its anatomy. Where no plan
    can be built here, the ONNX and its parity report are still written and the row says why."""
    from .anatomy import summary_line
    from .deploy import DeployOptions, DeployOutputs, deploy
    from .engine import EngineOptions
    from .onnx_export import ExportOptions, file_sha256
    from .parity import OnnxModule

    model = load_checkpoint(ckpt)
    metadata = {"checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt)}
    out = {}
    for precision, _ in DEPLOYED:
        onnx_path = workdir / "deploy" / f"w4a4_{precision}.onnx"
        engine = EngineOptions(target="tensorrt-rtx", compute_capability="sm89")
        try:
            engine.check()
        except QvitError as e:  # no TensorRT-RTX here: deploy the rest, and say why there is no plan
            engine, entry = None, {"onnx": onnx_path, "plan": None, "engine": f"not built: {e}"}
        options = DeployOptions(ExportOptions(precision=precision), engine=engine)
        outputs = DeployOutputs(onnx_path, engine=onnx_path.with_suffix(".plan") if engine else None)
        deployed = deploy(model, options, outputs, test_set.tensors[0], metadata)
        if engine is not None:
            built = deployed.build
            entry = {"onnx": onnx_path, "plan": outputs.engine,
                     "engine": f"TensorRT-RTX {built['version']}, SM89, built in {built['build_seconds']:.1f} s; "
                               + summary_line(built["anatomy"])}
        report = deployed.parity
        codes = (f", codes equal >= {min(q.match_percent for q in report.quantizers.values()):.3f}%, max "
                 f"{max(q.max_lsb for q in report.quantizers.values())} LSB" if report.quantizers else "")
        entry["parity"] = (f"top-1 agreement {report.top1_agreement:.2f}% on {report.images} images{codes}, "
                           f"weights identical: {report.weights_identical}")
        entry["onnx_metrics"] = evaluate(OnnxModule(onnx_path), test_set, desc=f"ORT {precision}")
        out[precision] = entry
    return out


def _size(path) -> str:
    return f"{Path(path).stat().st_size / 1e6:.2f} MB" if path and Path(path).is_file() else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvit_export.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where runs and artifacts go (default: runs/demo)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        workdir = Path(args.workdir)
        teacher_ckpt = train_or_reuse(load_recipe("demo_fp"), workdir / "fp")
        student_ckpt = train_or_reuse(load_recipe("demo_w4a4", {"teacher": str(teacher_ckpt)}), workdir / "w4a4")
        test_set, teacher = fashion_mnist("test"), load_checkpoint(teacher_ckpt)
        rows = [("FP32 teacher", "PyTorch", evaluate(teacher, test_set, desc="FP"), teacher_ckpt)]
        for bits in (8, 4):
            label = f"W{bits}A{bits} PTQ"
            student = ptq(teacher, QuantConfig(w_bits=bits, a_bits=bits, irm=False))
            path = save_checkpoint(workdir / f"w{bits}a{bits}_ptq.pt", student, extra={"dataset": "fashion-mnist"})
            rows.append((label, "PyTorch", evaluate(student, test_set, desc=label), path))
        rows.append(("W4A4 Q-ViT (QAT)", "PyTorch", evaluate(load_checkpoint(student_ckpt), test_set, desc="Q-ViT"),
                     student_ckpt))
        deployed = deploy_student(student_ckpt, workdir, test_set)
        for precision, label in DEPLOYED:
            rows.append((label, "ONNX Runtime", deployed[precision]["onnx_metrics"], deployed[precision]["onnx"]))
    except QvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fp = rows[0][2]["top1"]
    print(f"\nFashion-MNIST test set ({rows[0][2]['images']} images), demo ViT {DEMO_KWARGS}")
    print(f"{'model':<24} {'runtime':<13} {'top-1 %':>8} {'vs FP':>7} {'size':>9}  file")
    for label, runtime, m, path in rows:
        print(f"{label:<24} {runtime:<13} {m['top1']:>8.2f} {m['top1'] - fp:>+7.2f} {_size(path):>9}  {path}")
    for precision, label in DEPLOYED:
        plan = deployed[precision]["plan"]
        print(f"{label + ' plan':<24} {'TensorRT-RTX':<13} {'':>8} {'':>7} {_size(plan):>9}  "
              f"{plan or deployed[precision]['engine']}")
    for precision, _ in DEPLOYED:
        print(f"\n{precision}: parity ONNX Runtime vs PyTorch: {deployed[precision]['parity']}")
        print(f"{precision}: engine: {deployed[precision]['engine']}")
    print(f"training curves: {workdir / 'fp' / 'curves.png'}, {workdir / 'w4a4' / 'curves.png'}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
