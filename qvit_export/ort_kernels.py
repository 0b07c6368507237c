"""What ONNX Runtime's CPU provider runs for each quantized layer of an exported graph (the ORT counterpart of
anatomy.py, which reads TensorRT's kernels).

ONNX Runtime rewrites QDQ patterns into integer kernels while it optimises a session (ORT_ENABLE_ALL): a quantized
MatMul whose activation and weight arrive through DequantizeLinear becomes ``MatMulIntegerToFloat`` (float output)
or ``QLinearMatMul`` (quantized output), a Conv ``QLinearConv``. A pattern it does not recognise stays a float op on
dequantized values, and the graph runs slower than the float model it replaces: the qkv of 2026-12-01, three MatMuls
on one shared QuantizeLinear, kept 36 float MatMuls in deit_small (ORT 1.32 converts a Q→DQ pair to the unsigned
form its x86 kernels need only where the Q has a single consumer). ``optimized_model_filepath`` writes the graph ORT
will run; the layers are found in it by the node names the exporter set (onnx_graph.quantized_ops), which ORT's
fusions keep.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QLinearConv", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul", "MatMulNBits", "QAttention")
FLOAT_COMPUTE = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "FusedGemm")


def optimized_graph(onnx_path, optimization: str = "ORT_ENABLE_ALL", config: dict[str, str] | None = None):
    """The ModelProto that an ONNX Runtime CPU session at ``optimization`` runs (session ``config`` entries, e.g.
    ``session.qdq_matmulnbits_accuracy_level``, apply)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # its warning that the file is for this machine only: we only read it
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def layer_kernels(onnx_path, optimization: str = "ORT_ENABLE_ALL", config: dict[str, str] | None = None) -> dict:
    """{'layers': {quantized layer: the op ORT runs for it}, 'integer': [...], 'float': [...], 'missing': [...],
    'ops': {op type: count} of the optimised graph}. A layer is ``missing`` when no node of the optimised graph
    carries its name (a fusion that renamed it)."""
    import onnx

    from .onnx_graph import quantized_ops

    ops = quantized_ops(onnx.load(str(onnx_path)))
    optimized = optimized_graph(onnx_path, optimization, config)
    by_name = {n.name: n.op_type for n in optimized.graph.node}
    layers = {op["layer"]: by_name.get(op["node"]) for op in ops}
    return {"layers": layers,
            "integer": [k for k, v in layers.items() if v in INTEGER_KERNELS],
            "float": [k for k, v in layers.items() if v is not None and v not in INTEGER_KERNELS],
            "missing": [k for k, v in layers.items() if v is None],
            "ops": dict(sorted(Counter(n.op_type for n in optimized.graph.node).items()))}
