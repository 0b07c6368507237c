"""Surgery and inspection on the exported ONNX graph (onnx protos only; no torch).

- names every Clip/QuantizeLinear/DequantizeLinear after the quantizer it belongs to, which the export route
  tagged it with (OWNER_KEY, onnx_routes), and every MatMul/Conv that a quantized layer computes after that layer
  (prepare), so TensorRT's kernels can be traced back to it;
- rewrites ≤4-bit MatMul weights as INT4 initializers in blocks of 64 or 128 along K (our per-channel step
  repeated per block, so the values are unchanged);
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
# The node metadata key that carries the PyTorch module a node belongs to (a quantizer for Clip/Q/DQ, a layer for a
# weight-only Conv) from the export route to prepare(), which names the node after it and removes the key.
OWNER_KEY = "qvit.owner"


def qdq_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type in QDQ_OPS)


def _owner(node) -> str | None:
    """The quantizer a Clip/QuantizeLinear/DequantizeLinear belongs to, from the name prepare() gave it."""
    head, _, op = node.name.rpartition("/")
    return head if head and op == node.op_type else None


def quantize_outputs(model) -> dict[str, str]:
    """{quantizer name: output tensor of its QuantizeLinear} for the activation quantizers."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            name = _owner(node)
            if name is None:
                raise QvitError(f"QuantizeLinear '{node.name}' belongs to no quantizer: export the model again")
            found[name] = node.output[0]
    return found


def weight_initializers(model) -> dict[str, np.ndarray]:
    """{weight quantizer name: integer codes as stored} for every weight DequantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    return {_owner(node): numpy_helper.to_array(inits[node.input[0]]) for node in model.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and _owner(node)}


COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
# The two attention matmuls, named after the quantizer whose DQ reaches them (q·kᵀ: q's; attn·v: the softmax's).
ATTENTION_MATMULS = {"q_quantizer": "scores", "attn_quantizer": "context"}


def _users(model) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _name_compute_nodes(model) -> None:
    """'<layer>/MatMul' (or /Conv, /Gemm) for the op a weight DQ feeds; '<attn>/scores' for q·kᵀ and
    '<attn>/context' for attn·v. Names we set, so nothing downstream depends on an exporter's naming habits."""
    users = _users(model)
    for node in list(model.graph.node):
        owner = _owner(node) if node.op_type == "DequantizeLinear" else None
        if owner is None:
            continue
        base, _, role = owner.rpartition(".")
        compute = [u for u in users.get(node.output[0], []) if u.op_type in COMPUTE_OPS]
        if len(compute) != 1:
            continue
        if role == "weight_quantizer":
            compute[0].name = f"{base}/{compute[0].op_type}"
        elif role in ATTENTION_MATMULS:
            compute[0].name = f"{base}/{ATTENTION_MATMULS[role]}"


def quantized_ops(model) -> list[dict]:
    """Every quantized computation in the graph, in graph order: {'layer', 'node', 'op', 'weight_dq', 'input_dq',
    'weight_dtype'}. 'layer' is the PyTorch module ('blocks.0.mlp.fc1') or, for attention, '<attn>.scores' /
    '<attn>.context'; 'input_dq' lists the activation DequantizeLinear nodes feeding it."""
    from onnx import TensorProto

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    ops = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or "/" not in node.name:
            continue
        layer, _, kind = node.name.rpartition("/")
        if layer.startswith("/") or kind not in (node.op_type, *ATTENTION_MATMULS.values()):
            continue  # an exporter's name ('/blocks/blocks.0/attn/MatMul'), not one of ours
        dqs = [producers[i] for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
        weight = [d for d in dqs if d.input[0] in inits]
        if not dqs and not (len(node.input) > 1 and node.input[1] in inits):
            continue
        stored = inits[weight[0].input[0]] if weight else inits.get(node.input[1])
        layer = layer if kind == node.op_type else f"{layer}.{kind}"
        entry = {"layer": layer, "node": node.name, "op": node.op_type,
                 "weight_dq": weight[0].name if weight else None,
                 "input_dq": [d.name for d in dqs if d.input[0] not in inits],
                 "weight_dtype": TensorProto.DataType.Name(stored.data_type).lower() if stored is not None else None}
        ops.append(entry)
    return ops


def tag(node, owner: str) -> None:
    """Mark ``node`` as belonging to the PyTorch module ``owner`` (OWNER_KEY)."""
    from onnx import StringStringEntryProto

    node.metadata_props.append(StringStringEntryProto(key=OWNER_KEY, value=owner))


def tagged_owner(node) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == OWNER_KEY), None)


def prepare(model) -> None:
    """Right after an export route: name every tagged node after its owner ('<quantizer>/QuantizeLinear',
    '<layer>/Conv'), drop every node's metadata (an exporter's stack traces and paths have no place in the file),
    then name every quantized MatMul/Conv after its layer (_name_compute_nodes). Node names survive onnxsim, which
    merges equal initializers, so they are what ties the graph to PyTorch modules from here on."""
    for node in model.graph.node:
        owner = tagged_owner(node)
        if owner is not None:
            node.name = f"{owner}/{node.op_type}"
        del node.metadata_props[:]
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer):
        del info.metadata_props[:]
    del model.graph.metadata_props[:]
    missing = [n.name for n in model.graph.node if n.op_type in QDQ_OPS and _owner(n) is None]
    if missing:
        raise QvitError(f"QDQ node '{missing[0]}' belongs to no quantizer: export the model again")
    _name_compute_nodes(model)


def _prune_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _to_int4(model, scales: dict, block: int) -> None:
    """INT8 weight codes of the MatMul layers named in ``scales`` → INT4 initializers, block quantized along K (axis
    0 of the stored [K, N] weight) with ``block`` rows per scale; ``scales``: {layer: [K / block, N]}, what its
    quantizer gives (LSQQuantizer.block_scale), so every dequantized value is the one PyTorch computes."""
    import onnx
    from onnx import helper, numpy_helper

    wanted = {f"{layer}.weight_quantizer" for layer in scales}
    inits = {i.name: i for i in model.graph.initializer}
    users = _users(model)
    done = set()
    for node in model.graph.node:
        owner = _owner(node) if node.op_type == "DequantizeLinear" else None
        if owner not in wanted or node.input[0] not in inits:
            continue
        if [u.op_type for u in users.get(node.output[0], [])] != ["MatMul"]:
            continue
        layer = owner[: -len(".weight_quantizer")]
        codes = numpy_helper.to_array(inits[node.input[0]])
        k, n = codes.shape
        scale = scales[layer].astype(numpy_helper.to_array(inits[node.input[1]]).dtype)  # the graph's scale dtype
        # Fresh initializers: the INT8 ones may be shared with other nodes after onnxsim (pruned below if not).
        for index, suffix, tensor in (
                (0, "codes", helper.make_tensor("", onnx.TensorProto.INT4, [k, n], codes.flatten().tolist())),
                (1, "scale", numpy_helper.from_array(np.ascontiguousarray(scale))),
                (2, "zero", helper.make_tensor("", onnx.TensorProto.INT4, [k // block, n], [0] * (k // block * n)))):
            tensor.name = f"{layer}.weight_{suffix}_int4"
            model.graph.initializer.append(tensor)
            node.input[index] = tensor.name
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        done.add(owner)
    if done != wanted:
        raise QvitError(f"no INT4-ready MatMul weight for {sorted(wanted - done)[:3]}: export with --precision int8")
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


def lower_opset(model, opset: int):
    """``model`` at ``opset`` when it was written at a higher one (the dynamo route writes >= 18), through ONNX's
    version converter, which keeps node names; else ``model`` as it is. The converter has no way down for opset 18's
    Pad and Split: Pads that pad nothing (Swin's window padding at a multiple of the window; onnxsim removes them too)
    are bypassed first, and each Split (EVA's gated MLP cuts fc1's output in two) becomes one Slice per output."""
    from onnx import version_converter

    written = max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if written <= opset:
        return model
    _bypass_noop_pads(model)
    if opset < 18:
        _splits_as_slices(model)
    for node in model.graph.node:  # opset 18's default, which the converter's ReduceMean adapter does not remove
        if node.op_type.startswith("Reduce"):
            keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(keep)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises C++ assertion messages of several kinds
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].rpartition("failed: ")[2]
        raise QvitError(f"ONNX's version converter cannot take this graph from opset {written} to {opset} ({reason}): "
                        f"export with --opset {written}, or with --exporter torchscript") from None


def _bypass_noop_pads(model) -> None:
    """Remove every Pad whose pads are a constant of zeros, its readers reading its input instead."""
    from onnx import numpy_helper

    values = {i.name: i for i in model.graph.initializer}
    values |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    graph_outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type != "Pad" or len(node.input) < 2 or node.input[1] not in values \
                or node.output[0] in graph_outputs or np.any(numpy_helper.to_array(values[node.input[1]]) != 0):
            continue
        for reader in model.graph.node:
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = node.input[0]
        model.graph.node.remove(node)


def _splits_as_slices(model) -> None:
    """Replace every Split by one Slice per output (the same values; Slice reads alike from opset 13 to 21). The
    sizes come from Split's constant ``split`` input, or from ``num_outputs`` and the inferred length of the axis
    (opset 18: chunks of ceil(length / num_outputs), the last one shorter)."""
    from onnx import helper, numpy_helper, shape_inference

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    if not splits:
        return
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    for node in splits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = shapes.get(node.input[0])
        axis = attrs.get("axis", 0) + (len(shape) if shape and attrs.get("axis", 0) < 0 else 0)
        if len(node.input) > 1 and node.input[1]:
            sizes = values.get(node.input[1])
        else:
            length = shape[axis] if shape and axis < len(shape) else None
            chunk = -(-length // attrs["num_outputs"]) if length else None
            sizes = None if chunk is None else [min(chunk, length - i * chunk) for i in range(attrs["num_outputs"])]
        if sizes is None:
            raise QvitError(f"{node.name or 'a Split'}: its sizes are not constant, so the graph cannot be written "
                            "below opset 18: export with --opset 18")
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        start = 0
        for i, (size, out) in enumerate(zip((int(v) for v in sizes), node.output)):
            names = [f"{node.name}/slice{i}/{part}" for part in ("starts", "ends", "axes")]
            for name, value in zip(names, (start, start + size, axis)):
                model.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            model.graph.node.insert(index + i, helper.make_node("Slice", [node.input[0], *names], [out],
                                                                name=f"{node.name}/slice{i}"))
            start += size


# ONNX metadata values come partly from the checkpoint (its recipe, metrics, calibration record): each is checked
# to be plain, finite data of bounded size before it is written (the largest we write, a training run's recipe, is
# about 2 KB).
MAX_METADATA_NODES = 10_000
MAX_METADATA_CHARS = 256 << 10


def _metadata_value(key: str, value) -> str:
    from .untrusted import plain_data

    plain_data(value, f"ONNX metadata {key!r}", max_nodes=MAX_METADATA_NODES, max_chars=MAX_METADATA_CHARS)
    try:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:  # keys of mixed types cannot be sorted; deep nesting
        raise QvitError(f"ONNX metadata {key!r} is not JSON ({str(e)[:80]}): the checkpoint's records are "
                        "damaged") from None
    if len(text) > MAX_METADATA_CHARS:
        raise QvitError(f"ONNX metadata {key!r} would be {len(text):,} characters, more than {MAX_METADATA_CHARS:,}: "
                        "the checkpoint's records are too large")
    return text


def finalize(model, torch_model, options, opset: int, metadata: dict, int4: list[str] = ()):
    """Apply the precision (``int4``: the layers whose weights become INT4 blocks), set opset and metadata, and
    check the result (nodes were named by prepare)."""
    import onnx

    from . import __version__

    cfg = getattr(torch_model, "qvit_config", None)
    if options.int4:
        layers = {name: torch_model.get_submodule(name) for name in int4}
        _to_int4(model, {name: m.weight_quantizer.block_scale(m.in_features, options.int4_block).numpy()
                         for name, m in layers.items()}, options.int4_block)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    model.producer_name, model.producer_version = "qvit-export", __version__
    model.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    props = {"qvit_export_version": __version__, "precision": options.precision, "dtype": options.dtype,
             "opset": str(opset), "quant_config": json.dumps(cfg.to_dict() if cfg else None, sort_keys=True)}
    props |= {str(k): _metadata_value(str(k), v) for k, v in metadata.items()}
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


def simplify(model, decomposed_layernorm: bool = False):
    """onnxsim, guarded: the number of QuantizeLinear/DequantizeLinear nodes must not change, and a LayerNorm
    written out for TensorRT 8.5 must not be fused back into LayerNormalization."""
    import onnxsim

    before = qdq_counts(model)
    skipped = ["fuse_layer_norm"] if decomposed_layernorm else None
    simplified, ok = onnxsim.simplify(model, skipped_optimizers=skipped)
    if not ok:
        raise QvitError("onnxsim could not validate the simplified graph: export with --no-simplify")
    after = qdq_counts(simplified)
    if after != before:
        raise QvitError(f"onnxsim changed the QDQ nodes ({dict(before)} → {dict(after)}): export with --no-simplify")
    if decomposed_layernorm and any(n.op_type == "LayerNormalization" for n in simplified.graph.node):
        raise QvitError("onnxsim fused LayerNorm back together: export with --no-simplify --decompose-layernorm")
    return simplified
