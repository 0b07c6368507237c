"""How the export twin becomes an ONNX graph: one class per PyTorch exporter, registered by name (ROUTES).

A route traces the twin (onnx_export.export_twin) and returns a ModelProto in which every Clip, QuantizeLinear and
DequantizeLinear carries the name of the PyTorch quantizer it belongs to, and a weight-only Conv its layer's, as
node metadata (onnx_graph.OWNER_KEY); onnx_graph.prepare names the nodes from that and nothing else. A new
exporter is one class here with ``@register_route``.

- ``dynamo`` (the default): ``torch.onnx.export(dynamo=True)``, torch.export underneath. The twin writes its
  Clip/Q/DQ nodes itself through ``torch.onnx.ops.symbolic`` with the tag, at the requested opset; no translation
  table stands between our quantizer and the node (onnxscript's translation of PyTorch's quantize ops ignores
  quant_min/quant_max, which would drop the Clip of every sub-8-bit activation).
- ``torchscript``: PyTorch's TorchScript exporter (``dynamo=False``), deprecated since torch 2.9, kept while PyTorch
  ships it. It stops at opset 20 (onnx_graph.finalize raises the version for INT4, whose nodes it does not
  change), writes the twin's ``autograd.Function.symbolic`` nodes and names initializers after the buffers they
  hold, which is what its tags are read from.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING

from .errors import QvitError

if TYPE_CHECKING:  # torch is imported when a route traces: the command line reads ROUTES without it
    import torch
    from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"
ROUTES: dict[str, "Route"] = {}
DEFAULT_ROUTE = "dynamo"


def register_route(cls):
    ROUTES[cls.name] = cls()
    return cls


def route(name: str) -> "Route":
    try:
        return ROUTES[name]
    except KeyError:
        raise QvitError(f"exporter {name!r} is unknown: choose one of {', '.join(ROUTES)}") from None


class Route:
    """Trace ``twin`` on ``dummy`` into a ModelProto at ``opset`` with tagged quantizer nodes."""

    name = ""

    def trace(self, twin: nn.Module, dummy: torch.Tensor, opset: int, dynamic_batch: bool):
        raise NotImplementedError


@register_route
class DynamoRoute(Route):
    """torch.export, then PyTorch's ONNX translation and its optimizer (which folds no QDQ node: the counts are
    checked by every export test). torch writes opset 18 and up; a lower one is reached after onnxsim
    (onnx_graph.lower_opset), when the graph has lost the no-op Pads that the converter cannot take down."""

    name = "dynamo"
    NATIVE_MIN_OPSET = 18

    def trace(self, twin, dummy, opset, dynamic_batch):
        import torch

        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(twin, (dummy,), None, dynamo=True,
                                        opset_version=max(opset, self.NATIVE_MIN_OPSET),
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=shapes, optimize=True, verbose=False, report=False)
        return program.model_proto


TORCHSCRIPT_MAX_OPSET = 20


@register_route
class TorchScriptRoute(Route):
    """The deprecated TorchScript exporter. It shares equal initializers through Identity nodes (undone here, so
    every QDQ node reads its own scale) and names initializers after the twin's buffers: a QDQ node's owner is the
    buffer name of the scale it reads ('<quantizer>.scale', '<layer>.weight_scale'), a weight-only Conv's the name
    of its stored weight ('<layer>.weight_float')."""

    name = "torchscript"

    def trace(self, twin, dummy, opset, dynamic_batch):
        import onnx
        import torch

        dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
        raw = io.BytesIO()  # in memory: no scratch file that a killed run could leave behind
        with _quiet(), torch.no_grad():
            torch.onnx.export(twin, (dummy,), raw, dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic,
                              do_constant_folding=True)
        model = onnx.load_from_string(raw.getvalue())
        _unshare_constants(model)
        _tag_from_buffer_names(model)
        return model


def _unshare_constants(model) -> None:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            model.graph.initializer.append(copy)
            inits[copy.name] = copy
            model.graph.node.remove(node)


def _quantizer_of(scale_name: str) -> str | None:
    """'blocks.0.attn.q_quantizer.scale' → 'blocks.0.attn.q_quantizer';
    'blocks.0.mlp.fc1.weight_scale' → 'blocks.0.mlp.fc1.weight_quantizer'."""
    if scale_name.endswith(".weight_scale"):
        return scale_name[: -len("_scale")] + "_quantizer"
    if scale_name.endswith("_quantizer.scale"):
        return scale_name[: -len(".scale")]
    return None


def _tag_from_buffer_names(model) -> None:
    from .onnx_graph import QDQ_OPS, tag

    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in QDQ_OPS and (owner := _quantizer_of(node.input[1])) is not None:
            tag(node, owner)
            clip = producers.get(node.input[0])
            if node.op_type == "QuantizeLinear" and clip is not None and clip.op_type == "Clip":
                tag(clip, owner)
        elif node.op_type == "Conv" and len(node.input) > 1 and node.input[1].endswith(".weight_float"):
            tag(node, node.input[1][: -len(".weight_float")])


@contextlib.contextmanager
def _quiet():
    """Exporters print progress, log and warn (deprecation, version conversion); the commands' output is their
    own, and a command's refusal is one line."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._export")]
    levels = [log.level for log in loggers]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for log in loggers:
                log.setLevel(logging.ERROR)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
