"""The embedded default: a small ViT on Fashion-MNIST, trained in float, quantized by PTQ, and deployed.

    python -m qvit_export.demo [--workdir runs/demo] [--epochs 2]

Trains (or reuses) the FP teacher, converts it to W8A8 and W4A4 (with and without IRM), calibrates each on
1,024 training images, and reports top-1 on the 10,000 test images. The best W4A4 model is then exported as
QDQ ONNX (INT4 weights), checked against PyTorch through ONNX Runtime on all test images, evaluated there,
and built into a TensorRT-RTX plan for SM89 when the trt-rtx extra is installed. Everything lands in the
work directory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .calibrate import calibrate
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import QuantConfig
from .data import fashion_mnist
from .errors import QvitError
from .quantize import quantize
from .timm_models import create_model
from .train import evaluate, train_classifier

# 4x4 patches of a 28x28 image: 49 tokens + CLS; head_dim 32 suits TensorRT's INT8 fused attention.
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10,
               "embed_dim": 96, "depth": 4, "num_heads": 3}
DEMO_TRAINING = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "seed": 0}
CALIBRATION_IMAGES = 1024


def fashion_teacher(workdir, epochs: int = DEMO_TRAINING["epochs"]) -> torch.nn.Module:
    """The FP demo ViT trained on Fashion-MNIST, reused from ``workdir`` when the same recipe made it."""
    path = Path(workdir) / "fp_teacher.pt"
    recipe = {"model": DEMO_MODEL, "kwargs": DEMO_KWARGS, **DEMO_TRAINING, "epochs": epochs}
    if path.is_file():
        try:
            if read_checkpoint(path)["extra"].get("recipe") == recipe:
                return load_checkpoint(path)
        except QvitError:
            pass  # unreadable cache: train again and overwrite it
    torch.manual_seed(recipe["seed"])
    model = create_model(DEMO_MODEL, **DEMO_KWARGS)
    train_set = fashion_mnist("train")
    losses = train_classifier(model, train_set, epochs=epochs, batch_size=recipe["batch_size"], lr=recipe["lr"],
                              weight_decay=recipe["weight_decay"], seed=recipe["seed"], desc="FP teacher")
    metrics = evaluate(model, fashion_mnist("test"), desc="FP test")
    save_checkpoint(path, model, metrics=metrics | {"train_loss": losses},
                    extra={"recipe": recipe, "dataset": "fashion-mnist"})
    return model.eval()


def calibration_batches(n: int = CALIBRATION_IMAGES, batch_size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """A fixed random draw of ``n`` Fashion-MNIST training images, as a list of batches."""
    train_set = fashion_mnist("train")
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:n]
    return [x for x, _ in DataLoader(Subset(train_set, pick.tolist()), batch_size=batch_size)]


def ptq(teacher: torch.nn.Module, cfg: QuantConfig, batches) -> torch.nn.Module:
    """Post-training quantization: convert, calibrate, stop."""
    return calibrate(quantize(teacher, cfg), batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvit_export.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where checkpoints go (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=DEMO_TRAINING["epochs"], help="FP teacher epochs")
    args = parser.parse_args(argv)
    try:
        workdir = Path(args.workdir)
        teacher = fashion_teacher(workdir, args.epochs)
        test_set, batches = fashion_mnist("test"), calibration_batches()
        rows = [("FP32 teacher", evaluate(teacher, test_set, desc="FP"), 0.0, workdir / "fp_teacher.pt")]
        for bits in (8, 4):
            for irm in (False, True):
                cfg = QuantConfig(w_bits=bits, a_bits=bits, irm=irm)
                start = time.perf_counter()
                student = ptq(teacher, cfg, batches)
                seconds = time.perf_counter() - start
                label = f"W{bits}A{bits} PTQ" + (" + IRM" if irm else "")
                metrics = evaluate(student, test_set, desc=label)
                path = save_checkpoint(workdir / f"w{bits}a{bits}_ptq{'_irm' if irm else ''}.pt", student,
                                       metrics=metrics, extra={"calibration_images": CALIBRATION_IMAGES, "dataset": "fashion-mnist"})
                rows.append((label, metrics, seconds, path))
        best = max((r for r in rows if r[0].startswith("W4A4")), key=lambda r: r[1]["top1"])
        deployed = deploy(best[3], workdir, test_set)
    except QvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fp = rows[0][1]["top1"]
    print(f"\nFashion-MNIST test set ({rows[0][1]['images']} images), demo ViT {DEMO_KWARGS}")
    print(f"{'model':<18} {'top-1 %':>8} {'vs FP':>7} {'calib s':>8}  file")
    for label, m, seconds, path in rows:
        print(f"{label:<18} {m['top1']:>8.2f} {m['top1'] - fp:>+7.2f} {seconds:>8.1f}  {path}")
    onnx_top1 = deployed["onnx_metrics"]["top1"]
    print(f"{best[0] + ' ONNX':<18} {onnx_top1:>8.2f} {onnx_top1 - fp:>+7.2f} {'':>8}  {deployed['onnx']}")
    print(f"\nparity ONNX Runtime vs PyTorch: {deployed['parity']}")
    print(f"engine: {deployed['engine']}")
    return 0


def deploy(ckpt: Path, workdir: Path, test_set) -> dict:
    """qvit-export's steps for one checkpoint: INT4 ONNX, parity on the test set, ORT accuracy, TensorRT-RTX plan."""
    from .onnx_export import ExportOptions, file_sha256
    from .parity import OnnxModule, export_with_parity

    model = load_checkpoint(ckpt)
    onnx_path = workdir / "deploy" / "w4a4_int4.onnx"
    report = export_with_parity(model, onnx_path, test_set.tensors[0], ExportOptions(precision="int4"),
                                metadata={"checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt)})
    out = {"onnx": onnx_path, "onnx_metrics": evaluate(OnnxModule(onnx_path), test_set, desc="ONNX Runtime"),
           "parity": f"top-1 agreement {report.top1_agreement:.2f}% on {report.images} images, codes equal >= "
                     f"{min(q.match_percent for q in report.quantizers.values()):.3f}%, max "
                     f"{max(q.max_lsb for q in report.quantizers.values())} LSB, weights identical: {report.weights_identical}"}
    try:
        from .engine import build_engine

        built = build_engine(onnx_path, workdir / "deploy" / "w4a4_int4.plan", target="tensorrt-rtx",
                             compute_capability="sm89")
        out["engine"] = (f"{built['plan']} ({built['plan_bytes'] / 1e6:.1f} MB, {len(built['qdq_layers'])} Q/DQ layers, "
                         f"TensorRT-RTX {built['version']}, SM89, {built['build_seconds']:.1f} s)")
    except QvitError as e:
        out["engine"] = f"not built: {e}"
    return out


if __name__ == "__main__":
    sys.exit(main())
