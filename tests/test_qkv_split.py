"""The qkv projection as three MatMuls (onnx_export.ExportQKV): same logits, every stored code, INT8 in TensorRT-RTX.

The demo ViT at W8A8 without IRM (fmnist_exports[8]) is the case that made the split necessary: exported as one
MatMul, TensorRT-RTX 1.7 ran its qkv GEMMs in float.
"""
import json

import numpy as np
import onnx
import pytest

from qvit_export import onnx_export
from qvit_export.anatomy import analyze, parse_layer_listing
from qvit_export.demo import DEMO_KWARGS
from qvit_export.onnx_export import ExportOptions, export_onnx
from qvit_export.onnx_graph import quantized_ops, sliced, weight_initializers, weight_quantizer
from qvit_export.parity import PARITY_ORT_OPTIMIZATION, compare, ort_session

DEPTH = DEMO_KWARGS["depth"]
QKV = [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]


@pytest.fixture(scope="module")
def w8a8_graphs(fmnist_exports, tmp_path_factory):
    """(W8A8 no-IRM model, its split ONNX, the same model exported as one qkv MatMul like earlier versions)."""
    qm, split = fmnist_exports[8]
    assert qm.qvit_config.irm is False and qm.qvit_config.a_bits == 8
    folder = tmp_path_factory.mktemp("qkv_split")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "SPLIT_QKV", False)
        single = export_onnx(qm, folder / "single.onnx")
    return qm, split, single


def test_names_map_slices_back_to_their_layer():
    assert sliced("blocks.3.attn.qkv.k") == ("blocks.3.attn.qkv", "k")
    assert sliced("layers.0.blocks.1.attn.qkv.v") == ("layers.0.blocks.1.attn.qkv", "v")
    assert sliced("blocks.3.attn.qkv") == ("blocks.3.attn.qkv", None)
    assert sliced("blocks.3.attn.q") == ("blocks.3.attn.q", None)  # a Linear named q is no slice
    assert weight_quantizer("blocks.0.attn.qkv.q.weight_quantizer") == ("blocks.0.attn.qkv.weight_quantizer", "q")
    assert weight_quantizer("head.weight_quantizer") == ("head.weight_quantizer", None)


def test_split_graph_has_the_single_matmuls_logits_and_codes(w8a8_graphs, fmnist_test, figures):
    qm, split, single = w8a8_graphs
    graph = onnx.load(str(split))
    ops = quantized_ops(graph)
    assert [(op["layer"], op["part"]) for op in ops if op["part"]] == [(q, p) for q in QKV for p in "qkv"]
    # every stored code: the three slices put back together are the single MatMul's [K, 3·dim] codes
    stored, whole = weight_initializers(graph), weight_initializers(onnx.load(str(single)))
    assert stored.keys() == whole.keys() and all(np.array_equal(stored[k], whole[k]) for k in whole)
    assert stored[f"{QKV[0]}.weight_quantizer"].shape == (128, 384)
    images = fmnist_test.tensors[0][:2000]
    feed = {"input": images.numpy()}
    a = ort_session(split, optimization=PARITY_ORT_OPTIMIZATION).run(None, feed)[0]
    b = ort_session(single, optimization=PARITY_ORT_OPTIMIZATION).run(None, feed)[0]
    assert np.array_equal(a, b)  # bit for bit
    report, before = compare(qm, split, images, progress=False), compare(qm, single, images, progress=False)
    figures(f"W8A8 no-IRM demo ViT, qkv split: {report.table(rows=1)}")
    assert report.failures() == [] and report.weights_identical
    assert report.to_json() == before.to_json()  # the same figures, quantizer by quantizer


def test_a_changed_code_in_one_slice_is_a_weight_mismatch_of_its_layer(w8a8_graphs, fmnist_test, tmp_path):
    from onnx import numpy_helper

    qm, split, _ = w8a8_graphs
    graph = onnx.load(str(split))
    dq = next(n for n in graph.graph.node if n.name == "blocks.1.attn.qkv.v.weight_quantizer/DequantizeLinear")
    init = next(i for i in graph.graph.initializer if i.name == dq.input[0])
    codes = numpy_helper.to_array(init).copy()
    codes[-1, -1] = codes[-1, -1] - 1 if codes[-1, -1] > -127 else codes[-1, -1] + 1
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    onnx.save(graph, str(tmp_path / "tampered.onnx"))
    report = compare(qm, tmp_path / "tampered.onnx", fmnist_test.tensors[0][:8], progress=False)
    assert report.weight_mismatches == ["blocks.1.attn.qkv.weight_quantizer"]


def test_split_qkv_builds_as_int8_where_one_matmul_ran_in_float(w8a8_graphs, tmp_path, figures):
    from qvit_export.anatomy import summary_line
    from qvit_export.engine import build_engine

    _, split, single = w8a8_graphs
    report = build_engine(split, tmp_path / "split.plan", target="tensorrt-rtx", compute_capability="sm89")
    a = report["anatomy"]
    s = a["summary"]
    figures(f"W8A8 no-IRM demo ViT, qkv split, SM89: {summary_line(a)}")
    assert s["float_gemms"] == s["weight_casts"] == s["unmatched"] == 0
    assert s["quantized_layers"] == 2 + 6 * DEPTH  # layers: a qkv is one, however many GEMMs compute it
    assert s["int8_gemms"] == len(a["layers"]) == 2 + 8 * DEPTH  # GEMMs: q, k and v are three
    for layer in QKV:
        parts = [e for e in a["layers"] if e["layer"] == layer]
        assert [e["part"] for e in parts] == list("qkv") and {e["kind"] for e in parts} == {"int8"}
        assert all(e["input_dq_fused"] and e["weight_dq_fused"] for e in parts)
    # the reason for the split: the same model as one qkv MatMul gets float GEMMs (refused unless allowed)
    old = build_engine(single, tmp_path / "single.plan", target="tensorrt-rtx", compute_capability="sm89",
                       allow_float_gemms=True)
    figures(f"W8A8 no-IRM demo ViT, one qkv MatMul, SM89: {summary_line(old['anatomy'])}")
    assert [e["layer"] for e in old["anatomy"]["layers"] if e["kind"] == "float"] == QKV


def test_int4_qkv_stays_one_matmul_and_an_int8_kept_qkv_is_split(fmnist_exports, tmp_path):
    qm, _ = fmnist_exports[4]
    int4 = onnx.load(str(export_onnx(qm, tmp_path / "int4.onnx", ExportOptions(precision="int4"))))
    assert not [op for op in quantized_ops(int4) if op["part"]]
    wo = onnx.load(str(export_onnx(qm, tmp_path / "wo.onnx", ExportOptions(precision="int4-weight-only"))))
    assert not [op for op in quantized_ops(wo) if op["part"]]
    # block 128: K=128 is a single block, so qkv keeps INT8 weights (int8_weight_layers) and is split
    b128 = onnx.load(str(export_onnx(qm, tmp_path / "b128.onnx", ExportOptions(precision="int4", int4_block=128))))
    kept = json.loads({p.key: p.value for p in b128.metadata_props}["int8_weight_layers"])
    split = {op["layer"] for op in quantized_ops(b128) if op["part"]}
    assert split == set(QKV) and split <= set(kept)
    assert {op["weight_dtype"] for op in quantized_ops(b128) if op["part"]} == {"int8"}


def test_stream_events_parse_and_are_no_kernels():
    """TensorRT-RTX 1.7 runs independent GEMMs on several streams and lists ``signal``/``wait`` with an EventId."""
    listing = "\n".join([
        "Layers:",
        "Name: __mye1_myl0_4, LayerType: signal, Inputs: [], Constants: [], Outputs: [], TacticName: , StreamId: 0, "
        "EventId: 1, Metadata: ",
        "Name: fc/MatMul_myl0_5, LayerType: gemm, Inputs: [ { Name: a, Dimensions: [-1,128], Datatype: Int8 }], "
        "Constants: [ { Name: w, Dimensions: [128,128], Datatype: Int8 }], Outputs: [ { Name: y, Dimensions: "
        "[-1,128], Datatype: Float }], TacticName: t, StreamId: 1, Metadata: [ONNX Layer: fc/MatMul]",
        "Name: __mye2_myl0_6, LayerType: wait, Inputs: [], Constants: [], Outputs: [], TacticName: , StreamId: 1, "
        "EventId: 1, Metadata: "])
    kernels = parse_layer_listing(listing)
    assert [k.event for k in kernels] == [True, False, True]
    op = {"layer": "fc", "part": None, "node": "fc/MatMul", "op": "MatMul", "weight_dq": None, "input_dq": [],
          "weight_dtype": "int8"}
    anatomy = analyze(kernels, [op])
    assert anatomy["summary"]["kernels"] == 1 and anatomy["stream_events"] == 2
