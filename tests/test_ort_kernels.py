"""What ONNX Runtime's CPU provider runs for the default int8 export: every quantized layer an integer kernel.

A structural guard, not a timed test (the speed itself is in benchmarks/runtimes.py): the graph ORT optimises with
ORT_ENABLE_ALL, read back through ``optimized_model_filepath``, for the demo ViT, DeiT-Ti and Swin-T at W8A8
without IRM (the case TensorRT needed a special qkv form for) and W4A4 with IRM, on both export routes.
"""
import onnx
import pytest

from qvit_export.onnx_export import ExportOptions, export_onnx
from qvit_export.onnx_graph import quantized_ops
from qvit_export.ort_kernels import FLOAT_COMPUTE, layer_kernels


def _assert_integer(path, expected_layers: int, figures, label: str):
    found = layer_kernels(path)
    kinds = sorted(set(found["layers"].values()))
    figures(f"{label}: ORT runs {len(found['integer'])}/{len(found['layers'])} quantized layers as integer kernels "
            f"({', '.join(kinds)}); ops {found['ops']}")
    assert len(found["layers"]) == expected_layers
    assert found["float"] == [] and found["missing"] == [], (found["float"], found["missing"])
    ops = found["ops"]
    # nothing computes in float on dequantized values, and no DequantizeLinear is left to run at all
    assert not any(ops.get(op) for op in FLOAT_COMPUTE), ops
    assert "DequantizeLinear" not in ops, ops
    # GELU in one kernel (onnx_export.ErfGELU), not five elementwise ones
    assert "Erf" not in ops and (ops.get("Gelu", 0) + ops.get("BiasGelu", 0)) > 0, ops


@pytest.mark.parametrize("bits", [8, 4])
def test_demo_vit_int8_export_runs_on_integer_kernels(bits, fmnist_exports, figures):
    qm, path = fmnist_exports[bits]
    layers = len(quantized_ops(onnx.load(str(path))))
    assert layers == 2 + 6 * 2  # patch embedding, head; per block qkv, proj, fc1, fc2, scores, context
    _assert_integer(path, layers, figures, f"demo ViT W{bits}A{bits} int8")


def test_torchscript_route_runs_on_the_same_kernels(fmnist_exports, tmp_path, figures):
    qm, dynamo = fmnist_exports[8]
    path = export_onnx(qm, tmp_path / "ts.onnx", ExportOptions(exporter="torchscript"))
    _assert_integer(path, 14, figures, "demo ViT W8A8 int8, TorchScript route")
    assert layer_kernels(path)["layers"] == layer_kernels(dynamo)["layers"]


@pytest.mark.parametrize("name,layers", [("deit_tiny_patch16_224", 2 + 6 * 12), ("swin_tiny_patch4_window7_224", 77)])
@pytest.mark.parametrize("bits", [8, 4])
def test_photo_models_int8_exports_run_on_integer_kernels(name, layers, bits, photo_exports, figures):
    _, path, _ = photo_exports[name, bits]
    _assert_integer(path, layers, figures, f"{name} W{bits}A{bits} int8")


@pytest.mark.slow  # exports a full-size model
def test_w8a8_without_irm_runs_on_integer_kernels(photos_224, tmp_path, figures):
    """W8A8 without IRM: the form that once needed q, k and v as three MatMuls for TensorRT (which ORT left in
    float)."""
    from qvit_export import QuantConfig, calibrate, quantize

    plain = calibrate(quantize(_fp("deit_tiny_patch16_224"), QuantConfig(w_bits=8, a_bits=8, irm=False)),
                      [photos_224], progress=False)
    path = export_onnx(plain, tmp_path / "w8a8.onnx")
    _assert_integer(path, 2 + 6 * 12, figures, "deit_tiny W8A8 no-IRM int8")


def _fp(name):
    import torch

    from qvit_export import create_model

    torch.manual_seed(0)
    return create_model(name)
