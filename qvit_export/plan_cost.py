"""What a TensorRT plan costs per inference, read from its kernel listing: bytes moved, GEMM work, estimated ms.

Plain Python on anatomy.py's ``Kernel`` objects (no TensorRT, no torch): the plan needs no GPU to be costed.

The model (a roofline per kernel, summed; an *estimate*, not a timing):
- bytes: each kernel reads its runtime inputs and its constants and writes its outputs, all from/to DRAM, at the
  listed dims × the datatype's size (``DTYPE_BYTES``); constants are the plan's weights (GEMM weights, LayerNorm
  scales, position embeddings, scalars), read again by every kernel that lists them;
- work: only GEMM-like kernels (``Kernel.computes``: gemm, correlation/convolution, runtime_fusion, Myelin ``Fc``,
  fused attention) count multiply-accumulates, as ops = 2 · MACs, by the datatype the math runs in
  (``math_dtype``); elementwise and normalization kernels (kgen) count none: they are memory bound;
- time on a GPU profile: Σ over kernels of max(bytes ÷ DRAM bandwidth, ops ÷ dense peak of its math datatype),
  plus one launch cost per kernel (``estimate_ms``).

Limits, each of which makes the estimate differ from a timing:
- no cache reuse: a tensor written by one kernel and read by the next is counted twice at DRAM speed, although at
  batch 1 a ViT's activations (≤ 0.6 MB a tensor for deit_tiny) stay in L2 (72 MB on an RTX 4090);
- no overlap: kernels run one after the other (TensorRT-RTX 1.7 may run independent GEMMs on several streams);
- dense peaks from the vendors' documents: real GEMMs at batch 1 reach a fraction of them (tile quantization of
  M = 197 tokens, wave quantization over the SMs), so math-bound kernels are estimated too fast;
- one launch cost per kernel, the same for all kernels of a profile, assumed (see ``GpuProfile.launch_us``): with
  CUDA graphs the per-kernel gap is smaller;
- static shapes only: a listing built with a dynamic batch has -1 dimensions whose bytes no one can count
  (``has_unknown_dims``; ``kernel_cost`` refuses them).

Measured on a TensorRT-RTX 1.7 (SM89) listing of deit_tiny at batch 1: the qkv GEMM reads Int8 [1,197,192] and an
Int8 [1,192,576] weight and writes Half [1,197,576] (2·197·192·576 ops, Int8 math); the fused attention kernel
``_gemm_mha_v2`` (LayerType kgen) reads q [3,197,64], kᵀ [3,64,197] and v [3,197,64] in Int8 (2·2·3·197·197·64
ops); 138 kernels move 43.8 MB, of which 6.4 MB weights, and the 138 launches dominate every profile's estimate.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import QvitError

if TYPE_CHECKING:
    from .anatomy import Kernel, Tensor

# Bytes per element of each datatype word TensorRT prints (Int4 packs two elements a byte).
DTYPE_BYTES: dict[str, float] = {"Int4": 0.5, "Int8": 1, "FP8": 1, "Bool": 1, "UInt8": 1, "Half": 2, "BFloat16": 2,
                                 "Float": 4, "Int32": 4, "Int64": 8}
MB = 1e6  # megabyte as 10⁶ bytes, the unit of bandwidths in GB/s


# ---- GPU profiles ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuProfile:
    """One GPU as the cost model sees it: DRAM bandwidth, dense peak throughput per math datatype, launch cost.

    ``compute_capability``: the target TensorRT builds the plan as (``sm86`` for Jetson Orin, whose GPU is SM87:
    TensorRT-RTX builds for 7.5/8.6/8.9/12.0). ``int8_tops``: dense INT8 tensor TOPS (half the sparse figure that
    vendors headline). ``fp16_tflops``: dense FP16 tensor TFLOPS with the accumulation ``fp16_accumulate`` names
    (GeForce Ada and Blackwell run FP32 accumulation at half the FP16-accumulation rate: the figure used is the
    FP32 one, the slower). ``fp32_tflops``: non-tensor FP32 (a Float GEMM is counted there, not as TF32).
    ``launch_us``: the cost of each kernel launch. ``source``: the documents the figures come from."""

    name: str
    compute_capability: str
    bandwidth_gbs: float
    int8_tops: float
    fp16_tflops: float
    fp16_accumulate: str
    fp32_tflops: float
    launch_us: float
    source: str

    def peak_ops(self, math: str) -> float:
        """Dense peak in ops/s for a math datatype: FP8 at the INT8 rate (equal on Ada and Blackwell with FP16
        accumulation), BFloat16 at the FP16 rate (equal on Ampere and later)."""
        tera = {"Int8": self.int8_tops, "FP8": self.int8_tops, "Half": self.fp16_tflops,
                "BFloat16": self.fp16_tflops, "Float": self.fp32_tflops}.get(math)
        if tera is None:
            raise QvitError(f"GPU profile {self.name!r} has no peak for {math} math: add it to GpuProfile.peak_ops")
        return tera * 1e12

    def to_dict(self) -> dict:
        return asdict(self)


_DESKTOP_LAUNCH = ("launch 4 µs: a per-launch CPU cost of about 4-6 µs measured on an RTX 5070 Ti ('pegainfer (3): "
                   "From Launch Overhead to CUDA Graph'); 'a few microseconds' in 'Getting Started with CUDA Graphs' "
                   "(NVIDIA Technical Blog)")
_JETSON_LAUNCH = ("launch 10 µs: assumed, 2.5x the desktop figure for an Arm Cortex-A78AE host (no published figure "
                  "found; NVIDIA Developer Forums 'Question about inference using TensorRT API' shows TensorRT "
                  "inference on Orin bounded by CPU-side kernel launches)")

# One line each to add a GPU. Dense peaks: where a document gives only sparse figures, half of them.
GPU_PROFILES: dict[str, GpuProfile] = {
    "orin-nano": GpuProfile(
        "Jetson Orin Nano 8GB (Super, 25 W)", "sm86", 102.0, 33.5, 16.75, "not stated: derived as INT8 ÷ 2",
        2.09, 10.0,
        "NVIDIA Jetson Orin Nano Super Developer Kit data sheet: 67 sparse INT8 TOPS, 102 GB/s, 1024 CUDA cores at "
        "1020 MHz (FP32 = 1024 x 2 x 1.02 GHz; no FP16 figure published: INT8 ÷ 2, the Ampere tensor-core ratio); "
        + _JETSON_LAUNCH),
    "agx-orin": GpuProfile(
        "Jetson AGX Orin 64GB (MAXN)", "sm86", 204.8, 85.0, 42.5, "not stated: derived as INT8 ÷ 2", 5.3, 10.0,
        "NVIDIA Jetson AGX Orin Series Technical Brief v1.2: GPU 170 sparse INT8 TOPS (the 275 TOPS headline adds "
        "105 from the DLAs), 5.3 FP32 TFLOPS, 204.8 GB/s (no FP16 figure published: INT8 ÷ 2); " + _JETSON_LAUNCH),
    "rtx4090": GpuProfile(
        "GeForce RTX 4090", "sm89", 1008.0, 660.6, 165.2, "FP32", 82.6, 4.0,
        "NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090): 660.6 INT8 TOPS, 165.2 FP16 TFLOPS "
        "with FP32 accumulate (330.3 with FP16), 82.6 FP32 TFLOPS, 1008 GB/s; " + _DESKTOP_LAUNCH),
    "l4": GpuProfile(
        "NVIDIA L4", "sm89", 300.0, 242.5, 121.0, "not stated in the data sheet", 30.3, 4.0,
        "NVIDIA L4 Tensor Core GPU data sheet: 485 sparse INT8 TOPS, 242 sparse FP16 TFLOPS, 30.3 FP32 TFLOPS, "
        "300 GB/s; " + _DESKTOP_LAUNCH),
    "rtx5090": GpuProfile(
        "GeForce RTX 5090", "sm120", 1792.0, 838.0, 209.5, "FP32", 104.8, 4.0,
        "NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix A (GeForce RTX 5090): 838 INT8 TOPS, 209.5 FP16 "
        "TFLOPS with FP32 accumulate (419 with FP16), 104.8 FP32 TFLOPS, 1792 GB/s; " + _DESKTOP_LAUNCH),
    "t4": GpuProfile(
        "NVIDIA T4", "sm75", 320.0, 130.0, 65.0, "FP32 (mixed precision FP16/FP32)", 8.1, 4.0,
        "NVIDIA T4 Tensor Core GPU data sheet: 130 INT8 TOPS, 65 FP16/FP32 mixed-precision TFLOPS, 8.1 FP32 TFLOPS, "
        "320 GB/s; " + _DESKTOP_LAUNCH),
}


# ---- one kernel ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelCost:
    """What one kernel moves and computes. Byte maps are {datatype: bytes}; ``ops`` is {math datatype: 2·MACs}
    (empty for a memory-bound kernel); ``launches`` is 0 for shape calls and cross-stream events."""

    name: str
    layer_type: str
    input_bytes: dict[str, float]
    constant_bytes: dict[str, float]
    output_bytes: dict[str, float]
    ops: dict[str, int]
    fused_attention: bool = False
    launches: int = 1

    @property
    def bytes_read(self) -> float:
        return sum(self.input_bytes.values()) + sum(self.constant_bytes.values())

    @property
    def bytes_written(self) -> float:
        return sum(self.output_bytes.values())

    @property
    def total_bytes(self) -> float:
        return self.bytes_read + self.bytes_written


def tensor_bytes(t: Tensor, kernel: str = "?") -> float:
    """Bytes of one listed tensor; a -1 dimension or a datatype without a size is refused."""
    if any(d < 0 for d in t.dims):
        raise QvitError(f"kernel {kernel}: tensor {t.name} has dims {list(t.dims)} (a dynamic batch): its bytes are "
                        "unknown; build the plan at a static batch (--static-batch or --cost-batch N) to cost it")
    size = DTYPE_BYTES.get(t.dtype)
    if size is None:
        raise QvitError(f"kernel {kernel}: tensor {t.name} has datatype {t.dtype!r}, whose size plan_cost does not "
                        "know: add it to plan_cost.DTYPE_BYTES")
    return t.elements * size


def _by_dtype(tensors: Iterable[Tensor], kernel: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in tensors:
        out[t.dtype] = out.get(t.dtype, 0) + tensor_bytes(t, kernel)
    return out


def math_dtype(dtypes: Sequence[str], kernel: str = "?") -> str:
    """The datatype a GEMM's math runs in, from its operands' datatypes: Half if any is Half (an Int4 or Int8
    weight under a Half activation is weight-only quantization: dequantized, then FP16 math), else BFloat16, else
    Float; Int8 when all are integer (an Int4 weight under an Int8 activation runs in INT8 tensor cores); FP8 when
    all are FP8 or integer."""
    kinds = set(dtypes)
    for word in ("Half", "BFloat16", "Float"):
        if word in kinds:
            return word
    if kinds and kinds <= {"Int8", "Int4"}:
        return "Int8"
    if kinds and kinds <= {"FP8", "Int8", "Int4"}:
        return "FP8"
    raise QvitError(f"kernel {kernel} multiplies {sorted(kinds)}: plan_cost has no math datatype for them; add the "
                    "case to plan_cost.math_dtype")


def _last2(t: Tensor) -> tuple[int, int]:
    dims = t.dims or (1,)
    return (1, dims[0]) if len(dims) == 1 else (dims[-2], dims[-1])


def _contracted(a: Tensor, b: Tensor, out: Tensor) -> int | None:
    """K of out = a·b from the last two axes: a as [M,K] (or [K,M]), b as [K,N] (or [N,K]), out as [M,N]."""
    (a0, a1), (b0, b1), o = _last2(a), _last2(b), _last2(out)
    for m, ka in ((a0, a1), (a1, a0)):
        for kb, n in ((b0, b1), (b1, b0)):
            if ka == kb and (m, n) == o:
                return ka
    return None


def _weights(k: Kernel) -> list[Tensor]:
    """Constants that are matrices (≥ 2 dims above 1), largest first: the GEMM weight before its scales."""
    mats = [c for c in k.constants if sum(1 for d in c.dims if d > 1) >= 2]
    return sorted(mats, key=lambda c: -c.elements)


def _gemm_ops(k: Kernel) -> tuple[int, list[Tensor]]:
    """(2·MACs, the two operands) of a GEMM or convolution kernel. K is the dimension the two operands share and
    the output lacks, looked for in the weight constant's either orientation ([K,N] or [N,K]) and between two
    runtime inputs (batched [b,M,K]·[b,K,N], or a weight cast to Int8 by a kernel before it)."""
    if not k.outputs:
        raise QvitError(f"GEMM kernel {k.name} lists no output: plan_cost cannot size its work")
    out = k.outputs[0]
    kind = k.layer_type.lower()
    weights = _weights(k)
    if ("conv" in kind or "correlation" in kind) and weights and k.inputs:
        w = weights[0]  # [Cout, Cin/groups, kh, kw]: each output element is Cin/groups·kh·kw MACs
        return 2 * out.elements * (w.elements // max(w.dims[0], 1)), [k.inputs[0], w]
    pairs = [(a, w) for a in k.inputs for w in weights]
    pairs += [(a, b) for i, a in enumerate(k.inputs) for b in k.inputs[i + 1:]]
    for a, b in pairs:
        contracted = _contracted(a, b, out)
        if contracted is not None:
            return 2 * out.elements * contracted, [a, b]
    shapes = [list(t.dims) for t in (*k.inputs, *weights)]
    raise QvitError(f"GEMM kernel {k.name}: no two of its operands {shapes} multiply into its output "
                    f"{list(out.dims)}; plan_cost cannot find the contracted dimension (report the listing)")


def _attention_ops(k: Kernel) -> tuple[int, list[Tensor]]:
    """2·MACs of a fused attention: q [BH,N,d], kᵀ [BH,d,Nk] (or k [BH,Nk,d]), v [BH,Nk,dv] → q·kᵀ and P·v."""
    if len(k.inputs) < 3:
        raise QvitError(f"fused attention kernel {k.name} has {len(k.inputs)} inputs: plan_cost reads q, kᵀ, v as "
                        "three (TensorRT-RTX _gemm_mha_v2); report the listing")
    q, key, v = k.inputs[:3]
    n, d = _last2(q)
    heads = q.elements // max(n * d, 1)
    k0, k1 = _last2(key)
    keys = k1 if k0 == d else k0
    dv = _last2(v)[1]
    return 2 * heads * n * keys * d + 2 * heads * n * keys * dv, [q, key, v]


def kernel_cost(k: Kernel) -> KernelCost:
    """Bytes read (runtime inputs, constants), bytes written and GEMM ops of one kernel, by datatype."""
    if k.shape_only or k.event:
        return KernelCost(k.name, k.layer_type, {}, {}, {}, {}, launches=0)
    inputs = _by_dtype(k.inputs, k.name)
    constants = _by_dtype(k.constants, k.name)
    outputs = _by_dtype(k.outputs, k.name)
    ops: dict[str, int] = {}
    if k.computes:
        count, operands = _attention_ops(k) if k.fused_attention else _gemm_ops(k)
        ops[math_dtype([t.dtype for t in operands], k.name)] = count
    return KernelCost(k.name, k.layer_type, inputs, constants, outputs, ops, k.fused_attention)


def has_unknown_dims(kernels: Iterable[Kernel]) -> bool:
    """True when a listed tensor has a -1 dimension (a plan built with a dynamic batch): it cannot be costed."""
    return any(d < 0 for k in kernels for t in (*k.inputs, *k.constants, *k.outputs) for d in t.dims)


# ---- the estimate ----------------------------------------------------------------------------------

def kernel_ms(cost: KernelCost, profile: GpuProfile) -> float:
    """One kernel on one GPU: max(bytes ÷ bandwidth, Σ ops ÷ peak of their math) + its launches."""
    if cost.launches == 0:
        return 0.0
    memory = cost.total_bytes / (profile.bandwidth_gbs * 1e9)
    math = sum(n / profile.peak_ops(dtype) for dtype, n in cost.ops.items())
    return max(memory, math) * 1e3 + cost.launches * profile.launch_us * 1e-3


def estimate_ms(costs: Iterable[KernelCost], profile: GpuProfile) -> float:
    """Σ over kernels of ``kernel_ms``: one inference at the listing's batch, kernels run one after the other."""
    return sum(kernel_ms(c, profile) for c in costs)


def _add(into: dict, more: Mapping) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


@dataclass(frozen=True)
class PlanCost:
    """One plan's cost: kernels launched, fused attention kernels, bytes by datatype (weights = constants read;
    activations = runtime inputs read + outputs written), GEMM ops by math datatype and the estimate per profile."""

    kernels: int
    fused_attention_kernels: int
    weight_bytes: dict[str, float]
    input_bytes: dict[str, float]
    output_bytes: dict[str, float]
    ops: dict[str, int]
    estimated_ms: dict[str, float]
    costs: tuple[KernelCost, ...] = field(default=(), repr=False, compare=False)

    @property
    def activation_bytes(self) -> dict[str, float]:
        both: dict[str, float] = {}
        _add(both, self.input_bytes)
        _add(both, self.output_bytes)
        return both

    @property
    def mb(self) -> dict[str, float]:
        """MB moved (10⁶ bytes): total, weights, activations, and the activations held in FP32."""
        weights, activations = sum(self.weight_bytes.values()), sum(self.activation_bytes.values())
        return {"total": (weights + activations) / MB, "weights": weights / MB, "activations": activations / MB,
                "fp32_activations": self.activation_bytes.get("Float", 0) / MB}

    @property
    def gops(self) -> dict[str, float]:
        return {dtype: n / 1e9 for dtype, n in self.ops.items()}

    def to_dict(self) -> dict:
        """JSON-ready: counts, MB (rounded to 10⁻⁶), MB by datatype, GOPs by math datatype, ms per profile."""
        def mb(by_dtype: Mapping[str, float]) -> dict[str, float]:
            return {d: round(b / MB, 6) for d, b in sorted(by_dtype.items())}

        return {"kernels": self.kernels, "fused_attention_kernels": self.fused_attention_kernels,
                "mb": {key: round(value, 6) for key, value in self.mb.items()},
                "mb_by_dtype": {"weights": mb(self.weight_bytes), "activations": mb(self.activation_bytes)},
                "gops": {d: round(g, 6) for d, g in sorted(self.gops.items())},
                "estimated_ms": {name: round(ms, 6) for name, ms in self.estimated_ms.items()},
                "model": "per kernel max(bytes / bandwidth, ops / dense peak) + launch, summed (plan_cost.py)"}


def plan_cost(kernels: Iterable[Kernel], profiles: Mapping[str, GpuProfile] | None = None) -> PlanCost:
    """The cost of a plan from its kernels (``anatomy.parse_layer_listing``), estimated on ``profiles``
    (default: every profile of ``GPU_PROFILES``). A listing with -1 dimensions is refused (QvitError)."""
    costs = tuple(kernel_cost(k) for k in kernels)
    weights: dict[str, float] = {}
    inputs: dict[str, float] = {}
    outputs: dict[str, float] = {}
    ops: dict[str, int] = {}
    for c in costs:
        _add(weights, c.constant_bytes)
        _add(inputs, c.input_bytes)
        _add(outputs, c.output_bytes)
        _add(ops, c.ops)
    profiles = GPU_PROFILES if profiles is None else profiles
    return PlanCost(sum(c.launches for c in costs), sum(1 for c in costs if c.fused_attention and c.launches),
                    weights, inputs, outputs, ops, {name: estimate_ms(costs, p) for name, p in profiles.items()},
                    costs)


def summary_line(cost: PlanCost | Mapping, fp16: PlanCost | Mapping | None = None,
                 profiles: Sequence[str] = ("orin-nano", "rtx4090")) -> str:
    """One line for the terminal, from a PlanCost or its ``to_dict()`` (as a build report stores it); with ``fp16``
    (the FP16 float model's plan, either form), each figure's ``÷ FP16`` ratio. ``fp16`` comes second because
    cli.py passes (cost, fp16, profiles) in that order."""
    def ratio(value: float, base: float | None) -> str:
        return f" (÷ FP16 {value / base:.2f})" if base else ""

    cost = cost.to_dict() if isinstance(cost, PlanCost) else cost
    fp16 = fp16.to_dict() if isinstance(fp16, PlanCost) else fp16
    estimated = cost["estimated_ms"]
    missing = [p for p in profiles if p not in estimated]
    if missing:
        raise QvitError(f"no estimate for profile(s) {missing}: choose among {sorted(estimated)}")
    mb = cost["mb"]
    gops = ", ".join(f"{g:.2f} {d}" for d, g in sorted(cost["gops"].items())) or "none"
    ms = ", ".join(f"{p} {estimated[p]:.3f} ms" + ratio(estimated[p], fp16["estimated_ms"].get(p) if fp16 else None)
                   for p in profiles)
    return (f"cost: {cost['kernels']} kernels ({cost['fused_attention_kernels']} fused attention); "
            f"{mb['total']:.2f} MB moved{ratio(mb['total'], fp16['mb']['total'] if fp16 else None)} "
            f"(weights {mb['weights']:.2f}, activations {mb['activations']:.2f}, of them FP32 "
            f"{mb['fp32_activations']:.2f}); GEMM GOPs {gops}; estimated {ms}")


def compare(cost: dict, fp16: dict) -> dict:
    """Ratios of one plan's ``PlanCost.to_dict()`` to the FP16 float model's at the same batch: kernels, MB moved,
    activation MB, and the estimated ms on every profile both have."""
    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    return {"kernels": ratio(cost["kernels"], fp16["kernels"]), "mb": ratio(cost["mb"]["total"], fp16["mb"]["total"]),
            "activation_mb": ratio(cost["mb"]["activations"], fp16["mb"]["activations"]),
            "estimated_ms": {name: ratio(ms, fp16["estimated_ms"][name]) for name, ms in cost["estimated_ms"].items()
                             if name in fp16["estimated_ms"]}}
