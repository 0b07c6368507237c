"""The two export routes (onnx_routes: torch.export 'dynamo', the default, and PyTorch's deprecated TorchScript
exporter) write the same graph: the same Clip/QuantizeLinear/DequantizeLinear nodes, identical weight codes and
scales, ORT logits within float noise, the same parity figures, byte-identical reruns.

DeiT-tiny and Swin-tiny (random init, IRM on, calibrated on the photographs) and the trained demo ViT (Fashion-MNIST,
1,000 test images) at W8A8, W4A4 and W2A2, in every precision their weights allow (the timm models' W2A2 as int8).
The int8 graphs of the default route are the session fixtures' own (conftest), so each case exports only what it
lacks.
"""
import time

import numpy as np
import onnx
import pytest

from qvit_export.onnx_export import PRECISIONS, ExportOptions, export_onnx, onnx_model
from qvit_export.onnx_graph import weight_initializers
from qvit_export.onnx_routes import DEFAULT_ROUTE, ROUTES
from qvit_export.parity import PARITY_ORT_OPTIMIZATION, compare, ort_session

MODELS = ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "demo"]
# W2A2's int4 graphs differ from W4A4's only in Clip bounds and scale values, which the int8 case compares: the
# timm models take W2A2 as int8 alone, the demo in every precision (saves two minutes of the suite).
CASES = [(model, bits, precision) for model in MODELS for bits in (8, 4, 2) for precision in PRECISIONS
         if (bits <= 4 or precision == "int8") and (bits != 2 or precision == "int8" or model == "demo")]
QDQ_NODES = ("Clip", "QuantizeLinear", "DequantizeLinear")
FLOAT_NOISE = 1e-4  # logits of FP32 graphs; measured 0 (same ops in the same order) and 1.2e-7 (static batch)
# ONNX Runtime run as parity runs it (basic optimizations): its extended level replaces Q/DQ pairs with integer
# kernels that fuse differently on the two graphs' reshapes (DeiT-Ti W8A8: Δ 0.023 there, 0 at basic and none).


def _case(model, photo_exports, fmnist_exports, photos_224, fmnist_test, bits):
    """(quantized model, the default route's int8 ONNX, its parity report or None, images) of one model at WbAb."""
    if model == "demo":
        qm, path = fmnist_exports[bits]
        return qm, path, None, fmnist_test.tensors[0][:1000]
    return *photo_exports[model, bits], photos_224


def _qdq_scales(graph) -> dict[str, np.ndarray]:
    """{node name: its scale} for every Q/DQ node (names are the quantizers', set by onnx_graph.prepare)."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    return {n.name: values[n.input[1]] for n in graph.graph.node if n.op_type in QDQ_NODES[1:]}


def _logits(path, images) -> np.ndarray:
    session = ort_session(path, optimization=PARITY_ORT_OPTIMIZATION)
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


@pytest.mark.parametrize("model,bits,precision", CASES, ids=[f"{m}-W{b}A{b}-{p}" for m, b, p in CASES])
def test_routes_write_the_same_graph(model, bits, precision, photo_exports, fmnist_exports, photos_224, fmnist_test,
                                     tmp_path, figures):
    qm, fixture_path, fixture_report, images = _case(model, photo_exports, fmnist_exports, photos_224, fmnist_test, bits)
    paths, seconds = {}, {}
    for route in ROUTES:
        if route == DEFAULT_ROUTE and precision == "int8":
            paths[route] = fixture_path
            continue
        start = time.perf_counter()
        paths[route] = export_onnx(qm, tmp_path / f"{route}.onnx", ExportOptions(precision=precision, exporter=route))
        seconds[route] = time.perf_counter() - start
    graphs = {route: onnx.load(str(path)) for route, path in paths.items()}
    dynamo, script = graphs["dynamo"], graphs["torchscript"]
    assert [{p.key: p.value for p in g.metadata_props}["exporter"] for g in (dynamo, script)] == ["dynamo", "torchscript"]
    assert dynamo.opset_import[0].version == script.opset_import[0].version == ExportOptions(precision=precision).resolved_opset()

    counts = {route: {op: sum(n.op_type == op for n in g.graph.node) for op in QDQ_NODES} for route, g in graphs.items()}
    assert counts["dynamo"] == counts["torchscript"] and counts["dynamo"]["DequantizeLinear"] > 0
    names = {route: sorted(n.name for n in g.graph.node if n.op_type in QDQ_NODES) for route, g in graphs.items()}
    assert names["dynamo"] == names["torchscript"]  # every node named after the same quantizer

    codes = {route: weight_initializers(g) for route, g in graphs.items()}
    assert codes["dynamo"].keys() == codes["torchscript"].keys()
    for name, stored in codes["dynamo"].items():
        other = codes["torchscript"][name]
        assert stored.dtype == other.dtype and np.array_equal(stored, other), name
    scales = {route: _qdq_scales(g) for route, g in graphs.items()}
    assert scales["dynamo"].keys() == scales["torchscript"].keys()
    assert all(np.array_equal(s, scales["torchscript"][n]) for n, s in scales["dynamo"].items())

    delta = float(np.abs(_logits(paths["dynamo"], images) - _logits(paths["torchscript"], images)).max())
    assert delta <= FLOAT_NOISE
    reports = {route: fixture_report if path == fixture_path and fixture_report else compare(qm, path, images, progress=False)
               for route, path in paths.items()}
    a, b = reports["dynamo"], reports["torchscript"]
    assert a.weights_identical and b.weights_identical
    assert a.top1_agree == b.top1_agree and a.images == b.images
    assert {n: (q.equal, q.max_lsb) for n, q in a.quantizers.items()} == \
        {n: (q.equal, q.max_lsb) for n, q in b.quantizers.items()}
    timing = ", ".join(f"{route} {s:.1f} s" for route, s in seconds.items())
    figures(f"routes {model} W{bits}A{bits} {precision}: QDQ {counts['dynamo']} equal, codes equal, max |Δlogit| "
            f"{delta:.2g}, top-1 agreement {a.top1_agreement:.2f}% both; export {timing}")


@pytest.mark.parametrize("model", MODELS)
def test_both_routes_rerun_byte_identical(model, photo_exports, fmnist_exports, photos_224, fmnist_test, tmp_path):
    qm, fixture_path, _, _ = _case(model, photo_exports, fmnist_exports, photos_224, fmnist_test, 4)
    for route in ROUTES:
        first = fixture_path if route == DEFAULT_ROUTE else export_onnx(qm, tmp_path / "a.onnx", ExportOptions(exporter=route))
        again = onnx_model(qm, ExportOptions(exporter=route)).SerializeToString()
        assert again == first.read_bytes(), route


def test_dynamo_route_options_match_torchscript(fmnist_exports, fmnist_test, tmp_path):
    """fp16, decomposed LayerNorm (opset 17 through ONNX's version converter), static batch, opset 21: the same
    QDQ nodes and codes, logits within float noise (FP16: within FP16 rounding of the same graph)."""
    qm, _ = fmnist_exports[4]
    images = fmnist_test.tensors[0][:500]
    for options in (dict(dtype="fp16"), dict(decompose_layernorm=True), dict(dynamic_batch=False), dict(opset=21)):
        paths = {route: export_onnx(qm, tmp_path / f"{route}.onnx", ExportOptions(exporter=route, **options))
                 for route in ROUTES}
        graphs = {route: onnx.load(str(p)) for route, p in paths.items()}
        assert len({g.opset_import[0].version for g in graphs.values()}) == 1, options
        assert len({tuple(sorted(n.name for n in g.graph.node if n.op_type in QDQ_NODES)) for g in graphs.values()}) == 1
        codes = [weight_initializers(g) for g in graphs.values()]
        assert all(np.array_equal(codes[0][k], codes[1][k]) for k in codes[0]) and codes[0].keys() == codes[1].keys()
        x = images[:1] if options.get("dynamic_batch") is False else images
        x = x.half() if options.get("dtype") == "fp16" else x
        logits = [_logits(p, x).astype(np.float32) for p in paths.values()]
        assert float(np.abs(logits[0] - logits[1]).max()) <= FLOAT_NOISE, options
        if options.get("decompose_layernorm"):
            assert not any(n.op_type == "LayerNormalization" for g in graphs.values() for n in g.graph.node)


def _pad_graph(pads: list[int]):
    """Input → Pad (opset 18, constant pads) → Relu: Pad is the op ONNX's version converter cannot take to 17."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
             helper.make_node("Relu", ["padded"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lowering_to_opset_17_bypasses_padless_pads_and_refuses_the_rest():
    from qvit_export import QvitError
    from qvit_export.onnx_graph import lower_opset

    lowered = lower_opset(_pad_graph([0, 0, 0, 0]), 17)
    assert lowered.opset_import[0].version == 17 and [n.op_type for n in lowered.graph.node] == ["Relu"]
    assert list(lowered.graph.node[0].input) == ["x"]
    with pytest.raises(QvitError, match=r"opset 18 to 17 .*Pad.*--opset 18, or with --exporter torchscript"):
        lower_opset(_pad_graph([0, 1, 0, 1]), 17)
    assert lower_opset(_pad_graph([0, 1, 0, 1]), 18).opset_import[0].version == 18  # nothing to lower
