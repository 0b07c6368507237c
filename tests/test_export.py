"""qvit-export's graph: QDQ structure, stored codes, onnxsim, parity through ONNX Runtime, TensorRT-RTX engines.

DeiT-tiny and Swin-tiny are random-init, calibrated on real photographs; the demo ViT is trained on
Fashion-MNIST and checked on its test images (all 10,000 at 8 and 4 bits).
"""
import json

import numpy as np
import onnx
import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, create_model, quantize, quantizers
from qvit_export.config import DEFAULT_IRM
from qvit_export.lsq import ACTIVATION, WEIGHT, LSQQuantizer, PerBlock, PerChannel
from qvit_export.demo import DEMO_KWARGS
from qvit_export.onnx_export import ExportOptions, export_onnx
from qvit_export.onnx_graph import qdq_counts, quantized_ops
from qvit_export.parity import compare

DEPTH = DEMO_KWARGS["depth"]
BITS = [8, 4, 3, 2]
PHOTO_MODELS = ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]


def _counts_match_quantizers(graph, model):
    """One QDQ pair per activation quantizer, one DequantizeLinear per weight quantizer."""
    named = dict(quantizers(model))
    activations = sum(1 for q in named.values() if q.role == ACTIVATION)
    assert qdq_counts(graph) == {"QuantizeLinear": activations, "DequantizeLinear": len(named)}


def _stored_weights_equal_forward(graph, model):
    """Stored integer weights times their scales equal PyTorch's fake-quantized weights, bit for bit."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    checked = 0
    for node in graph.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            layer = model.get_submodule(node.name.split("/")[0].rsplit(".", 1)[0])
            codes, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            if codes.ndim == 2:  # [K, N]: one scale per channel, or per (block of K, channel) for INT4
                scale = np.repeat(scale.reshape(-1, codes.shape[1]), codes.shape[0] // scale.reshape(-1, codes.shape[1]).shape[0], 0)
            stored = torch.from_numpy(codes * (scale if codes.ndim == 2 else scale.reshape(-1, 1, 1, 1)))
            with torch.no_grad():
                expected = layer.weight_quantizer(layer.weight)
            # MatMul weights are stored [K, N]; a patch embedding written as a MatMul flattens its Conv kernel
            assert torch.equal(stored.T.reshape(expected.shape) if codes.ndim == 2 else stored, expected), node.name
            checked += 1
    assert checked == sum(1 for _, q in quantizers(model) if q.role == WEIGHT)


def _zero_points(graph):
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node if n.op_type == "Constant"}
    return [values[n.input[2]] for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", PHOTO_MODELS)
def test_photo_models_qdq_graph_and_codes(name, bits, photo_exports, figures):
    qm, path, report = photo_exports[name, bits]
    graph = onnx.load(str(path))
    _counts_match_quantizers(graph, qm)
    assert all(np.all(z == 0) and z.dtype == np.int8 for z in _zero_points(graph))
    assert report.weights_identical, report.weight_mismatches
    _stored_weights_equal_forward(graph, qm)
    figures(f"{name} W{bits}A{bits}: {report.table(rows=2)}")
    # Random-init logits are nearly tied, so top-1 is not asserted here; every quantizer's codes are.
    code_failures = [f for f in report.failures() if not f.startswith("top-1")]
    assert not code_failures, code_failures


def test_graph_form_follows_tensorrt_rules(photo_exports):
    _, path, _ = photo_exports["deit_tiny_patch16_224", 4]
    graph = onnx.load(str(path))
    nodes = {n.name: n for n in graph.graph.node}
    producers = {o: n for n in graph.graph.node for o in n.output}
    users = {}
    for n in graph.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    # sub-8-bit activations: Clip → QuantizeLinear → DequantizeLinear
    q = nodes["blocks.0.mlp.fc1.input_quantizer/QuantizeLinear"]
    assert producers[q.input[0]].op_type == "Clip"
    # 8-bit edges have no Clip
    assert producers[nodes["head.input_quantizer/QuantizeLinear"].input[0]].op_type != "Clip"
    # every DequantizeLinear feeds its MatMul/Conv directly (TensorRT fuses DQ → MatMul)
    for n in graph.graph.node:
        if n.op_type == "DequantizeLinear":
            assert {u.op_type for u in users[n.output[0]]} <= {"MatMul", "Conv", "Gemm"}, n.name
    # qkv: one MatMul under its input DQ and weight DQ; its output goes to the heads first (layers.split_heads):
    # Reshape [B, N, 3·H, d] → Transpose → Reshape [B, 3, H, N, d] → unbind (after the bias Add, where the bias is
    # not zero)
    x = nodes["blocks.0.attn.qkv.input_quantizer/DequantizeLinear"]
    assert [u.name for u in users[x.output[0]]] == ["blocks.0.attn.qkv/MatMul"]
    after = users[nodes["blocks.0.attn.qkv/MatMul"].output[0]]
    after = users[after[0].output[0]] if after[0].op_type == "Add" else after
    assert [u.op_type for u in after] == ["Reshape"]
    transpose = users[after[0].output[0]]
    assert [u.op_type for u in transpose] == ["Transpose"]
    assert [u.op_type for u in users[transpose[0].output[0]]] == ["Reshape"]
    # IRM: one LayerNormalization on q and k stacked along the heads (over the axes of the default variant), q's
    # slice of it, then only per-channel affine maps and the folded attention scale (Mul/Add), then q's quantizer
    node = producers[producers[nodes["blocks.0.attn.q_quantizer/QuantizeLinear"].input[0]].input[0]]
    affine = []
    while node.op_type in ("Mul", "Add", "Slice", "Split"):
        affine.append(node.op_type)
        node = producers[node.input[0]]
    assert node.op_type == "LayerNormalization" and "Mul" in affine and len(affine) <= 4, affine
    assert {a.name: a.i for a in node.attribute}["axis"] == {"token": -1, "head": -2}[DEFAULT_IRM]
    assert producers[node.input[0]].op_type == "Concat"  # q and k: one normalisation (onnx_export.PairedIRM)
    assert graph.opset_import[0].version == 17


def test_onnxsim_keeps_every_qdq_node(photo_exports, tmp_path):
    qm, _, _ = photo_exports["swin_tiny_patch4_window7_224", 4]
    plain = onnx.load(str(export_onnx(qm, tmp_path / "plain.onnx", simplify=False)))
    simple = onnx.load(str(export_onnx(qm, tmp_path / "simple.onnx", simplify=True)))
    assert qdq_counts(plain) == qdq_counts(simple)
    assert len(simple.graph.node) < len(plain.graph.node)  # onnxsim did simplify


# The widths users deploy are checked on all 10,000 test images; 3 and 2 bits on the first 2,000 (one flipped
# prediction is still 0.05%, half the 0.1% allowed), which keeps the suite within its time (about 50 s each).
PARITY_IMAGES = {8: 10_000, 4: 10_000, 3: 2_000, 2: 2_000}


@pytest.mark.parametrize("bits", BITS)
def test_fashion_mnist_parity_on_the_test_images(bits, fmnist_exports, fmnist_test, figures):
    qm, path = fmnist_exports[bits]
    _counts_match_quantizers(onnx.load(str(path)), qm)
    report = compare(qm, path, fmnist_test.tensors[0][:PARITY_IMAGES[bits]], progress=False)
    figures(f"W{bits}A{bits} demo ViT: {report.table(rows=3)}")
    assert report.images == PARITY_IMAGES[bits]
    assert report.failures() == []


def _int4_dq(graph):
    inits = {i.name: i for i in graph.graph.initializer}
    return [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT4]


def test_int4_weights_are_block_quantized_int4(fmnist_exports, fmnist_test, figures):
    """Blocks of 64 along K (TensorRT's documented form), the per-channel step repeated in every block: the stored
    values are those of the INT8 export, and parity holds on 2,000 test images."""
    from onnx import numpy_helper

    qm, _ = fmnist_exports[4]
    path = export_onnx(qm, fmnist_exports[4][1].with_name("w4_int4.onnx"), ExportOptions(precision="int4"))
    graph = onnx.load(str(path))
    int4 = _int4_dq(graph)
    assert len(int4) == 4 * DEPTH  # qkv, proj, fc1, fc2 per block; patch embedding (Conv) and head stay INT8
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    for n in int4:
        attrs = {a.name: a.i for a in n.attribute}
        k = inits[n.input[0]].shape[0]
        assert attrs["block_size"] == 64 and attrs["axis"] == 0 and inits[n.input[1]].shape[0] == k // 64
        assert (inits[n.input[1]] == inits[n.input[1]][:1]).all()  # one step per channel, repeated per block
    assert graph.opset_import[0].version == 21
    _stored_weights_equal_forward(graph, qm)
    report = compare(qm, path, fmnist_test.tensors[0][:2000], progress=False)  # the INT8 export has all 10,000
    figures(f"int4 (block 64) demo ViT: {report.table(rows=1)}")
    assert report.images == 2000 and report.weights_identical and report.failures() == []


def test_per_block_weight_steps_deploy_as_int4_blocks(fmnist_teacher, fmnist_calibration, fmnist_test, figures,
                                                      tmp_path):
    """QuantConfig(w_block=64): one learned step per block of 64 inputs of each output channel where the layer can
    be INT4 blocks (every qkv, proj, fc1, fc2 of the demo ViT), per channel at the 8-bit edges. The blocks fit the
    weights more closely than one step per channel, export as INT4 with their own steps (not a repeated one), keep
    parity through ONNX Runtime, survive a checkpoint, and refuse any form that cannot hold them."""
    from onnx import numpy_helper

    from qvit_export import load_checkpoint, save_checkpoint
    from qvit_export.evaluation import evaluate

    blocked = calibrate(quantize(fmnist_teacher, QuantConfig(4, 4, irm=False, w_block=64)), fmnist_calibration,
                        progress=False)
    channel = calibrate(quantize(fmnist_teacher, QuantConfig(4, 4, irm=False)), fmnist_calibration, progress=False)
    weights = {n: q for n, q in quantizers(blocked) if q.role == WEIGHT}
    per_block = {n for n, q in weights.items() if q.per_block}
    assert per_block == {f"blocks.{i}.{layer}.weight_quantizer" for i in range(DEPTH)
                         for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert all(q.granularity == PerBlock(1, 64) for n, q in weights.items() if n in per_block)
    assert weights["head.weight_quantizer"].granularity == PerChannel(0)  # an 8-bit edge keeps one step per channel
    from qvit_export.report import report

    extra_steps = sum(q.step.numel() - q.step.shape[0] for q in weights.values() if q.per_block)
    assert report(blocked, None).q_bits - report(channel, None).q_bits == 32 * extra_steps  # FP32 scales, counted
    channel_q = dict(quantizers(channel))
    with torch.no_grad():
        for name in per_block:
            layer = blocked.get_submodule(name.rsplit(".", 1)[0])
            q = weights[name]
            assert q.step.shape == (layer.out_features, layer.in_features // 64)
            err_block = (q(layer.weight) - layer.weight).pow(2).mean()
            err_channel = (channel_q[name](layer.weight) - layer.weight).pow(2).mean()
            assert err_block < err_channel, name

    path = export_onnx(blocked, tmp_path / "w4_block.onnx", ExportOptions(precision="int4"))
    graph = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    int4 = {n.name.split("/")[0]: n for n in _int4_dq(graph)}
    assert set(int4) == per_block
    for name, node in int4.items():
        scale = inits[node.input[1]].astype(np.float32)
        assert np.array_equal(scale, weights[name].scale().t().numpy())  # the block steps themselves
        assert not (scale == scale[:1]).all()  # not one step repeated
    _stored_weights_equal_forward(graph, blocked)
    report = compare(blocked, path, fmnist_test.tensors[0][:2000], progress=False)
    top1 = {kind: evaluate(m, fmnist_test, progress=False)["top1"] for kind, m in (("block", blocked),
                                                                                   ("channel", channel))}
    figures(f"W4A4 PTQ demo ViT, per-block (64) weight steps: top-1 {top1['block']:.2f}% "
            f"(per channel {top1['channel']:.2f}%); int4 export {report.table(rows=1)}")
    assert report.images == 2000 and report.weights_identical and report.failures() == []

    loaded = load_checkpoint(save_checkpoint(tmp_path / "block.pt", blocked))
    assert loaded.qvit_config.w_block == 64 and dict(quantizers(loaded))["blocks.0.mlp.fc2.weight_quantizer"].per_block
    x = fmnist_test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), blocked(x))
    for options in (ExportOptions(precision="int8"), ExportOptions(precision="int4", int4_block=128)):
        with pytest.raises(QvitError, match="only INT4 weights in blocks of 64 hold: export with --precision int4"):
            export_onnx(blocked, tmp_path / "refused.onnx", options)
    assert not (tmp_path / "refused.onnx").exists()
    for bad in (96, 64.0, True):
        with pytest.raises(QvitError, match=f"w_block={bad} is not an INT4 block size"):
            QuantConfig(w_block=bad)
    with pytest.raises(QvitError, match="w_block=64 is for INT4 weights but w_bits=8: lower w_bits"):
        QuantConfig(8, 8, w_block=64)


def test_int4_block_128_keeps_narrow_layers_int8(fmnist_exports):
    from qvit_export.onnx_export import int4_layers

    qm, path = fmnist_exports[4]
    graph = onnx.load(str(export_onnx(qm, path.with_name("w4_b128.onnx"), ExportOptions(precision="int4", int4_block=128))))
    assert [n.name.split("/")[0] for n in _int4_dq(graph)] == [f"blocks.{i}.mlp.fc2.weight_quantizer" for i in range(DEPTH)]
    meta = {p.key: json.loads(p.value) if p.key == "int8_weight_layers" else p.value for p in graph.metadata_props}
    assert meta["int4_block"] == "128" and meta["int8_weight_layers"] == int4_layers(qm, 128)[1]
    assert meta["int8_weight_layers"]["blocks.0.attn.qkv"].startswith("K=128 is a single INT4 block")
    with pytest.raises(QvitError, match="block size 96 is not one TensorRT documents"):
        ExportOptions(precision="int4", int4_block=96)


def test_int4_weight_only_parity_against_activation_quantizers_off(fmnist_exports, fmnist_test, figures):
    from qvit_export.parity import OnnxModule
    from qvit_export.quantize import quantizers_disabled
    from qvit_export.evaluation import evaluate

    qm, path = fmnist_exports[4]
    wo = export_onnx(qm, path.with_name("w4_wo.onnx"), ExportOptions(precision="int4-weight-only"))
    graph = onnx.load(str(wo))
    assert qdq_counts(graph) == {"DequantizeLinear": 4 * DEPTH + 1}  # INT4 blocks + the 8-bit head; the Conv stores floats
    assert len(_int4_dq(graph)) == 4 * DEPTH
    report = compare(qm, wo, fmnist_test.tensors[0], progress=False)
    figures(f"int4-weight-only demo ViT: {report.table(rows=0)}")
    assert report.images == 10_000 and report.weights_identical and report.failures() == []
    assert all(q.enabled for _, q in quantizers(qm))  # compare() switched them back on
    top1_onnx = evaluate(OnnxModule(wo), fmnist_test, progress=False)["top1"]
    with quantizers_disabled(qm, weights=False):
        top1_torch = evaluate(qm, fmnist_test, progress=False)["top1"]
    figures(f"int4-weight-only top-1: ONNX Runtime {top1_onnx:.2f}%, PyTorch (activation quantizers off) {top1_torch:.2f}%")
    assert abs(top1_onnx - top1_torch) <= 0.1


def test_fp16_graph(fmnist_exports, fmnist_test, figures):
    """FP16 outside the QDQ pairs moves values across code boundaries: predictions near ties change, accuracy
    does not (the codes stay within 1 LSB when each layer starts from the same inputs)."""
    from qvit_export.parity import OnnxModule
    from qvit_export.evaluation import evaluate

    qm, path = fmnist_exports[4]
    path16 = export_onnx(qm, path.with_name("w4_fp16.onnx"), ExportOptions(dtype="fp16"))
    graph = onnx.load(str(path16))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.opset_import[0].version == 19
    images = fmnist_test.tensors[0][:2000]
    report = compare(qm, path16, images, progress=False)
    figures(f"fp16 graph vs fp32 PyTorch: {report.table(rows=3)}")
    assert report.weights_identical and not report.failures(min_top1=90.0, min_codes=98.0)
    # a library caller gets the FP16 thresholds from the options alone (FP32's 99.9% would refuse this graph)
    from qvit_export import DeployOptions, DeployOutputs, deploy

    lib = deploy(qm, DeployOptions(ExportOptions(dtype="fp16")), DeployOutputs(path.with_name("w4_fp16_lib.onnx")),
                 images, progress=False)
    assert not lib.parity.failures(min_top1=90.0, min_codes=98.0) and lib.build is None
    subset = torch.utils.data.TensorDataset(images, fmnist_test.tensors[1][:2000])
    top1_fp16 = evaluate(OnnxModule(path16), subset, progress=False)["top1"]
    top1_torch = evaluate(qm, subset, progress=False)["top1"]
    figures(f"top-1: PyTorch fp32 {top1_torch:.2f}%, ONNX fp16 {top1_fp16:.2f}%")
    assert abs(top1_fp16 - top1_torch) <= 1.0


def test_parity_thresholds_follow_the_dtype():
    from qvit_export.parity import ParityThresholds

    assert ParityThresholds.for_dtype("fp32") == ParityThresholds(99.9, 99.9, 1)
    assert ParityThresholds.for_dtype("fp16") == ParityThresholds(90.0, 98.0, 1)
    assert ParityThresholds.for_dtype("fp16", min_top1=99.0, max_lsb=0) == ParityThresholds(99.0, 98.0, 0)


def test_decomposed_layernorm_for_tensorrt_8_5(fmnist_exports, fmnist_test):
    qm, path = fmnist_exports[4]
    graph = onnx.load(str(export_onnx(qm, path.with_name("w4_dec.onnx"), ExportOptions(decompose_layernorm=True))))
    assert not any(n.op_type == "LayerNormalization" for n in graph.graph.node)
    report = compare(qm, path.with_name("w4_dec.onnx"), fmnist_test.tensors[0][:2000], progress=False)
    assert report.failures() == []


def test_export_is_deterministic_and_self_describing(fmnist_exports, tmp_path):
    qm, _ = fmnist_exports[3]
    a = export_onnx(qm, tmp_path / "a.onnx", metadata={"checkpoint_sha256": "abc"})
    b = export_onnx(qm, tmp_path / "b.onnx", metadata={"checkpoint_sha256": "abc"})
    assert a.read_bytes() == b.read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(a)).metadata_props}
    assert meta["checkpoint_sha256"] == "abc" and meta["precision"] == "int8"
    assert json.loads(meta["quant_config"])["w_bits"] == 3 and meta["qvit_export_version"]
    onnx.checker.check_model(onnx.load(str(a)), full_check=True)


def test_refusals_name_the_layer_and_the_fix(fmnist_exports, tmp_path):
    qm, _ = fmnist_exports[8]
    with pytest.raises(QvitError, match="blocks.0.attn.qkv.*8-bit weights.*--precision int8"):
        export_onnx(qm, tmp_path / "x.onnx", ExportOptions(precision="int4"))
    per_channel = quantize(create_model("test_vit"), QuantConfig())
    q = LSQQuantizer(4, (1, 1, 64), name="blocks.0.mlp.fc1.input_quantizer")
    q.set_step(torch.ones(1, 1, 64))
    per_channel.blocks[0].mlp.fc1.input_quantizer = q
    for _, other in quantizers(per_channel):
        other.initialized = True
    with pytest.raises(QvitError, match="'blocks.0.mlp.fc1.input_quantizer' quantizes an activation per channel"):
        export_onnx(per_channel, tmp_path / "y.onnx")
    with pytest.raises(QvitError, match="--opset 19"):
        ExportOptions(dtype="fp16", opset=17).resolved_opset()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tensorrt_rtx_builds_sm89_engine(precision, fmnist_exports, tmp_path, figures):
    from qvit_export.engine import build_engine  # make test installs the trt-rtx extra: no skip

    qm, path = fmnist_exports[4]
    onnx_path = export_onnx(qm, tmp_path / "m.onnx", ExportOptions(precision=precision))
    report = build_engine(onnx_path, tmp_path / "m.plan", target="tensorrt-rtx", compute_capability="sm89",
                          timing_cache=tmp_path / "cache.bin")
    counts = qdq_counts(onnx.load(str(onnx_path)))
    kinds = [layer["type"] for layer in report["qdq_layers"]]
    assert kinds.count("QUANTIZE") == counts["QuantizeLinear"] and kinds.count("DEQUANTIZE") == counts["DequantizeLinear"]
    assert (tmp_path / "m.plan").stat().st_size == report["plan_bytes"] > 0
    saved = json.loads((tmp_path / "m.build.json").read_text())
    assert saved["library"] == "tensorrt-rtx" and saved["target"] == "sm89" and saved["precision"] == precision
    assert saved["timing_cache"] == "not used by TensorRT-RTX" and not (tmp_path / "cache.bin").exists()
    figures(f"{precision}: plan {report['plan_bytes'] / 1e6:.2f} MB, {report['layers']} layers, "
          f"{report['build_seconds']:.1f} s")


@pytest.mark.slow  # exports a full-size model
def test_distilled_deit_exports_both_heads(photos_224, tmp_path):
    torch.manual_seed(0)
    fp = create_model("deit_tiny_distilled_patch16_224")
    qm = calibrate(quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=True)), [photos_224], irm_steps=2)
    path = export_onnx(qm, tmp_path / "distilled.onnx", ExportOptions(precision="int4"))
    graph = onnx.load(str(path))
    _counts_match_quantizers(graph, qm)
    assert {"head.input_quantizer/QuantizeLinear", "head_dist.input_quantizer/QuantizeLinear"} <= {n.name for n in graph.graph.node}
    report = compare(qm, path, photos_224, progress=False)
    assert report.weights_identical and not [f for f in report.failures() if not f.startswith("top-1")]


def test_static_batch_graph_and_engine(fmnist_exports, tmp_path):
    qm, _ = fmnist_exports[4]
    path = export_onnx(qm, tmp_path / "static.onnx", ExportOptions(dynamic_batch=False))
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 28, 28]
    from qvit_export.engine import build_engine

    report = build_engine(path, tmp_path / "static.plan", target="tensorrt-rtx", compute_capability="sm89")
    assert report["batch"] == {"min": 1, "opt": 1, "max": 1}
