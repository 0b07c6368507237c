"""Engine anatomy: the parser on stored TensorRT-RTX listings (plain Python), then real SM89 builds.

tests/data/anatomy/*.layers.txt are the ``Layers:`` messages that TensorRT-RTX 1.7.1 printed while building SM89
plans of a 2-block W4A4 ViT (width 128) exported as int8, int4 (blocks of 64) and int4-weight-only; *.ops.json
hold that ONNX's quantized computations (onnx_graph.quantized_ops) and the summary the build reported.
"""
import json
from pathlib import Path

import onnx
import pytest

from qvit_export import QvitError
from qvit_export.anatomy import (SUMMARY_KEYS, analyze, export_reasons, float_gemm_layers,
                                 parse_inspector_json, parse_layer_listing, summary_line)
from qvit_export.demo import DEMO_KWARGS
from qvit_export.onnx_export import ExportOptions, export_onnx

DEPTH = DEMO_KWARGS["depth"]
DATA = Path(__file__).parent / "data" / "anatomy"


def _stored(precision):
    listing = (DATA / f"{precision}.layers.txt").read_text()
    info = json.loads((DATA / f"{precision}.ops.json").read_text())
    return parse_layer_listing(listing), info, export_reasons(info["metadata"])


def test_listing_parses_every_kernel_with_types_and_onnx_nodes():
    kernels, _, _ = _stored("int8")
    text = (DATA / "int8.layers.txt").read_text()
    assert len(kernels) == sum(1 for line in text.splitlines() if line.startswith("Name: "))
    qkv = next(k for k in kernels if k.name.startswith("blocks.0.attn.qkv/MatMul"))
    assert qkv.layer_type == "gemm" and [t.dtype for t in qkv.inputs] == ["Int8"]
    assert qkv.constants[0].dtype == "Int8" and qkv.constants[0].dims == (128, 384)
    assert "blocks.0.attn.qkv.weight_quantizer/DequantizeLinear" in qkv.onnx_nodes
    assert not kernels[0].inputs and kernels[0].shape_only


def test_unreadable_kernel_line_is_an_error_not_a_skip():
    with pytest.raises(ValueError, match="unreadable kernel line"):
        parse_layer_listing("Layers:\nName: x, LayerType: gemm, Inputs: [garbage\n")


@pytest.mark.parametrize("precision", ["int8", "int4", "int4-weight-only"])
def test_stored_listings_give_the_summary_the_build_reported(precision):
    kernels, info, reasons = _stored(precision)
    anatomy = analyze(kernels, info["ops"], reasons)
    assert tuple(anatomy["summary"]) == SUMMARY_KEYS
    assert all(isinstance(v, int) for v in anatomy["summary"].values())
    assert anatomy["summary"] == info["expected_summary"]
    assert summary_line(anatomy).startswith("anatomy: ")


def test_int8_every_layer_is_an_int8_gemm_with_its_qdq_fused():
    kernels, info, reasons = _stored("int8")
    anatomy = analyze(kernels, info["ops"], reasons)
    s = anatomy["summary"]
    assert s["quantized_layers"] == 14 == s["int8_gemms"]  # patch embed, 2 x (qkv, scores, context, proj, fc1, fc2), head
    assert s["float_gemms"] == s["weight_casts"] == s["unmatched"] == 0
    by_layer = {e["layer"]: e for e in anatomy["layers"]}
    assert by_layer["patch_embed.proj"]["layer_type"] == "correlation"  # TensorRT's name for the convolution
    assert by_layer["blocks.1.attn.scores"]["input_dtypes"] == ["Int8", "Int8"]
    assert all(e["input_dq_fused"] and e["input_q_kernels"] for e in anatomy["layers"])
    assert all(e["weight_dq_fused"] for e in anatomy["layers"] if e["weight_dtype"])


def test_int4_under_int8_activations_shows_one_cast_per_int4_layer():
    kernels, info, reasons = _stored("int4")
    anatomy = analyze(kernels, info["ops"], reasons)
    int4 = [op["layer"] for op in info["ops"] if op["weight_dtype"] == "int4"]
    assert len(int4) == 8
    for entry in anatomy["layers"]:
        if entry["layer"] in int4:
            assert entry["kind"] == "int8" and len(entry["helpers"]) == 1 and not entry["weight_dq_fused"]
            helper = next(k for k in kernels if k.name == entry["helpers"][0])
            assert not helper.inputs and [c.dtype for c in helper.constants] == ["Int4"]
            assert [o.dtype for o in helper.outputs] == ["Int8"]
    assert anatomy["summary"]["weight_casts"] == 8
    assert by_reason(anatomy, "head").startswith("INT8 weights: 8-bit")


def by_reason(anatomy, layer):
    return next(e["reason"] for e in anatomy["layers"] if e["layer"] == layer)


def test_weight_only_int4_is_dequantized_inside_the_gemm():
    kernels, info, reasons = _stored("int4-weight-only")
    anatomy = analyze(kernels, info["ops"], reasons)
    s = anatomy["summary"]
    assert s["int4_weight_gemms"] == 8 and s["weight_casts"] == 0 and s["unmatched"] == 0
    fc1 = next(e for e in anatomy["layers"] if e["layer"] == "blocks.0.mlp.fc1")
    assert fc1["layer_type"] == "runtime_fusion" and fc1["weight_dtype"] == "Int4" and fc1["input_dtypes"] == ["Half"]
    # the patch embedding's convolution runs in float by design, and says why; it does not fail the build
    assert [e["layer"] for e in anatomy["layers"] if e["kind"] == "float"] == ["patch_embed.proj"]
    assert float_gemm_layers(anatomy) == []
    assert anatomy["int8_weight_gemms"] == 1  # the 8-bit head: INT8 weights under a float activation


def test_a_layer_missing_from_the_listing_is_unmatched():
    kernels, info, reasons = _stored("int8")
    ops = info["ops"] + [dict(info["ops"][1], layer="ghost", node="ghost/MatMul")]
    assert analyze(kernels, ops, reasons)["summary"]["unmatched"] == 1


def test_inspector_json_form():
    """The JSON that IEngineInspector returns on a GPU (TensorRT 10.x field names), read into the same kernels."""
    info = {"Layers": [
        {"Name": "blocks.0.mlp.fc1/MatMul_myl0_13", "LayerType": "gemm",
         "Inputs": [{"Name": "a", "Dimensions": [-1, 128], "Format/Datatype": "Row major linear INT8 format"}],
         "Constants": [{"Name": "w", "Dimensions": [128, 512], "Format/Datatype": "Row major linear INT8 format"}],
         "Outputs": [{"Name": "y", "Dimensions": [-1, 512], "Format/Datatype": "Row major linear FP16 format"}],
         "TacticName": "t", "Metadata": "[ONNX Layer: blocks.0.mlp.fc1/MatMul][ONNX Layer: "
                                        "blocks.0.mlp.fc1.weight_quantizer/DequantizeLinear]"}],
        "Bindings": ["input", "logits"]}
    kernels = parse_inspector_json(json.dumps(info))
    assert kernels[0].inputs[0].dtype == "Int8" and kernels[0].outputs[0].dtype == "Half"
    op = {"layer": "blocks.0.mlp.fc1", "node": "blocks.0.mlp.fc1/MatMul", "op": "MatMul",
          "weight_dq": "blocks.0.mlp.fc1.weight_quantizer/DequantizeLinear", "input_dq": [], "weight_dtype": "int8"}
    assert analyze(kernels, [op])["summary"]["int8_gemms"] == 1


# ---- real builds ----------------------------------------------------------------------------------

def _build(onnx_path, tmp_path, **kw):
    from qvit_export.engine import build_engine  # make test installs the trt-rtx extra: no skip

    return build_engine(onnx_path, tmp_path / (Path(onnx_path).stem + ".plan"), target="tensorrt-rtx",
                        compute_capability="sm89", **kw)


def _assert_all_int8(report, figures, label):
    a = report["anatomy"]
    s = a["summary"]
    figures(f"{label}: {summary_line(a)}")
    assert s["float_gemms"] == 0 and s["weight_casts"] == 0 and s["unmatched"] == 0, a["layers"]
    excused = sum(1 for e in a["layers"] if e["reason"])
    assert s["int8_gemms"] == len(a["layers"]) - excused == s["quantized_layers"] - excused


@pytest.fixture(scope="module")
def photo_w4a4(photo_exports):
    """DeiT-tiny and Swin-tiny at W4A4 (random init, calibrated on the photographs), shared with test_export."""
    return {name: model for (name, bits), (model, _, _) in photo_exports.items() if bits == 4}


def test_demo_vit_int8_plan_places_every_layer_on_int8(fmnist_exports, tmp_path, figures):
    qm, path = fmnist_exports[4]
    report = _build(path, tmp_path)
    _assert_all_int8(report, figures, "demo ViT W4A4 int8 plan")
    assert report["anatomy"]["summary"]["quantized_layers"] == 2 + 6 * DEPTH
    assert report["anatomy"]["summary"]["int8_gemms"] == 2 + 6 * DEPTH  # one GEMM per layer, qkv included
    saved = json.loads((tmp_path / f"{path.stem}.build.json").read_text())
    assert saved["anatomy"]["summary"] == report["anatomy"]["summary"]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_photo_models_int8_plans_place_every_layer_on_int8(name, photo_w4a4, tmp_path, figures):
    path = export_onnx(photo_w4a4[name], tmp_path / f"{name}.onnx", ExportOptions(dtype="fp16"))
    _assert_all_int8(_build(path, tmp_path), figures, f"{name} W4A4 int8 fp16 plan")


@pytest.mark.slow  # exports a full-size model
def test_deit_tiny_int4_blocks_cover_its_weights_and_build(photo_w4a4, tmp_path, figures):
    from onnx import numpy_helper

    qm = photo_w4a4["deit_tiny_patch16_224"]
    path = export_onnx(qm, tmp_path / "deit_int4.onnx", ExportOptions(precision="int4", dtype="fp16"))
    graph = onnx.load(str(path))
    inits = {i.name: i for i in graph.graph.initializer}
    int4 = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    assert int4 and all({a.name: a.i for a in n.attribute}["block_size"] in (64, 128) for n in int4)
    low_bit = [m for n, m in qm.named_modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.bits <= 4
               and m.weight.dim() == 2]
    low_bytes = sum(m.weight.numel() for m in low_bit)
    int4_bytes = sum(numpy_helper.to_array(inits[n.input[0]]).size for n in int4)
    figures(f"deit_tiny int4 (block 64): {int4_bytes / low_bytes:.0%} of the <=4-bit MatMul weights are INT4")
    assert int4_bytes >= 0.5 * low_bytes
    report = _build(path, tmp_path)
    s = report["anatomy"]["summary"]
    figures(f"deit_tiny W4A4 int4 fp16 plan: {summary_line(report['anatomy'])}")
    assert s["unmatched"] == 0 and s["float_gemms"] == 0 and s["weight_casts"] == len(int4)  # reported, not hidden


@pytest.mark.slow  # exports a full-size model
def test_swin_int4_keeps_k96_layers_int8_and_says_why(photo_w4a4, tmp_path):
    from qvit_export.onnx_export import int4_layers

    qm = photo_w4a4["swin_tiny_patch4_window7_224"]
    chosen, kept = int4_layers(qm, 64)
    assert kept["layers.0.blocks.0.attn.qkv"] == "K=96 is no multiple of the INT4 block 64"
    assert "layers.0.blocks.0.mlp.fc2" in chosen and kept["head.fc"].startswith("8-bit weights")
    path = export_onnx(qm, tmp_path / "swin_int4.onnx", ExportOptions(precision="int4"))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["int8_weight_layers"]) == kept and meta["int4_block"] == "64"


def test_int4_weight_only_builds_with_fused_block_dequantization(fmnist_exports, tmp_path, figures):
    qm, _ = fmnist_exports[4]
    path = export_onnx(qm, tmp_path / "wo.onnx", ExportOptions(precision="int4-weight-only", dtype="fp16"))
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)
    report = _build(path, tmp_path)
    s = report["anatomy"]["summary"]
    figures(f"demo ViT int4-weight-only fp16 plan: {summary_line(report['anatomy'])}")
    assert s["int4_weight_gemms"] == 4 * DEPTH and s["weight_casts"] == 0 and s["unmatched"] == 0


def test_a_quantized_matmul_fed_a_float_weight_fails_the_build_by_name(fmnist_exports, tmp_path):
    """Break one layer: its weight DQ replaced by the dequantized float weight. The anatomy sees a float GEMM."""
    from onnx import numpy_helper

    qm, path = fmnist_exports[4]
    graph = onnx.load(str(path))
    inits = {i.name: i for i in graph.graph.initializer}
    dq = next(n for n in graph.graph.node if n.name == "blocks.1.mlp.fc1.weight_quantizer/DequantizeLinear")
    codes, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
    graph.graph.initializer.append(numpy_helper.from_array(codes.astype("float32") * scale.reshape(1, -1), dq.output[0]))
    graph.graph.node.remove(dq)
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    with pytest.raises(QvitError, match=r"blocks\.1\.mlp\.fc1 as float GEMMs.*--allow-float-gemms"):
        _build(broken, tmp_path)
    assert not (tmp_path / "broken.plan").exists() and not (tmp_path / "broken.build.json").exists()
    evidence = json.loads((tmp_path / "broken.build.failed.json").read_text())
    assert evidence["anatomy"]["summary"]["float_gemms"] == 1
    kept = _build(broken, tmp_path, allow_float_gemms=True)
    assert [e["layer"] for e in kept["anatomy"]["layers"] if e["kind"] == "float"] == ["blocks.1.mlp.fc1"]


def test_no_listing_and_no_inspector_skips_with_the_reason(fmnist_exports):
    """TensorRT 10.x/11.x on a GPU give the anatomy from the engine inspector; without either source it says why."""
    from qvit_export.engine import engine_anatomy

    graph = onnx.load(str(fmnist_exports[8][1]))
    skipped = engine_anatomy(graph, None, {"skipped": "the plan cannot be deserialized here (no GPU)"})
    assert skipped == {"skipped": "no layer information: the builder printed no listing and the plan cannot be "
                                  "deserialized here (no GPU)"}
    listing = (DATA / "int8.layers.txt").read_text()
    assert "summary" in engine_anatomy(graph, listing, skipped)


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
    op = {"layer": "fc", "node": "fc/MatMul", "op": "MatMul", "weight_dq": None, "input_dq": [],
          "weight_dtype": "int8"}
    anatomy = analyze(kernels, [op])
    assert anatomy["summary"]["kernels"] == 1 and anatomy["stream_events"] == 2
