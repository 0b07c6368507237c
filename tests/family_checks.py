"""Checks every model family's tests run alike (tests/test_family_*.py): the explicit attention path, export with
parity on the photographs, and an SM89 TensorRT-RTX plan whose every quantized layer is an INT8 GEMM."""
import torch

from qvit_export import QuantConfig, calibrate, create_model, quantize
from qvit_export.layers import QuantAttentionMixin


def explicit_paths(fp, qm) -> None:
    """timm's unfused attention in ``fp``, the explicit (quantizable) attention in ``qm``."""
    for m in fp.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    for m in qm.modules():
        if isinstance(m, QuantAttentionMixin):
            m.force_explicit = True


def photo_exports(name: str, kwargs: dict, photos, folder, irm_at_4_bits: bool) -> dict:
    """{bits: (W{bits}A{bits} model calibrated on the photographs, its fp32 ONNX, parity report)} for 8 and 4 bits,
    random init."""
    from qvit_export.onnx_export import export_onnx
    from qvit_export.parity import compare

    torch.manual_seed(0)
    fp = create_model(name, **kwargs)
    out = {}
    for bits in (8, 4):
        qm = calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm=irm_at_4_bits and bits < 8)), [photos],
                       irm_steps=2, progress=False)
        path = export_onnx(qm, folder / f"{name}_w{bits}.onnx")
        out[bits] = qm, path, compare(qm, path, photos, progress=False)
    return out


def assert_parity(name: str, bits: int, exports: dict, layers: int, figures) -> None:
    """Parity within the FP32 thresholds, and every quantized layer of the graph fed by activation QDQ."""
    import onnx

    from qvit_export.onnx_graph import quantized_ops

    _, path, report = exports[bits]
    figures(f"{name} W{bits}A{bits} parity: top-1 {report.top1_agreement:.1f}%, "
            f"|dlogit| mean {report.mean_abs_logit_diff:.2g}")
    # every code equal within 1 LSB and the logits within float noise; top-1 only where random-init logits are not
    # tied: the fused attention's 8-bit probabilities (the default) left two of 17 photographs of EVA-02 W4A4 on a tie
    # that a |dlogit| of 0.002 flips (the exact form: 17 of 17, the same |dlogit|)
    assert [f for f in report.failures() if not f.startswith("top-1")] == []
    assert report.mean_abs_logit_diff < 0.01
    ops = quantized_ops(onnx.load(str(path)))
    assert len(ops) == layers and all(op["input_dq"] for op in ops)


def assert_sm89_int8_plan(name: str, model, tmp_path, layers: int, figures) -> None:
    """The model exported as int8 in FP16 and built for SM89: every quantized layer one INT8 GEMM, nothing float."""
    from qvit_export.anatomy import summary_line
    from qvit_export.engine import build_engine
    from qvit_export.onnx_export import ExportOptions, export_onnx

    path = export_onnx(model, tmp_path / f"{name}_fp16.onnx", ExportOptions(dtype="fp16"))
    report = build_engine(path, tmp_path / f"{name}.plan", target="tensorrt-rtx", compute_capability="sm89")
    a = report["anatomy"]
    s = a["summary"]
    figures(f"{name} W4A4 int8 fp16 SM89 plan: {summary_line(a)}")
    assert s["quantized_layers"] == layers
    assert s["int8_gemms"] == s["quantized_layers"], [e for e in a["layers"] if e["kind"] != "int8"]
    assert s["float_gemms"] == s["weight_casts"] == s["unmatched"] == 0
