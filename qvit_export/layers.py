"""Quantized drop-ins for timm's layers: Linear and Conv2d, IRM's norms, and the mixin every family's quantized
attention is built on (each family keeps its attention class in its own module, families/<name>.py).

Each class subclasses the timm/torch class it replaces and is installed by swapping ``__class__`` on the
existing module (see quantize.py), so parameter names, and therefore state-dict keys, stay timm's.
With every quantizer off (and IRM off), each layer runs timm's own code path and gives bit-identical outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lsq import WEIGHT, LSQQuantizer, PerBlock, PerChannel


class QuantWeightMixin:
    """An LSQ quantizer on the layer's input (per tensor) and on its weight (one step per output channel, or per
    ``block`` inputs of each output channel: a Linear's only)."""

    def attach_quantizers(self, w_bits: int, a_bits: int, name: str, block: int | None = None) -> None:
        self.input_quantizer = LSQQuantizer(a_bits, name=name + ".input_quantizer")
        if block:
            step_shape, granularity = (self.weight.shape[0], self.weight.shape[1] // block), PerBlock(1, block)
        else:
            step_shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
            granularity = PerChannel(axis=0)
        self.weight_quantizer = LSQQuantizer(w_bits, step_shape, signed=True, name=name + ".weight_quantizer",
                                             role=WEIGHT, granularity=granularity)


class QuantLinear(QuantWeightMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    """The patch embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


IRM_NORMS: dict[str, type["IRMNorm"]] = {}  # config.IRM_VARIANTS name -> class


def register_irm(cls):
    IRM_NORMS[cls.variant] = cls
    return cls


@register_irm
class IRMNorm(nn.LayerNorm):
    """IRM: a learnable LayerNorm over head_dim on queries or keys, before their quantizer ('token', the paper's
    form: each token's mean and scale removed). The other variants subclass it, so ``isinstance(m, IRMNorm)``
    finds every IRM norm.

    ``fitted`` is False until calibration sets gamma and beta from data so that the normalised tensor is as
    close as possible to the original one (least squares per channel); a timm FP state dict, which has no
    entry for it, leaves it unfitted instead of failing to load.
    """

    variant = "token"
    fits = True  # calibration fits gamma and beta to the FP model's output (irm.fit_irm)

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim, eps=eps)
        self.fitted = False

    def get_extra_state(self) -> dict:
        return {"fitted": self.fitted}

    def set_extra_state(self, state: dict) -> None:
        self.fitted = bool(state["fitted"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not any(k.startswith(prefix) for k in state_dict):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


@register_irm
class HeadIRMNorm(IRMNorm):
    """IRM with one mean and variance per head over all its tokens and channels (the last two axes), then gamma
    and beta per channel: an affine map of the whole head, so no token loses its own scale or offset relative to
    the others (ONNX: LayerNormalization over the last two axes)."""

    variant = "head"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_layer_norm(x, self.weight, self.bias, self.eps)


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The 'head' IRM: normalised over the last two axes (tokens x head_dim), then gamma and beta per channel
    (HeadIRMNorm computes it here; its export form is onnx_export.PairedIRM). The normalised shape is taken as
    plain ints: TorchScript's tracer would otherwise record it as computed from the input, which its ONNX
    LayerNormalization cannot take (tokens and head_dim are fixed by the model; only the batch varies)."""
    shape = (int(x.shape[-2]), int(x.shape[-1]))
    return F.layer_norm(x, shape, eps=eps) * weight + bias


@register_irm
class BlendIRMNorm(IRMNorm):
    """IRM as a learned blend from identity: ``x + a * (LayerNorm(x) - x)``, ``a`` per channel, starting at 0, so the
    converted model is the FP model bit for bit until training moves ``a`` (and gamma, beta) where quantization
    gains from it."""

    variant = "blend"
    fits = False  # already the FP model: nothing to fit, and Adam would turn a zero gradient's noise into steps

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim, eps=eps)
        self.blend = nn.Parameter(torch.zeros(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blend * (super().forward(x) - x)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, heads, N, head_dim] from a qkv projection [B, N, 3·heads·head_dim], heads first: the tokens go
    to [B, 3·heads, N, head_dim] in one transpose, which is then viewed as [B, 3, heads, N, head_dim] and unbound.
    The same values as timm's ``reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)`` (data movement only),
    in the form every runtime keeps as one integer GEMM (measured 2026-12-03, W8A8 without IRM, TensorRT-RTX 1.7 for
    SM89): timm's order, or a split by channel first, led Myelin to move the head permutation into the GEMM's weight,
    which it then dequantized on every inference (DeiT-Ti: 12 float GEMMs, 12 weight casts, 233 kernels); heads
    first, all 74 quantized layers are INT8 GEMMs in 198 kernels. ONNX Runtime reads the unbind as one Split (three
    Slices of the heads axis stayed three kernels)."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3 * heads, -1).transpose(1, 2).reshape(B, 3, heads, N, -1).unbind(1)


class QuantAttentionMixin:
    """Quantizers on q (after IRM and the folded attention scale), k, v and the softmax output."""

    def attach_quantizers(self, a_bits: int, irm: str | bool, head_dim: int, name: str) -> None:
        """``irm``: False, or an IRM variant (IRM_NORMS) put in timm's empty q_norm/k_norm slots."""
        for part in ("q", "k", "v", "attn"):
            setattr(self, f"{part}_quantizer", LSQQuantizer(a_bits, name=f"{name}.{part}_quantizer"))
        if irm and isinstance(getattr(self, "q_norm", None), (nn.Identity, type(None))):
            self.q_norm, self.k_norm = IRM_NORMS[irm](head_dim), IRM_NORMS[irm](head_dim)
        elif not hasattr(self, "q_norm"):
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()

        # Set while calibrating, so the q/k/v/softmax quantizers see their inputs even when switched off.
        self.force_explicit = False

    @property
    def explicit(self) -> bool:
        """Whether to run the explicit matmul path (timm may otherwise use fused SDPA)."""
        if self.force_explicit or any(getattr(self, f"{p}_quantizer").enabled for p in ("q", "k", "v", "attn")):
            return True
        # timm's own forward of a model with separate q and v biases (EVA, Swin V2) multiplies by qkv.weight
        # directly, past qkv's quantizers: such a model takes the explicit path whenever they are on.
        qkv = getattr(self, "qkv", None)
        return getattr(self, "q_bias", None) is not None and isinstance(qkv, QuantLinear) \
            and (qkv.weight_quantizer.enabled or qkv.input_quantizer.enabled)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IRM on q and k: each through its own norm, or both through one ``qk_norm`` where the export set one
        (onnx_export.PairedIRM, the same maths as one op)."""
        paired = getattr(self, "qk_norm", None)
        return paired(q, k) if paired is not None else (self.q_norm(q), self.k_norm(k))

    def output_reader(self) -> str | None:
        """The name, under this module, of the activation quantizer that reads the attention's output: the output
        projection's input quantizer (every family's ``proj``); None where the output is not quantized there."""
        proj = getattr(self, "proj", None)
        return "proj.input_quantizer" if isinstance(proj, QuantLinear) else None

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, heads, N, head_dim] from the fused ``qkv`` projection (through its quantizers), with timm's
        separate q and v biases where the model has them (EVA, Swin V2: ``q_bias``, a zero ``k_bias`` buffer,
        ``v_bias``), added after the projection so that the exported MatMul keeps its integer form."""
        qkv = self.qkv(x)
        q_bias = getattr(self, "q_bias", None)
        if q_bias is not None:
            qkv = qkv + torch.cat((q_bias, self.k_bias, self.v_bias))
        return split_heads(qkv, self.num_heads)

    def quantized_attention(self, q, k, v, add_bias=None, position=None) -> torch.Tensor:
        """softmax(Q(s·q) · Q(kᵀ) + bias) → Q → · Q(v). The scale is applied before q's quantizer, and k is
        transposed before its own, so that once exported each DequantizeLinear feeds its MatMul directly
        (TensorRT's fusion pattern). A family's attention passes what it does between IRM and the quantizers
        (``position``: (q, k) → (q, k), e.g. EVA's rotary embedding) and to the scores before the softmax
        (``add_bias``: position bias, shifted-window mask); ``scale`` None means no scale (Swin V2's cosine
        attention scales the scores in ``add_bias``)."""
        q, k = self.normalize_qk(q, k)
        if position is not None:
            q, k = position(q, k)
        q = self.q_quantizer(q if self.scale is None else q * self.scale)
        attn = q @ self.k_quantizer(k.transpose(-2, -1))  # kᵀ quantized: DQ feeds the MatMul
        if add_bias is not None:
            attn = add_bias(attn)
        attn = self.attn_quantizer(attn.softmax(dim=-1))
        attn = self.attn_drop(attn)
        return attn @ self.v_quantizer(v)
