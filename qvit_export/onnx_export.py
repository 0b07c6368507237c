"""ONNX with QuantizeLinear/DequantizeLinear: the only module that knows ONNX op names.

The quantized model is copied into an *export twin* whose layers emit TensorRT's QDQ form (docs/design.md,
"The quantization scheme"):
- activations: ``Clip(s·qmin, s·qmax) → QuantizeLinear(int8, zero point 0) → DequantizeLinear`` for codes
  narrower than INT8, plain Q→DQ at [-128, 127]; one scale per tensor;
- weights: integer codes stored as INT8 initializers → DequantizeLinear (one scale per output channel),
  already transposed to MatMul's [K, N] so the DQ feeds the MatMul directly; Conv keeps [Cout, ...] on axis 0;
  ``precision="int4"`` rewrites the ≤4-bit MatMul weights as INT4 initializers in blocks of 64 or 128 along K
  (opset 21, TensorRT's documented INT4 form); ``"int4-weight-only"`` does the same and leaves every activation
  quantizer out (activations in the graph's dtype), which is TensorRT's INT4 path (W4A16);
- an attention's qkv as one MatMul whose output is split heads first (layers.split_heads), which TensorRT runs as
  one INT8 GEMM and ONNX Runtime as one integer kernel;
- GELU written as ``x·(erf(x/√2) + 1)·0.5`` (ErfGELU), the order ONNX Runtime fuses into its Gelu kernel;
- IRM's LayerNorm on q and k, then the folded attention scale, then q's QDQ; k is quantized already
  transposed; v and the softmax output get their own QDQ.
Each QDQ op is written two ways, for the two export routes (onnx_routes): under torch.export (dynamo) the layers
call ``torch.onnx.ops.symbolic`` and tag every node with its quantizer's module name; under the TorchScript
exporter two autograd Functions give the same nodes through ``symbolic``, and the route reads the owners from
the scale buffers' names. Eager calls compute the same maths in PyTorch. onnx_graph.prepare names the nodes from
the tags, which ties ONNX nodes to PyTorch modules.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers import PatchEmbed
import torch.nn.functional as F
from torch import nn

from .config import ATTENTION_MODES, INT4_BLOCKS
from .errors import QvitError
from .layers import IRMNorm, QuantAttentionMixin, QuantConv2d, QuantLinear
from .lsq import ACTIVATION, LSQQuantizer, block_refusal
from . import onnx_routes
from .onnx_graph import OWNER_KEY
from .timm_models import input_shape

DEFAULT_OPSET = 17      # LayerNormalization; per-axis QDQ
FP16_MIN_OPSET = 19     # FP16 scales on QuantizeLinear/DequantizeLinear
INT4_OPSET = 21         # INT4 initializers, blocked DequantizeLinear
PRECISIONS = ("int8", "int4", "int4-weight-only")
# 64 covers the most weight bytes of DeiT/Swin: every layer of DeiT-Ti/S/B, all of Swin but stage 1's K=96
# layers (benchmarks/engine_anatomy.py counts the coverage); 128 leaves DeiT-Ti's K=192 layers in INT8.
DEFAULT_INT4_BLOCK = 64


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "int8"          # int8 | int4 | int4-weight-only (module docstring)
    dtype: str = "fp32"              # fp32 | fp16: the dtype of every non-quantized op
    opset: int | None = None         # None: the lowest opset that the options allow
    dynamic_batch: bool = True
    decompose_layernorm: bool = False  # TensorRT 8.5 (JetPack 5) cannot import LayerNormalization
    int4_block: int = DEFAULT_INT4_BLOCK  # INT4 block size along K (64 or 128)
    exporter: str = onnx_routes.DEFAULT_ROUTE  # dynamo | torchscript: how the twin is traced (onnx_routes)
    attention: str = ATTENTION_MODES[0]  # fused | exact: attention probabilities below 8 bits (config.ATTENTION_MODES)

    def __post_init__(self):
        onnx_routes.route(self.exporter)  # a known exporter, or a one-line error naming them
        if self.attention not in ATTENTION_MODES:
            raise QvitError(f"attention mode {self.attention!r} is unknown: choose one of {', '.join(ATTENTION_MODES)}")
        if self.precision not in PRECISIONS:
            raise QvitError(f"precision {self.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        if self.int4_block not in INT4_BLOCKS:
            raise QvitError(f"INT4 block size {self.int4_block} is not one TensorRT documents: use 64 or 128")

    @property
    def int4(self) -> bool:
        return self.precision.startswith("int4")

    @property
    def weight_only(self) -> bool:
        return self.precision == "int4-weight-only"

    def resolved_opset(self) -> int:
        need = INT4_OPSET if self.int4 else FP16_MIN_OPSET if self.dtype == "fp16" else DEFAULT_OPSET
        opset = self.opset or need
        if opset < need:
            raise QvitError(f"--opset {opset} is too low for {self.precision}/{self.dtype}: use --opset {need} or higher")
        if opset > 21:
            raise QvitError(f"--opset {opset} is not supported: use 17 to 21")
        return opset


# ---- ops that emit QDQ ---------------------------------------------------------------------------
# The TorchScript route's form (autograd Functions with ``symbolic``), then the dynamo route's (_onnx_node).

class _ActivationQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, clip_min, clip_max, qmin: int, qmax: int, clip: bool):
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def symbolic(g, x, scale, clip_min, clip_max, qmin, qmax, clip):
        if clip:
            x = g.op("Clip", x, clip_min, clip_max)
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        q = g.op("QuantizeLinear", x, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, scale, zero, axis: int):
        shape = [1] * codes.dim()
        shape[axis] = -1
        return codes.to(scale.dtype) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero, axis):
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)


def _traced_by_torch_export() -> bool:
    """True while the dynamo route's torch.export traces the twin (the TorchScript route traces with torch.jit,
    and eager calls compute the maths)."""
    return torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()


def _onnx_node(op: str, inputs: tuple, like: torch.Tensor, owner: str, dtype=None, **attrs) -> torch.Tensor:
    """One ONNX node for the dynamo route, tagged with the name of the quantizer or layer it belongs to
    (onnx_graph.OWNER_KEY), which onnx_graph.prepare turns into the node's name."""
    return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=dtype or like.dtype, shape=like.shape,
                                   metadata_props={OWNER_KEY: owner})


def _weight_dq(codes, scale, zero, axis: int, owner: str) -> torch.Tensor:
    if _traced_by_torch_export():
        return _onnx_node("DequantizeLinear", (codes, scale, zero), codes, owner, scale.dtype, axis=axis)
    return _WeightDQ.apply(codes, scale, zero, axis)


def needs_clip(qmin: int, qmax: int, scale: float, input_range: tuple[float, float] | None) -> bool:
    """Whether the clamp to [qmin, qmax] must be written as a Clip before QuantizeLinear: not when QuantizeLinear's
    own saturation to [-128, 127] gives the same codes for every input in ``input_range`` (None: any value).
    Rounding is monotonic, so the codes of the range's ends decide. A Clip between a softmax and its QuantizeLinear
    is what stops TensorRT fusing the attention (deit_small W8A8, TensorRT-RTX 1.7, SM89: 199 kernels with it, 138
    and 12 fused attention kernels without), and at 8 bits it cannot bind on a softmax output: [0, 1] → [0, 127]."""
    lo, hi = input_range if input_range is not None else (-math.inf, math.inf)
    margin = 1e-3  # of a code: an input this near a rounding tie may round either way in another runtime's dtype
    low_free = qmin == -128 or lo / scale > qmin - 0.5 + margin
    high_free = qmax == 127 or hi / scale < qmax + 0.5 - margin
    return not (low_free and high_free)


class ActivationQDQ(nn.Module):
    """Export form of an activation LSQQuantizer: its step and range as constants. ``owner``: the quantizer's
    module name, which names its nodes. ``input_range``: what its input can be, where the model fixes it (a
    softmax output: [0, 1]), so that a clamp that cannot bind is not written (needs_clip)."""

    def __init__(self, q: LSQQuantizer, dtype: torch.dtype, owner: str,
                 input_range: tuple[float, float] | None = None):
        super().__init__()
        self.qmin, self.qmax = q.qmin, q.qmax
        self.enabled = True  # attention modules check this to take their explicit path
        self.owner = owner
        s = q.scale().to(dtype)
        self.clip = needs_clip(q.qmin, q.qmax, float(s), input_range)
        self.register_buffer("scale", s)
        self.register_buffer("clip_min", s * q.qmin)
        self.register_buffer("clip_max", s * q.qmax)
        self.register_buffer("zero", torch.zeros((), dtype=torch.int8))

    def forward(self, x):
        if _traced_by_torch_export():  # Clip, Q and DQ written out: nothing for a translation table to drop
            if self.clip:
                x = _onnx_node("Clip", (x, self.clip_min, self.clip_max), x, self.owner)
            q = _onnx_node("QuantizeLinear", (x, self.scale, self.zero), x, self.owner, torch.int8)
            return _onnx_node("DequantizeLinear", (q, self.scale, self.zero), x, self.owner)
        return _ActivationQDQ.apply(x, self.scale, self.clip_min, self.clip_max, self.qmin, self.qmax, self.clip)


class PassThrough(nn.Module):
    """An activation quantizer left out (int4-weight-only). ``enabled`` keeps attention on its explicit path."""

    enabled = True

    def forward(self, x):
        return x


class _ExportWeightLayer(nn.Module):
    """The input QDQ, INT8 weight codes, per-channel scales and zero points that Linear and Conv share.
    ``axis`` is the output-channel axis of the stored weight (1 for MatMul's [in, out], 0 for Conv).

    A per-block weight quantizer (QuantConfig.w_block) keeps its steps as ``weight_block_scale`` ([in / block,
    out], the stored layout), with which the module computes; the traced graph holds the layer as per-channel INT8
    (each channel's largest block step standing in as its scale) until onnx_graph._to_int4 writes every INT4 layer's
    codes with its quantizer's block scales (LSQQuantizer.block_scale), which every per-block export does
    (_check_deployable)."""

    axis = 0

    def __init__(self, layer: QuantLinear | QuantConv2d, dtype: torch.dtype, name: str, activations: bool = True):
        super().__init__()
        wq = layer.weight_quantizer
        codes = wq.int_codes(layer.weight).to(torch.int8)
        self.name = name
        self.input_quantizer = ActivationQDQ(layer.input_quantizer, dtype, f"{name}.input_quantizer") \
            if activations else PassThrough()
        self.register_buffer("weight_codes", self.stored_codes(codes))
        self.block = wq.granularity.size if wq.per_block else None
        if self.block:
            self.register_buffer("weight_block_scale", wq.scale().t().contiguous().to(dtype))
            self.register_buffer("weight_scale", wq.scale().amax(dim=1).to(dtype))
        else:
            self.register_buffer("weight_scale", wq.scale().reshape(-1).to(dtype))
        self.register_buffer("weight_zero", torch.zeros(codes.shape[0], dtype=torch.int8))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def stored_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes as the graph stores them: MatMul's [in, out] (axis 1), or as they are."""
        return codes.t().contiguous() if self.axis == 1 else codes

    def dequantized_weight(self) -> torch.Tensor:
        if self.block and not torch.onnx.is_in_onnx_export():
            return self.weight_codes.to(self.weight_block_scale.dtype) \
                * self.weight_block_scale.repeat_interleave(self.block, dim=0)
        return _weight_dq(self.weight_codes, self.weight_scale, self.weight_zero, self.axis,
                          f"{self.name}.weight_quantizer")


class ExportLinear(_ExportWeightLayer):
    """x → QDQ → MatMul with DQ(INT8 weight [in, out], axis 1) → Add bias.

    ``flatten``: the MatMul runs on a 2-D [tokens, K] input. TensorRT-RTX 1.7 cannot compile INT8 activations
    × blocked INT4 weights on a 3-D input (Myelin ``CHECK(is_constant()) failed``; measured on one 384×384
    MatMul: 2-D builds, 3-D fails, blocks of 64 and 128 alike), so int4 layers under INT8 activations are flattened
    before their Q and reshaped back after the MatMul; the DQ still feeds the MatMul directly.

    Otherwise a 2-D input (a classifier head's [batch, features]) runs as [batch, 1, features]: ONNX Runtime fuses a
    2-D MatMul and its bias Add into a Gemm before it looks for QDQ patterns, and has no integer Gemm with a float
    bias, so the head stayed a float Gemm on weights dequantized at every run (ORT 1.32, 2026-12-03); as a 3-D
    MatMul it becomes MatMulIntegerToFloat like every other layer.
    """

    axis = 1

    def __init__(self, layer: QuantLinear, dtype: torch.dtype, name: str, activations: bool = True,
                 flatten: bool = False):
        super().__init__(layer, dtype, name, activations)
        self.flatten = flatten

    def forward(self, x):
        if self.flatten:
            y = torch.matmul(self.input_quantizer(x.reshape(-1, x.shape[-1])), self.dequantized_weight())
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        elif x.dim() == 2:
            return self.forward(x.unsqueeze(1)).squeeze(1)
        else:
            y = torch.matmul(self.input_quantizer(x), self.dequantized_weight())
        return y if self.bias is None else y + self.bias


class ExportPatchLinear(_ExportWeightLayer):
    """A patch embedding's convolution (kernel = stride, no padding) as x → QDQ → MatMul on its [B, patches,
    C·kh·kw] patches: the INT8 codes stored [C·kh·kw, Cout] (axis 1), in the order in which ExportPatchEmbed lays
    out each patch, so every product is the convolution's. ONNX Runtime has no integer convolution with a float
    output (QLinearConv requantizes it): as a Conv the patch embedding ran in float there on weights dequantized at
    every run, as a MatMul it is MatMulIntegerToFloat; TensorRT-RTX runs it as an INT8 GEMM with the patch layout
    fused into the input's Q kernel (DeiT-Ti W8A8 for SM89, 2026-12-03: 198 kernels, as with the Conv)."""

    axis = 1

    def stored_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.reshape(codes.shape[0], -1).t().contiguous()

    def forward(self, patches):
        y = torch.matmul(self.input_quantizer(patches), self.dequantized_weight())
        return y if self.bias is None else y + self.bias


def patch_embedding_as_matmul(parent: nn.Module, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is the projection of a timm PatchEmbed that ExportPatchEmbed can write as a MatMul: kernel
    equal to stride, no padding, dilation or groups, and no padding of the image at run time."""
    return type(parent) is PatchEmbed and parent.proj is conv and not parent.dynamic_img_pad \
        and tuple(conv.kernel_size) == tuple(conv.stride) and tuple(conv.padding) == (0, 0) \
        and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"


class ExportPatchEmbed(PatchEmbed):
    """Export form of timm's PatchEmbed (installed over it by ``__class__``, so its norm and settings stay): the
    image cut into patches by Reshape/Transpose, each patch's C·kh·kw values in the convolution's order, then
    ExportPatchLinear, and the output in the layout timm's PatchEmbed returns (flattened tokens, NHWC, ...)."""

    def forward(self, x):
        B, C, H, W = x.shape
        kh, kw = self.patch_size
        h, w = H // kh, W // kw
        patches = x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw)
        x = self.proj(patches)  # [B, h·w, D]
        fmt = "NLC" if self.flatten else str(getattr(self.output_fmt, "value", self.output_fmt))
        if fmt == "NHWC":
            x = x.reshape(B, h, w, -1)
        elif fmt == "NCHW":
            x = x.reshape(B, h, w, -1).permute(0, 3, 1, 2)
        elif fmt == "NCL":
            x = x.transpose(1, 2)
        return self.norm(x)


def graph_layouts(model: nn.Module) -> dict:
    """{activation quantizer: a function from the codes it has in the exported graph to the layout of its PyTorch
    output}, for quantizers the graph applies to a re-laid-out tensor: a patch embedding written as a MatMul
    (ExportPatchEmbed) quantizes the [B, patches, C·kh·kw] patches, PyTorch the [B, C, H, W] image."""
    layouts = {}
    for name, mod in model.named_modules():
        proj = getattr(mod, "proj", None)
        if isinstance(proj, QuantConv2d) and patch_embedding_as_matmul(mod, proj):
            layouts[f"{name}.proj.input_quantizer".lstrip(".")] = functools.partial(
                _patches_to_image, channels=proj.in_channels, kernel=tuple(proj.kernel_size), grid=mod.grid_size)
    return layouts


def _patches_to_image(codes, channels: int, kernel: tuple[int, int], grid: tuple[int, int]):
    (kh, kw), (h, w) = kernel, grid
    return codes.reshape(-1, h, w, channels, kh, kw).transpose(0, 3, 1, 4, 2, 5).reshape(-1, channels, h * kh, w * kw)


class ExportConv2d(_ExportWeightLayer):
    """x → QDQ → Conv with DQ(INT8 weight [Cout, Cin, kh, kw], axis 0).

    In a weight-only graph (no input QDQ) the weight is stored dequantized (``weight_float``: the same values):
    TensorRT has no weight-only convolution, and TensorRT-RTX 1.7 turned a DQ weight under a float input into a
    dequantization kernel that runs on every inference (measured on the demo ViT's patch embedding)."""

    def __init__(self, layer: QuantConv2d, dtype: torch.dtype, name: str, activations: bool = True):
        super().__init__(layer, dtype, name, activations)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.store_float = not activations
        if self.store_float:
            shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
            self.register_buffer("weight_float", self.weight_codes.to(dtype) * self.weight_scale.reshape(shape))

    def forward(self, x):
        if self.store_float and _traced_by_torch_export():
            return self._tagged_float_conv(x)
        weight = self.weight_float if self.store_float else self.dequantized_weight()
        return nn.functional.conv2d(self.input_quantizer(x), weight, self.bias, self.stride,
                                    self.padding, self.dilation, self.groups)


    def _tagged_float_conv(self, x):
        """The weight-only Conv as one tagged node (no DequantizeLinear leads the graph surgery to it)."""
        kernel = self.weight_float.shape[2:]
        out = [(x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (kernel[i] - 1) - 1) // self.stride[i] + 1
               for i in range(2)]
        like = x.new_empty((x.shape[0], self.weight_float.shape[0], *out))
        inputs = (x, self.weight_float) + (() if self.bias is None else (self.bias,))
        return _onnx_node("Conv", inputs, like, self.name, strides=list(self.stride), dilations=list(self.dilation),
                          pads=list(self.padding) * 2, group=self.groups, kernel_shape=list(kernel))


class ErfGELU(nn.Module):
    """nn.GELU (exact, erf form) written as ``Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)``, the node order ONNX
    Runtime 1.32's GeluFusion recognises on either export route. torch.export writes ``x · (0.5 · (1 + erf))``, which
    ORT leaves as five elementwise kernels over the MLP's widest tensor: on deit_small W8A8 (ORT CPU, 2 cores,
    2026-12-03) that was most of the dynamo route's 20% over the TorchScript route, whose symbolic writes this order.
    Multiplying by 0.5 last is exact in floating point, so the values are those of the other order."""

    def forward(self, x):
        return x * (torch.erf(x / math.sqrt(2.0)) + 1.0) * 0.5


class DecomposedLayerNorm(nn.Module):
    """LayerNorm written as elementary ops, for TensorRT 8.5, which has no LayerNormalization importer;
    ``axes``: how many trailing axes it normalises over (2 for IRM's 'head' variant)."""

    def __init__(self, norm: nn.LayerNorm, axes: int = 1):
        super().__init__()
        self.eps, self.dims = norm.eps, tuple(range(-axes, 0))
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        # Statistics in FP32 even in an FP16 graph: squares of |x - mean| > 256 overflow FP16.
        x32 = x.float()
        centred = x32 - x32.mean(dim=self.dims, keepdim=True)
        y = (centred / torch.sqrt((centred * centred).mean(dim=self.dims, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight + self.bias if self.weight is not None else y


class PairedIRM(nn.Module):
    """Export form of an attention's two IRM norms (q_norm, k_norm; every variant of layers.IRM_NORMS): q and k
    stacked along the heads and normalised in one op, then each its own gamma and beta (and blend). Per token or per
    head, each slice has the statistics it has alone, so the maths is the two norms'; TensorRT runs one
    normalisation kernel instead of two (deit_tiny W8A8 IRM head, SM89, batch 1: 138 kernels → 126).

    ``stats``: how the normalisation is written. 'layernorm': ONNX LayerNormalization (FP32 graphs). 'fp16': the
    mean and variance reduced in FP32 as [B, 2H, 1, 1] tensors and the centred values kept in FP16 (FP16 graphs):
    with LayerNormalization on an FP16 input, TensorRT-RTX 1.7 split the normalisation into two kernels with the
    whole q and k between them in FP32 (deit_tiny W8A8 IRM head, SM89, batch 1: 7.6 of 43.8 MB moved; 0.3 of 39.5
    MB in this form). 'decomposed': elementary ops with FP32 statistics (TensorRT 8.5 has no LayerNormalization)."""

    def __init__(self, q_norm: IRMNorm, k_norm: IRMNorm, stats: str):
        super().__init__()
        self.axes = 2 if q_norm.variant == "head" else 1
        self.eps, self.stats = q_norm.eps, stats
        for part, norm in (("q", q_norm), ("k", k_norm)):
            self.register_buffer(f"{part}_weight", norm.weight.detach().clone())
            self.register_buffer(f"{part}_bias", norm.bias.detach().clone())
            blend = getattr(norm, "blend", None)
            self.register_buffer(f"{part}_blend", None if blend is None else blend.detach().clone())

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.axes, 0))
        if self.stats == "layernorm":
            return F.layer_norm(x, tuple(int(d) for d in x.shape[-self.axes:]), eps=self.eps)
        x32 = x.float()
        if self.stats == "fp16":
            centred = x - x32.mean(dim=dims, keepdim=True).to(x.dtype)
            c32 = centred.float()
            return centred * torch.rsqrt((c32 * c32).mean(dim=dims, keepdim=True) + self.eps).to(x.dtype)
        centred = x32 - x32.mean(dim=dims, keepdim=True)  # squares of |x - mean| > 256 overflow FP16
        return (centred / torch.sqrt((centred * centred).mean(dim=dims, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = q.shape[1]
        y = self._normalised(torch.cat((q, k), dim=1))
        out = []
        for part, x, yp in (("q", q, y[:, :heads]), ("k", k, y[:, heads:])):
            yp = yp * getattr(self, f"{part}_weight") + getattr(self, f"{part}_bias")
            blend = getattr(self, f"{part}_blend")
            out.append(yp if blend is None else x + blend * (yp - x))
        return out[0], out[1]


# ---- the export twin -----------------------------------------------------------------------------

def int4_layers(model: nn.Module, block: int = DEFAULT_INT4_BLOCK) -> tuple[list[str], dict[str, str]]:
    """(Linear layers whose weights go to INT4 in blocks of ``block``, {Linear layer kept at INT8: why})."""
    cfg = getattr(model, "qvit_config", None)
    chosen, kept = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        why = block_refusal(mod.in_features, mod.out_features, mod.weight_quantizer.bits, block)
        if why is None:
            chosen.append(name)
        else:
            kept[name] = why + (" (edge layer)" if mod.weight_quantizer.bits > 4 and cfg and cfg.is_edge(name) else "")
    return chosen, kept


def _check_deployable(model: nn.Module, options: ExportOptions) -> None:
    """The default scheme is deployable by construction; refuse anything else with the layer's name."""
    cfg = getattr(model, "qvit_config", None)
    from .quantize import check_steps

    check_steps(model, "cannot export")
    for name, mod in model.named_modules():
        if options.int4 and isinstance(mod, QuantLinear) and mod.weight_quantizer.bits > 4 \
                and not (cfg is not None and cfg.is_edge(name)):
            raise QvitError(f"layer '{name}' has {mod.weight_quantizer.bits}-bit weights, which INT4 cannot hold: "
                            "export with --precision int8, or retrain with w_bits <= 4")
        if isinstance(mod, LSQQuantizer) and mod.per_block and not (options.int4 and
                                                                     options.int4_block == mod.granularity.size):
            raise QvitError(f"'{name}' has one step per block of {mod.granularity.size} inputs (w_block), which only "
                            f"INT4 weights in blocks of {mod.granularity.size} hold: export with --precision int4 "
                            f"(or int4-weight-only) --int4-block {mod.granularity.size}")
        if isinstance(mod, LSQQuantizer):
            if not mod.initialized:
                raise QvitError(f"quantizer '{name}' is uncalibrated: calibrate or train the model before export")
            if mod.excluded:
                raise QvitError(f"quantizer '{name}' is left out by this model's quantizer groups "
                                f"({', '.join(cfg.groups)}): a partly quantized model is for analysis; export a "
                                "model quantized in every group")
            if not mod.enabled:
                raise QvitError(f"quantizer '{name}' is switched off: enable every quantizer before export")
            if mod.role == ACTIVATION and mod.per_channel and not options.weight_only:
                raise QvitError(f"'{name}' quantizes an activation per channel, which TensorRT cannot run: retrain "
                                "with per-tensor activation quantizers (the default QuantConfig)")


def attention_quantizers(model: nn.Module) -> tuple[set[str], set[str]]:
    """({the quantizers of attention probabilities (softmax outputs)}, {the quantizers that read an attention's
    output}) of a quantized model, by name."""
    probabilities, readers = set(), set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantAttentionMixin):
            prefix = f"{name}." if name else ""
            probabilities.add(prefix + "attn_quantizer")
            reader = mod.output_reader()
            if reader is not None:
                readers.add(prefix + reader)
    return probabilities, readers


def deployment_form(model: nn.Module, options: ExportOptions) -> nn.Module:
    """The model whose maths the graph computes: ``model`` itself, or for ``attention="fused"`` a copy in which the
    attention probabilities and the quantizer that reads the attention's output, where below 8 bits, hold 8-bit
    codes on their trained steps (export and parity both take this form, so parity checks the graph that ships).

    Why those two: TensorRT fuses an attention into one kernel only when nothing stands between the softmax and its
    QuantizeLinear, nor between the attention's output and the next QuantizeLinear, which the fused kernel computes
    (measured, TensorRT-RTX 1.7, SM89, deit_tiny W4A4: 198 kernels and none fused with the two b-bit Clips, 162 and
    12 fused without them; q, k and v keep their Clips). Written on the INT8 codes instead (Q → Clip → DQ), the
    output's clamp still fused, but ONNX Runtime then ran each projection as a float MatMul."""
    if options.attention != "fused" or options.weight_only:
        return model
    probabilities, readers = attention_quantizers(model)
    narrow = [name for name, m in model.named_modules() if name in probabilities | readers and m.bits < 8]
    if not narrow:
        return model
    deployed = copy.deepcopy(model)
    for name in narrow:
        deployed.get_submodule(name).bits = 8
    return deployed


def export_twin(model: nn.Module, options: ExportOptions, int4: list[str] | None = None) -> nn.Module:
    """A copy of the quantized model whose layers emit the QDQ graph; same maths, ONNX-friendly form.
    ``int4``: the layers whose weights become INT4 blocks (default: ``int4_layers`` for an int4 precision)."""
    _check_deployable(model, options)
    dtype = torch.float16 if options.dtype == "fp16" else torch.float32
    activations = not options.weight_only
    if int4 is None:
        int4 = int4_layers(model, options.int4_block)[0] if options.int4 else []
    flattened = set(int4) if options.precision == "int4" else set()
    twin = copy.deepcopy(model).eval()
    probabilities = attention_quantizers(twin)[0]
    stats = "fp16" if options.dtype == "fp16" else "decomposed" if options.decompose_layernorm else "layernorm"
    for mod in list(twin.modules()):  # IRM on q and k: one op for both (PairedIRM)
        if isinstance(mod, QuantAttentionMixin) and isinstance(mod.q_norm, IRMNorm):
            mod.qk_norm = PairedIRM(mod.q_norm, mod.k_norm, stats)
            mod.q_norm, mod.k_norm = nn.Identity(), nn.Identity()
    for name, mod in list(twin.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        if isinstance(mod, QuantLinear):
            setattr(parent, child, ExportLinear(mod, dtype, name, activations, flatten=name in flattened))
        elif isinstance(mod, QuantConv2d) and activations and patch_embedding_as_matmul(parent, mod):
            setattr(parent, child, ExportPatchLinear(mod, dtype, name))
            parent.__class__ = ExportPatchEmbed
        elif isinstance(mod, QuantConv2d):
            setattr(parent, child, ExportConv2d(mod, dtype, name, activations))
        elif isinstance(mod, LSQQuantizer) and not isinstance(parent, _ExportWeightLayer):
            form = ActivationQDQ(mod, dtype, name, input_range=(0.0, 1.0) if name in probabilities else None)
            setattr(parent, child, form if activations else PassThrough())
        elif isinstance(mod, nn.LayerNorm):
            setattr(parent, child, DecomposedLayerNorm(mod) if options.decompose_layernorm else _plain_layernorm(mod))
        elif type(mod) is nn.GELU and mod.approximate == "none":
            setattr(parent, child, ErfGELU())
    return twin.to(dtype)


def _plain_layernorm(norm: nn.LayerNorm) -> nn.LayerNorm:
    """An nn.LayerNorm with the same parameters (IRMNorm's extra state has no place in a traced graph)."""
    plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None)
    plain.load_state_dict({k: v for k, v in norm.state_dict().items() if k in ("weight", "bias")})
    return plain


def export_onnx(model: nn.Module, path, options: ExportOptions = ExportOptions(), metadata: dict | None = None,
                simplify: bool = True) -> Path:
    """Write the QDQ ONNX of a calibrated or trained quantized model to ``path`` (atomically).

    ``simplify`` runs onnxsim with a guard that no QDQ node is lost. ``metadata`` is added to the model's
    metadata_props next to the tool version, QuantConfig, precision, dtype and opset.
    """
    from . import onnx_graph

    return onnx_graph.save_atomic(onnx_model(model, options, metadata, simplify), path)


def onnx_model(model: nn.Module, options: ExportOptions = ExportOptions(), metadata: dict | None = None,
               simplify: bool = True):
    """The QDQ ONNX of a calibrated or trained quantized model, as an in-memory ModelProto (export_onnx). A model
    with a NaN or infinite parameter or buffer is refused, naming the tensor."""
    from . import onnx_graph
    from .untrusted import check_finite

    check_finite(model, "the model to export")
    model = deployment_form(model, options)
    opset = options.resolved_opset()
    int4, int8_kept = int4_layers(model, options.int4_block) if options.int4 else ([], {})
    twin = export_twin(model, options, int4)
    stored = {}  # the export's own choices, which the engine anatomy reports as reasons (anatomy.export_reasons)
    if options.int4:
        stored = {"int4_block": str(options.int4_block), "int8_weight_layers": int8_kept}
    if options.weight_only:
        stored["float_weight_layers"] = {
            name: "weight-only: TensorRT has no weight-only convolution, so its 8-bit weights are stored dequantized "
                  "(same values)" for name, m in twin.named_modules() if isinstance(m, ExportConv2d) and m.store_float}
    if getattr(model, "qvit_calibration", None) is not None:  # which calibration set (calibrate() records it)
        stored["calibration"] = model.qvit_calibration
    dtype = torch.float16 if options.dtype == "fp16" else torch.float32
    # A dynamic batch is traced at 2 so that no shape specialises on 1.
    dummy = torch.zeros(2 if options.dynamic_batch else 1, *input_shape(model), dtype=dtype)
    graph = onnx_routes.route(options.exporter).trace(twin, dummy, opset, options.dynamic_batch)
    stored["exporter"] = options.exporter
    stored["attention"] = options.attention
    onnx_graph.prepare(graph)
    if simplify:
        graph = onnx_graph.simplify(graph, decomposed_layernorm=options.decompose_layernorm)
    graph = onnx_graph.lower_opset(graph, opset)
    return onnx_graph.finalize(graph, model, options, opset, (metadata or {}) | stored, int4)


def float_baseline(model: nn.Module, dtype: str = "fp16"):
    """The ONNX of the float model a quantized ``model`` replaces: its architecture as timm builds it (random
    weights: which kernels TensorRT picks does not depend on their values), no quantizer, no IRM, every op in
    ``dtype``, a dynamic batch. The plan cost's reference (engine.EngineOptions.cost_batch)."""
    from .timm_models import create_model, describe_model

    source = describe_model(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fp = create_model(source["name"], **source["kwargs"]).eval()
    fp = fp.to(torch.float16 if dtype == "fp16" else torch.float32)
    dummy = torch.zeros(2, *input_shape(fp), dtype=next(fp.parameters()).dtype)
    return onnx_routes.route(onnx_routes.DEFAULT_ROUTE).trace(fp, dummy, 18, True)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
