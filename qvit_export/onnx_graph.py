"""Surgery and inspection on the exported ONNX graph (onnx protos only; no torch).

- names every Clip/QuantizeLinear/DequantizeLinear after the quantizer whose scale it reads;
- rewrites ≤4-bit MatMul weights as INT4 block-quantized initializers (one block spans K: our per-channel step);
- records metadata, and saves atomically;
- counts QDQ nodes and checks the TensorRT rules (zero points all zero, constant positive scales).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import QvitError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SCALE_SUFFIXES = (".input_quantizer.scale", ".weight_scale", "_quantizer.scale")


def quantizer_of(scale_name: str) -> str | None:
    """'blocks.0.attn.q_quantizer.scale' → 'blocks.0.attn.q_quantizer';
    'blocks.0.mlp.fc1.weight_scale' → 'blocks.0.mlp.fc1.weight_quantizer'."""
    if scale_name.endswith(".weight_scale"):
        return scale_name[: -len("_scale")] + "_quantizer"
    if scale_name.endswith("_quantizer.scale"):
        return scale_name[: -len(".scale")]
    return None


def qdq_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type in QDQ_OPS)


def quantize_outputs(model) -> dict[str, str]:
    """{quantizer name: output tensor of its QuantizeLinear} for the activation quantizers."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            name = quantizer_of(node.input[1])
            if name is None:
                raise QvitError(f"QuantizeLinear '{node.name}' reads scale '{node.input[1]}', which no quantizer owns")
            found[name] = node.output[0]
    return found


def weight_initializers(model) -> dict[str, np.ndarray]:
    """{weight quantizer name: integer codes as stored} for every weight DequantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            out[quantizer_of(node.input[1])] = numpy_helper.to_array(inits[node.input[0]])
    return out


def _name_nodes(model) -> None:
    """Deterministic, readable names: '<quantizer>/QuantizeLinear' and so on."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            owner = quantizer_of(node.input[1])
            if owner:
                node.name = f"{owner}/{node.op_type}"
                if node.op_type == "QuantizeLinear" and node.input[0] in producers:
                    clip = producers[node.input[0]]
                    if clip.op_type == "Clip":
                        clip.name = f"{owner}/Clip"


def _prune_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _to_int4(model, is_edge) -> None:
    """INT8 weight codes of MatMul layers → INT4 initializers with block quantization (block = all of K)."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight_codes") or node.input[0] not in inits:
            continue
        if [u.op_type for u in users.get(node.output[0], [])] != ["MatMul"]:
            continue  # Conv (patch embedding) stays INT8: TensorRT has no INT4 convolution
        layer = node.input[0][: -len(".weight_codes")]
        codes = numpy_helper.to_array(inits[node.input[0]])
        if codes.min() < -8 or codes.max() > 7:
            if is_edge(layer):
                continue
            raise QvitError(f"layer '{layer}' has 8-bit weights, which INT4 cannot hold: export with --precision "
                            "int8, or retrain with w_bits <= 4")
        k, n = codes.shape
        scale = numpy_helper.to_array(inits[node.input[1]]).reshape(1, n)
        # Codes and scales are this layer's own; a zero point may be shared after onnxsim, so it gets a new name.
        for index, name, tensor in (
                (0, layer + ".weight_codes", helper.make_tensor("", onnx.TensorProto.INT4, [k, n], codes.flatten().tolist())),
                (1, layer + ".weight_scale", numpy_helper.from_array(scale)),
                (2, layer + ".weight_zero_int4", helper.make_tensor("", onnx.TensorProto.INT4, [1, n], [0] * n))):
            if node.input[index] == name:
                model.graph.initializer.remove(inits.pop(name))
            tensor.name = name
            model.graph.initializer.append(tensor)
            node.input[index] = name
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", k)])
    _prune_initializers(model)


def check_tensorrt_rules(model) -> None:
    """Zero points all zero and INT8/INT4; scales constant and > 0."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    values = inits | consts
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        scale = values.get(node.input[1])
        if scale is None or not np.all(scale > 0):
            raise QvitError(f"{node.name}: scale must be a positive constant for TensorRT")
        if len(node.input) < 3 or node.input[2] not in values or np.any(values[node.input[2]] != 0):
            raise QvitError(f"{node.name}: zero point must be an explicit constant 0 for TensorRT")


def finalize(model, torch_model, options, opset: int, metadata: dict):
    """Name nodes, apply the precision, set opset and metadata, and check the result."""
    import onnx

    from . import __version__

    _name_nodes(model)
    cfg = getattr(torch_model, "qvit_config", None)
    if options.precision == "int4":
        _to_int4(model, lambda layer: cfg is not None and cfg.is_edge(layer))
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    model.producer_name, model.producer_version = "qvit-export", __version__
    model.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    props = {"qvit_export_version": __version__, "precision": options.precision, "dtype": options.dtype,
             "opset": str(opset), "quant_config": json.dumps(cfg.to_dict() if cfg else None, sort_keys=True)}
    props |= {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    del model.metadata_props[:]
    for key in sorted(props):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=props[key]))
    check_tensorrt_rules(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def save_atomic(model, path) -> Path:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def simplify(model):
    """onnxsim, guarded: the number of QuantizeLinear/DequantizeLinear nodes must not change."""
    import onnxsim

    before = qdq_counts(model)
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise QvitError("onnxsim could not validate the simplified graph: export with --no-simplify")
    after = qdq_counts(simplified)
    if after != before:
        raise QvitError(f"onnxsim changed the QDQ nodes ({dict(before)} → {dict(after)}): export with --no-simplify")
    return simplified
