"""The LSQ quantizer (Esser et al., ICLR 2020): a learned step, symmetric, zero point 0.

forward:  x_hat = clamp(round(x / s), qmin, qmax) * s     (round half to even, as ONNX and TensorRT)
backward: straight-through for round; dx = 1 inside the range, 0 outside;
          ds = (round(x/s) - x/s) inside, qmin or qmax outside, times g = 1 / sqrt(N * qmax).

Weights use one step per output channel (axis 0), or per block of input channels within each output channel
(QuantConfig.w_block: TensorRT's INT4 blocks); activations one step per tensor. Signed codes span
[-2^(b-1), 2^(b-1) - 1]; unsigned codes [0, 2^b - 1], except at 8 bits where [0, 127] keeps the codes in
INT8 with a zero point of 0 (TensorRT has no UINT8 quantization).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import check_bits
from .errors import QvitError


def _scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """Exactly x in the forward pass (x + 0, never (x - xg) + xg, which can be 1 ulp off), gradient times g."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


class _FakeQuant(torch.autograd.Function):
    """clamp(round(x / s), qmin, qmax) * s with LSQ's gradients, in float32; ``s`` broadcasts over ``x``. The same
    maths as composing autograd ops (round with a straight-through gradient, clamp, the product) and the same
    forward bit for bit, in fewer passes over ``x``: backward 5 (two products with the mask, subtract, multiply,
    reduce) against about 12 composed. Measured with torch.profiler on the deep probe's W2A2 student (one core):
    the quantizers' elementwise work was about 40% of a QAT step. ``dx`` is the upstream gradient where ``x / s``
    is inside the range (exactly; the composed form rounds ``(g * s) / s``), ``ds`` sums ``g * (round(v) - v)``
    inside and ``g * qmin`` or ``g * qmax`` outside over the elements that share each step."""

    @staticmethod
    def forward(ctx, x, s, qmin: int, qmax: int):
        v = x / s
        c = v.clamp(qmin, qmax)
        # 1 where clamp left v alone, else 0 (NaN compares unequal: outside, as clamp's own gradient has it); a float
        # mask because multiplying by it is one pass where torch.where with a scalar costs several
        inside = torch.eq(c, v, out=torch.empty_like(v))
        r = c.round_()
        ctx.save_for_backward(v, r, inside)
        ctx.s_shape = s.shape
        return r * s

    @staticmethod
    def backward(ctx, grad):
        v, r, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        # round(v) - v inside, qmin or qmax outside; summed to the broadcast step (per block, the repeat's own
        # backward then sums each block)
        grad_s = (grad * (r - v * inside)).sum_to_size(ctx.s_shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, min(2**bits - 1, 127)


WEIGHT, ACTIVATION = "weight", "activation"  # a quantizer's role


@dataclass(frozen=True)
class PerTensor:
    """One step for the whole tensor (every activation quantizer: TensorRT's only activation scale)."""

    kind = "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One step per index of ``axis`` (weights: the output channel, axis 0 of timm's [out, in] layout)."""

    axis: int = 0
    kind = "channel"


@dataclass(frozen=True)
class PerBlock:
    """One step per block of ``size`` consecutive indices of ``axis`` within each index of the other axis: a
    Linear weight [out, in] with axis 1 has out x in/size steps, the layout of TensorRT's blocked INT4 weights."""

    axis: int = 1
    size: int = 64
    kind = "block"


def block_refusal(in_features: int, out_features: int, bits: int, block: int) -> str | None:
    """Why a Linear layer's weights cannot be INT4 blocks of ``block`` inputs in a TensorRT plan, or None where they
    can: the rule onnx_export.int4_layers deploys by and quantize gives per-block steps by."""
    if bits > 4:
        return f"{bits}-bit weights"
    if in_features % block:
        return f"K={in_features} is no multiple of the INT4 block {block}"
    if in_features == block:  # measured, TensorRT-RTX 1.7 weight-only: K=64/block 64 and K=128/block 128 unfused
        return (f"K={in_features} is a single INT4 block: TensorRT-RTX dequantizes a one-block weight in a separate "
                "kernel on every inference instead of inside the GEMM")
    if out_features % 2:
        return f"{out_features} output channels: INT4 needs an even count"
    return None


class LSQQuantizer(nn.Module):
    """Fake-quantizes its input with a learned step.

    ``role`` says what it quantizes (WEIGHT or ACTIVATION) and ``granularity`` how many steps it has (PerTensor,
    PerChannel, PerBlock): calibration, parity and export read them. ``step_shape`` is ``()`` for a per-tensor
    quantizer, the shape that broadcasts one step per output channel over a weight (``(C_out, 1)`` for Linear,
    ``(C_out, 1, 1, 1)`` for Conv2d), or ``(C_out, C_in / size)`` for blocks of a Linear weight; the granularity
    defaults to per tensor or per channel, as the shape says. Until calibration sets
    the step (``initialized``), an enabled quantizer refuses to run. ``enabled = False`` makes it the identity.
    ``excluded`` (set by ``quantize`` for a group that ``QuantConfig.groups`` leaves out) keeps it the identity
    for good: ``enabled`` then reads False whatever is assigned to it.
    """

    def __init__(self, bits: int, step_shape: tuple[int, ...] = (), signed: bool = True, name: str = "",
                 role: str = ACTIVATION, granularity: PerTensor | PerChannel | PerBlock | None = None):
        super().__init__()
        if role not in (WEIGHT, ACTIVATION):
            raise QvitError(f"quantizer '{name}': role {role!r} is neither {WEIGHT!r} nor {ACTIVATION!r}")
        granularity = granularity or (PerChannel(0 if role == WEIGHT else -1) if step_shape else PerTensor())
        if isinstance(granularity, PerTensor) != (tuple(step_shape) == ()) or \
                (isinstance(granularity, PerBlock) and (len(step_shape) != 2 or granularity.axis != 1)):
            raise QvitError(f"quantizer '{name}': a {granularity.kind} step cannot have the shape {tuple(step_shape)}")
        self.role, self.granularity = role, granularity
        self.bits = check_bits("bits", bits)
        self.signed = bool(signed)
        self.name = name
        self.excluded = False
        self.enabled = True
        self.initialized = False
        self.step = nn.Parameter(torch.ones(step_shape))

    @property
    def enabled(self) -> bool:
        return self._enabled and not self.excluded

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.granularity, PerChannel)

    @property
    def per_block(self) -> bool:
        return isinstance(self.granularity, PerBlock)

    @property
    def per_tensor(self) -> bool:
        return isinstance(self.granularity, PerTensor)

    def _broadcast(self, step: torch.Tensor) -> torch.Tensor:
        """The step in a shape that broadcasts over the quantized tensor (per block: repeated along its blocks)."""
        return step.repeat_interleave(self.granularity.size, dim=1) if self.per_block else step

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.signed)[1]

    def scale(self) -> torch.Tensor:
        """The step the exporter writes as the QuantizeLinear/DequantizeLinear scale."""
        return self.step.detach().clamp_min(torch.finfo(self.step.dtype).tiny)

    def block_scale(self, in_features: int, block: int) -> torch.Tensor:
        """A Linear weight quantizer's steps as INT4 blocks of ``block`` inputs store them, [in / block, out]: its
        own step per block, or each channel's step repeated in every block (the same dequantized values)."""
        step = self.scale()
        if not self.per_block:
            return step.reshape(1, -1).repeat(in_features // block, 1)
        if self.granularity.size != block:
            raise QvitError(f"quantizer '{self.name}' has blocks of {self.granularity.size}, not {block}: export "
                            f"with --int4-block {self.granularity.size}")
        return step.t().contiguous()

    def int_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (int32): what an INT8/INT4 tensor in the deployed graph holds."""
        with torch.no_grad():
            return torch.clamp(torch.round(x / self._broadcast(self.scale())), self.qmin, self.qmax).to(torch.int32)

    def set_step(self, step: torch.Tensor, signed: bool | None = None) -> None:
        if signed is not None:
            self.signed = bool(signed)
        with torch.no_grad():
            self.step.copy_(step.reshape(self.step.shape))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            raise QvitError(f"quantizer '{self.name}' has no step yet: run qvit_export.calibrate(model, batches) first")
        # N: elements that share one step (per sample for activations, per channel or block for weights).
        n = x.numel() / (x.shape[0] if self.per_tensor else self.step.numel())
        s = _scale_grad(self.step.clamp_min(torch.finfo(self.step.dtype).tiny), 1.0 / math.sqrt(n * self.qmax))
        # Codes in float32 even under autocast: bfloat16 cannot tell x/s = 126.6 from 126.5.
        s, xf = self._broadcast(s).float(), x.float()
        if torch.is_grad_enabled() and (xf.requires_grad or s.requires_grad):
            return _FakeQuant.apply(xf, s, self.qmin, self.qmax).to(x.dtype)
        # evaluation and calibration: the same values, nothing kept for a backward
        return (torch.clamp(xf / s, self.qmin, self.qmax).round_() * s).to(x.dtype)

    # The integer range and calibration state travel with the state dict, so a checkpoint is self-contained.
    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        if state["bits"] != self.bits:
            raise QvitError(
                f"quantizer '{self.name}' is {self.bits}-bit but the state dict holds a {state['bits']}-bit one: "
                "build the model with the QuantConfig it was saved with"
            )
        self.signed = bool(state["signed"])
        self.initialized = bool(state["initialized"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A timm FP state dict has no quantizer entries: leave this quantizer uncalibrated instead of failing.
        own = [prefix + "step", prefix + "_extra_state"]
        if not any(k in state_dict for k in own):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        kind = f"{self.role}, per-{self.granularity.kind}" + (f" of {self.granularity.size}" if self.per_block else "")
        sign = "signed" if self.signed else "unsigned"
        state = "" if self.initialized else ", uncalibrated"
        off = ", excluded" if self.excluded else ("" if self.enabled else ", off")
        return f"bits={self.bits}, {kind}, {sign}, codes=[{self.qmin}, {self.qmax}]{state}" + off
