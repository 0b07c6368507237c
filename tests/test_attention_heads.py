"""q, k and v heads first (layers.split_heads): timm's values, one integer GEMM per qkv in TensorRT-RTX.

The demo ViT at W8A8 without IRM (fmnist_exports[8]) is the case that decides the form: with q, k and v taken apart
in timm's order, TensorRT-RTX 1.7 runs its qkv GEMMs in float.
"""
import onnx
import numpy as np
import pytest
import torch

from qvit_export.anatomy import summary_line
from qvit_export.demo import DEMO_KWARGS
from qvit_export.layers import split_heads
from qvit_export.onnx_export import export_onnx
from qvit_export.onnx_graph import quantized_ops
from qvit_export.parity import PARITY_ORT_OPTIMIZATION, compare, ort_session

DEPTH = DEMO_KWARGS["depth"]
QKV = [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]


def timm_order(qkv: torch.Tensor, heads: int):
    """timm's own split: reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("shape,heads", [((2, 197, 576), 3), ((64, 49, 288), 3), ((1, 17, 384), 4)])
def test_heads_first_is_timms_split_value_for_value(shape, heads):
    qkv = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(split_heads(qkv, heads), timm_order(qkv, heads)):
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def w8a8_graphs(fmnist_exports, tmp_path_factory):
    """(W8A8 no-IRM model, its ONNX, the same model exported with q, k, v in timm's order)."""
    qm, heads_first = fmnist_exports[8]
    assert qm.qvit_config.irm is False and qm.qvit_config.a_bits == 8
    folder = tmp_path_factory.mktemp("heads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qvit_export.layers.split_heads", timm_order)
        timm_form = export_onnx(qm, folder / "timm_order.onnx")
    return qm, heads_first, timm_form


def test_both_orders_give_the_same_logits_and_parity(w8a8_graphs, fmnist_test, figures):
    qm, heads_first, timm_form = w8a8_graphs
    assert [op["layer"] for op in quantized_ops(onnx.load(str(heads_first)))].count(QKV[0]) == 1
    images = fmnist_test.tensors[0][:2000]
    feed = {"input": images.numpy()}
    a = ort_session(heads_first, optimization=PARITY_ORT_OPTIMIZATION).run(None, feed)[0]
    b = ort_session(timm_form, optimization=PARITY_ORT_OPTIMIZATION).run(None, feed)[0]
    assert np.array_equal(a, b)  # data movement only: bit for bit
    report = compare(qm, heads_first, images, progress=False)
    figures(f"W8A8 no-IRM demo ViT, heads first: {report.table(rows=1)}")
    assert report.failures() == [] and report.weights_identical
    assert report.to_json() == compare(qm, timm_form, images, progress=False).to_json()


def test_heads_first_builds_as_int8_where_timms_order_ran_in_float(w8a8_graphs, tmp_path, figures):
    from qvit_export.engine import build_engine

    _, heads_first, timm_form = w8a8_graphs
    report = build_engine(heads_first, tmp_path / "heads.plan", target="tensorrt-rtx", compute_capability="sm89")
    a = report["anatomy"]
    s = a["summary"]
    figures(f"W8A8 no-IRM demo ViT, heads first, SM89: {summary_line(a)}")
    assert s["float_gemms"] == s["weight_casts"] == s["unmatched"] == 0
    assert s["int8_gemms"] == s["quantized_layers"] == len(a["layers"]) == 2 + 6 * DEPTH
    for layer in QKV:
        (entry,) = [e for e in a["layers"] if e["layer"] == layer]
        assert entry["kind"] == "int8" and entry["input_dq_fused"] and entry["weight_dq_fused"]
    # the reason for the form: the same model with timm's order gets float qkv GEMMs (refused unless allowed)
    old = build_engine(timm_form, tmp_path / "timm.plan", target="tensorrt-rtx", compute_capability="sm89",
                       allow_float_gemms=True)
    figures(f"W8A8 no-IRM demo ViT, timm's order, SM89: {summary_line(old['anatomy'])}")
    assert [e["layer"] for e in old["anatomy"]["layers"] if e["kind"] == "float"] == QKV
