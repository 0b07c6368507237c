"""What TensorRT built, read back: every kernel of an engine, traced to the quantized PyTorch layer it computes.

Plain Python on text and JSON (no TensorRT, no torch): ``engine.py`` hands over what the builder printed.

Sources of the kernel list (docs/design.md, "Reading what TensorRT built, without a GPU"):
- TensorRT-RTX / TensorRT built with ``ProfilingVerbosity.DETAILED`` and a VERBOSE logger print one message that
  starts with ``Layers:``; each line names a kernel, its LayerType, its runtime inputs, its constants and its
  outputs with their datatypes, and the ONNX nodes it covers (``[ONNX Layer: name]``) (``parse_layer_listing``);
- on a GPU, ``IEngineInspector`` returns the same as JSON (``parse_inspector_json``).

The quantized computations come from the ONNX graph (``onnx_graph.quantized_ops``): each quantized Linear/Conv
and, per attention block, q·kᵀ (``<attn>.scores``) and attn·v (``<attn>.context``), with the names of the nodes
that compute them and of the DequantizeLinear nodes that feed them. ``analyze`` places each one:
- its *compute kernel*: the first GEMM/convolution-like kernel whose metadata holds the layer's ONNX node;
- its kind, from the datatypes that kernel reads: ``int8`` (activation and weight both Int8), ``int4-weight``
  (an Int4 constant dequantized inside the GEMM), ``int8-weight`` (an Int8 constant under a float activation:
  weight-only INT8), ``float`` (Half/Float operands only: the quantization was dropped);
- its *helper kernels*: kernels with no runtime input that read the layer's constant weight and exist only for
  it (an Int4→Int8 cast, a separate dequantization): work done on every inference that a fused GEMM does not do.

In the summary, ``quantized_layers`` counts layers (each quantized Linear/Conv once, and per attention its two
matmuls), one ONNX GEMM each; ``int8_gemms``, ``int4_weight_gemms``, ``float_gemms``, ``weight_casts`` and
``unmatched`` count them by kind (and their helpers); ``kernels`` counts the engine's kernels, not its cross-stream
events.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

SUMMARY_KEYS = ("kernels", "quantized_layers", "int8_gemms", "int4_weight_gemms", "float_gemms", "weight_casts",
                "unmatched")
INTEGER = ("Int8", "Int4")
# LayerType words of kernels that do a layer's multiply-accumulate (TensorRT-RTX: gemm, correlation for a Conv,
# runtime_fusion for a GEMM with its weight dequantization fused; TensorRT 10.x: Cask* names, Myelin mha).
_COMPUTE_WORDS = ("gemm", "matmul", "matrixmultiply", "conv", "correlation", "runtime_fusion", "mha", "attention",
                  "fullyconnected")
_DTYPE_WORDS = {"int8": "Int8", "int4": "Int4", "half": "Half", "fp16": "Half", "float": "Float", "fp32": "Float",
                "bf16": "BFloat16", "bfloat16": "BFloat16", "fp8": "FP8", "int32": "Int32", "int64": "Int64",
                "bool": "Bool"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= max(d, 1)
        return n


@dataclass(frozen=True)
class Kernel:
    name: str
    layer_type: str
    inputs: tuple[Tensor, ...]
    constants: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    tactic: str
    onnx_nodes: tuple[str, ...]

    @property
    def computes(self) -> bool:
        """A GEMM or convolution: by its LayerType, or a Myelin kernel whose fused op list holds ``Fc``
        (``__myl_FcAdd_myl0_5``: a fully connected layer and its bias add)."""
        kind = self.layer_type.lower()
        fused_ops = re.findall(r"[A-Z][a-z]*", self.name.removeprefix("__myl_").split("_myl")[0])
        return any(w in kind for w in _COMPUTE_WORDS) or "Fc" in fused_ops or self.fused_attention

    @property
    def fused_attention(self) -> bool:
        """One kernel for a whole attention (q·kᵀ, softmax and ·v, no N×N tensor in memory): TensorRT-RTX lists it
        as a ``kgen`` kernel named ``_gemm_mha_v2…``; TensorRT 10.x's Myelin names it ``…mha…`` too."""
        return "mha" in self.name.lower() or "mha" in self.tactic.lower()

    @property
    def shape_only(self) -> bool:
        return self.layer_type.lower() == "shape_call"

    @property
    def event(self) -> bool:
        """A cross-stream ``signal`` or ``wait`` (listed with an ``EventId``), not a kernel: TensorRT-RTX 1.7 ran
        independent GEMMs on several streams (measured: q, k, v as three MatMuls under float activations)."""
        return self.layer_type.lower() in ("signal", "wait")


# ---- reading ---------------------------------------------------------------------------------------

_LINE = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), Inputs: \[(?P<inputs>.*?)\], "
                   r"Constants: \[(?P<constants>.*?)\], Outputs: \[(?P<outputs>.*?)\], TacticName: (?P<tactic>.*?), "
                   r"StreamId: \S*, (?:EventId: \S*, )?Metadata: (?P<meta>.*)$")
_TENSOR = re.compile(r"\{ Name: (?P<name>.*?), Dimensions: \[(?P<dims>[^\]]*)\].*?Datatype: (?P<dtype>\w+)")
_ONNX_NODE = re.compile(r"\[ONNX Layer: (.*?)\]")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d.strip().lstrip("-").isdigit())


def _tensors(text: str) -> tuple[Tensor, ...]:
    return tuple(Tensor(m["name"], _dims(m["dims"]), m["dtype"]) for m in _TENSOR.finditer(text))


def find_layer_listing(messages) -> str | None:
    """The builder's ``Layers:`` message among the logger's messages (the last one, if several)."""
    found = None
    for msg in messages:
        if msg.startswith("Layers:"):
            found = msg
    return found


def parse_layer_listing(text: str) -> list[Kernel]:
    """Kernels from a ``Layers:`` message (up to its ``I/O Tensors:`` part). A line that starts like a kernel
    but does not parse raises ValueError: a silent skip would hide a kernel from the anatomy."""
    kernels = []
    for line in text.splitlines():
        if line.startswith("I/O Tensors:"):
            break
        if not line.startswith("Name: "):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"unreadable kernel line: {line[:120]}")
        kernels.append(Kernel(m["name"], m["type"].strip(), _tensors(m["inputs"]), _tensors(m["constants"]),
                              _tensors(m["outputs"]), m["tactic"].strip(), tuple(_ONNX_NODE.findall(m["meta"]))))
    return kernels


def _dtype_from_text(text: str) -> str:
    for word in re.findall(r"[A-Za-z0-9]+", text or ""):
        if word.lower() in _DTYPE_WORDS:
            return _DTYPE_WORDS[word.lower()]
    return "Unknown"


def _json_tensor(entry) -> Tensor:
    if isinstance(entry, str):  # older inspectors list bare names
        return Tensor(entry, (), "Unknown")
    dtype = entry.get("Datatype") or _dtype_from_text(entry.get("Format/Datatype", ""))
    return Tensor(str(entry.get("Name", "")), tuple(int(d) for d in entry.get("Dimensions", []) if isinstance(d, int)),
                  _dtype_from_text(dtype) if dtype not in _DTYPE_WORDS.values() else dtype)


def parse_inspector_json(info: dict | str) -> list[Kernel]:
    """Kernels from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (TensorRT 10.x/11.x)."""
    if isinstance(info, str):
        info = json.loads(info)
    kernels = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):
            kernels.append(Kernel(layer, "", (), (), (), "", ()))
            continue
        meta = layer.get("Metadata", "") or ""
        kernels.append(Kernel(
            str(layer.get("Name", "")), str(layer.get("LayerType", "")),
            tuple(_json_tensor(t) for t in layer.get("Inputs", [])),
            tuple(_json_tensor(t) for t in layer.get("Constants", layer.get("Weights", [])) if isinstance(t, dict)),
            tuple(_json_tensor(t) for t in layer.get("Outputs", [])), str(layer.get("TacticName", "")),
            tuple(_ONNX_NODE.findall(meta)) if isinstance(meta, str) else ()))
    return kernels


# ---- placing each quantized layer ------------------------------------------------------------------

@dataclass
class LayerAnatomy:
    layer: str
    onnx_node: str
    kind: str                       # int8 | int4-weight | int8-weight | float | unmatched
    kernel: str | None = None
    layer_type: str | None = None
    input_dtypes: list[str] = field(default_factory=list)
    weight_dtype: str | None = None  # as the compute kernel reads it (None for attention matmuls)
    input_dq_fused: bool = False    # the activation DQ nodes are inside the compute kernel, which reads Int8
    weight_dq_fused: bool = False   # the weight reaches the compute kernel as an integer constant
    input_q_kernels: list[str] = field(default_factory=list)  # the kernels that compute its input Q
    helpers: list[str] = field(default_factory=list)  # per-inference conversions of its constant weight
    reason: str | None = None       # why a layer is not an INT8×INT8 GEMM, where the export chose that


def _operand_dtypes(k: Kernel) -> tuple[list[str], list[Tensor]]:
    """(runtime input dtypes, weight-like constants): scalars (alpha, beta) and per-channel vectors are left out."""
    weights = [c for c in k.constants if len([d for d in c.dims if d > 1]) >= 2]
    return [t.dtype for t in k.inputs], weights


def _classify(k: Kernel) -> tuple[str, str | None]:
    inputs, weights = _operand_dtypes(k)
    wdtypes = [w.dtype for w in weights]
    if "Int4" in wdtypes:
        return "int4-weight", "Int4"
    integer_inputs = [d for d in inputs if d in INTEGER]
    if integer_inputs and len(integer_inputs) == len(inputs) and (len(integer_inputs) >= 2 or "Int8" in wdtypes):
        return "int8", "Int8" if "Int8" in wdtypes or len(integer_inputs) >= 2 else None
    if "Int8" in wdtypes:
        return "int8-weight", "Int8"
    return "float", (wdtypes[0] if wdtypes else None)


def export_reasons(metadata: dict[str, str]) -> dict[str, str]:
    """{layer: why it is not an INT8×INT8 GEMM by the export's choice}, from the ONNX metadata the exporter wrote
    (``int8_weight_layers``: INT8 weights in an INT4 graph; ``float_weight_layers``: weights stored dequantized)."""
    reasons = {layer: f"INT8 weights: {why}" for layer, why in json.loads(metadata.get("int8_weight_layers", "{}")).items()}
    return reasons | json.loads(metadata.get("float_weight_layers", "{}"))


def analyze(kernels: list[Kernel], ops: list[dict], reasons: dict[str, str] | None = None) -> dict:
    """The anatomy: {'summary': {SUMMARY_KEYS}, 'layers': [one entry per GEMM], 'kernel_types': {...}}.

    ``ops``: ``onnx_graph.quantized_ops`` of the ONNX that was built. ``reasons``: {layer: why} for layers the
    export deliberately left off INT8×INT8 (an 8-bit edge layer in a weight-only graph, a K that is no
    multiple of the INT4 block); they are reported with the reason, not hidden.
    """
    reasons = reasons or {}
    layers = []
    claimed: set[str] = set()
    for op in ops:
        nodes = {op["node"]} | ({op["weight_dq"]} if op["weight_dq"] else set())
        mine = [k for k in kernels if op["node"] in k.onnx_nodes]
        compute = next((k for k in mine if k.computes), None)
        entry = LayerAnatomy(op["layer"], op["node"], "unmatched", reason=reasons.get(op["layer"]))
        if compute is not None:
            entry.kind, entry.weight_dtype = _classify(compute)
            entry.kernel, entry.layer_type = compute.name, compute.layer_type
            entry.input_dtypes = [t.dtype for t in compute.inputs]
            entry.input_dq_fused = bool(op["input_dq"]) and all(d in compute.onnx_nodes for d in op["input_dq"]) \
                and all(t.dtype in INTEGER for t in compute.inputs)
            if not op["weight_dq"]:
                entry.weight_dtype = None  # an attention matmul: two activations
            entry.weight_dq_fused = bool(op["weight_dq"]) and op["weight_dq"] in compute.onnx_nodes \
                and any(w.dtype in INTEGER for w in _operand_dtypes(compute)[1])
            quantize_nodes = {d.replace("/DequantizeLinear", "/QuantizeLinear") for d in op["input_dq"]}
            entry.input_q_kernels = [k.name for k in kernels if quantize_nodes & set(k.onnx_nodes)
                                     and any(t.dtype in INTEGER for t in k.outputs)]
            if op["weight_dq"]:
                entry.helpers = [k.name for k in kernels if k is not compute and not k.shape_only and not k.inputs
                                 and k.constants and k.outputs and nodes & set(k.onnx_nodes)
                                 and k.name not in claimed]
                claimed.update(entry.helpers)
                if entry.helpers:
                    entry.weight_dq_fused = False
        layers.append(entry)
    types: dict[str, int] = {}
    for k in kernels:
        types[k.layer_type] = types.get(k.layer_type, 0) + 1
    summary = {
        "kernels": sum(1 for k in kernels if not (k.shape_only or k.event)),
        "quantized_layers": len(layers),
        "int8_gemms": sum(1 for e in layers if e.kind == "int8"),
        "int4_weight_gemms": sum(1 for e in layers if e.kind == "int4-weight"),
        "float_gemms": sum(1 for e in layers if e.kind == "float"),
        "weight_casts": sum(len(e.helpers) for e in layers),
        "unmatched": sum(1 for e in layers if e.kind == "unmatched"),
    }
    return {"summary": summary, "int8_weight_gemms": sum(1 for e in layers if e.kind == "int8-weight"),
            "attention": attention_fusion(layers, kernels),
            "stream_events": sum(1 for k in kernels if k.event),
            "layers": [asdict(e) for e in layers], "kernel_types": dict(sorted(types.items()))}


def attention_fusion(layers: list[LayerAnatomy], kernels: list[Kernel]) -> dict:
    """{'blocks': attention blocks, 'fused': those whose q·kᵀ and attn·v run in one fused attention kernel,
    'unfused': the names of the others}."""
    by_layer = {e.layer: e for e in layers}
    fused_kernels = {k.name for k in kernels if k.fused_attention}
    blocks = [e.layer.removesuffix(".scores") for e in layers if e.layer.endswith(".scores")]
    fused = [b for b in blocks if (ctx := by_layer.get(f"{b}.context")) is not None
             and by_layer[f"{b}.scores"].kernel == ctx.kernel and ctx.kernel in fused_kernels]
    return {"blocks": len(blocks), "fused": len(fused), "unfused": [b for b in blocks if b not in fused]}


def summary_line(anatomy: dict) -> str:
    """One line for the terminal: what runs per inference."""
    s = anatomy["summary"]
    extra = f", {anatomy['int8_weight_gemms']} int8-weight" if anatomy.get("int8_weight_gemms") else ""
    attention = anatomy.get("attention") or {}
    fused = f"; {attention['fused']}/{attention['blocks']} attention blocks fused" if attention.get("blocks") else ""
    return (f"anatomy: {s['kernels']} kernels; {s['quantized_layers']} quantized layers -> {s['int8_gemms']} int8 GEMMs, "
            f"{s['int4_weight_gemms']} int4-weight GEMMs{extra}, {s['float_gemms']} float GEMMs, "
            f"{s['weight_casts']} per-inference weight casts, {s['unmatched']} unmatched{fused}")


def float_gemm_layers(anatomy: dict) -> list[dict]:
    """The GEMMs that run in float and whose export did not choose that."""
    return [e for e in anatomy["layers"] if e["kind"] == "float" and not e["reason"]]
