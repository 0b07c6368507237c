"""OPs and model size of an FP or quantized timm ViT/Swin, per layer and in total.

What is counted: the multiply-accumulates (MACs) of every Linear, the patch-embedding Conv2d and the two
attention matmuls (q·kᵀ and attention·v), for one image; one MAC is one FLOP, as the DeiT/Swin papers count
FLOPs. LayerNorm, softmax, GELU and residual adds are left out on both sides, as those papers do.

Two conventions for a quantized multiplication with weight bits b_w and activation bits b_a
(b = max(b_w, b_a); both operands are activations in the attention matmuls):
- ``ops`` (Bi-Real / Q-DETR): OPs = FLOPs of the FP layers + MACs/32 at 2 bits, /16 at 3 bits, /8 at 4 bits.
  8-bit layers (the patch embedding and heads we keep at 8 bits) are counted as FP: the convention has no 8-bit
  factor, and counting them in full is the conservative choice.
- ``bops`` (BOPs/64): OPs = FLOPs of the FP layers + b_w · b_a · MACs / 64; an 8-bit layer counts 64/64 = in full.

Size: quantized weights at their bit width plus one FP32 scale per output channel (and per activation
quantizer); everything else (biases, norms, tokens, position tables) in FP32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import QuantConfig
from .timm_models import input_shape

OPS_FACTOR = {2: 1 / 32, 3: 1 / 16, 4: 1 / 8}


@dataclass
class LayerCount:
    name: str
    kind: str           # linear, conv, q@k, attn@v
    macs: int
    w_bits: int | None  # None: float
    a_bits: int | None
    weight_params: int = 0

    @property
    def quantized(self) -> bool:
        return self.a_bits is not None

    def ops(self) -> float:
        bits = max(self.w_bits or 0, self.a_bits or 0)
        return self.macs * OPS_FACTOR.get(bits, 1.0) if self.quantized else float(self.macs)

    def bops(self) -> float:
        return self.macs * (self.w_bits or self.a_bits) * self.a_bits / 64 if self.quantized else float(self.macs)


def count_layers(model: nn.Module, cfg: QuantConfig | None) -> list[LayerCount]:
    """Run one image through ``model`` in float and record every counted multiplication."""
    from .families import family_for_model
    from .quantize import quantizers_disabled

    family = family_for_model(model)
    attention_classes = tuple(family.attention_swaps())  # the quantized classes are their subclasses

    rows: list[LayerCount] = []
    hooks = []

    def bits(name: str) -> tuple[int | None, int | None]:
        return cfg.bits_for(name) if cfg is not None else (None, None)

    def linear_row(m, x, name):
        w, a = bits(name)
        rows.append(LayerCount(name, "linear", x.numel() // m.in_features * m.in_features * m.out_features,
                               w, a, m.weight.numel()))

    seen = set()
    for name, module in model.named_modules():
        if family.keeps_float(name):
            continue  # computed from constants only (Swin V2's cpb_mlp): the exported graph holds its output
        if isinstance(module, nn.Linear):
            def linear(m, inp, out, name=name):
                seen.add(name)
                linear_row(m, inp[0], name)
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.Conv2d):
            def conv(m, inp, out, name=name):
                w, a = bits(name)
                per_output = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                rows.append(LayerCount(name, "conv", out.numel() * per_output, w, a, m.weight.numel()))
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, attention_classes):
            def attention(m, inp, out, name=name):
                _, a = bits(name)
                x = inp[0]
                windows_or_batch, tokens, _ = x.shape
                macs = windows_or_batch * m.num_heads * tokens * tokens * family.head_dim(m)
                qkv = getattr(m, "qkv", None)
                if isinstance(qkv, nn.Linear) and f"{name}.qkv" not in seen:
                    # timm's forward of an attention with q/v biases (EVA, Swin V2) reads qkv.weight directly
                    linear_row(qkv, x, f"{name}.qkv")
                rows.append(LayerCount(name + ".q@k", "q@k", macs, None, a))
                rows.append(LayerCount(name + ".attn@v", "attn@v", macs, None, a))
            hooks.append(module.register_forward_hook(attention))
    channels, height, width = input_shape(model)
    try:
        with torch.no_grad(), quantizers_disabled(model):
            model.eval()(torch.zeros(1, channels, height, width))
    finally:
        for h in hooks:
            h.remove()
    return rows


def model_size_bits(model: nn.Module, rows: list[LayerCount], cfg: QuantConfig | None) -> tuple[int, int]:
    """(FP32 bits, deployed bits) of the parameters: quantized weights at their width plus FP32 scales."""
    total = sum(p.numel() for name, p in model.named_parameters() if not name.endswith(".step"))
    fp_bits = 32 * total
    if cfg is None:
        return fp_bits, fp_bits
    quantized = 0
    for r in rows:
        if r.weight_params and r.w_bits is not None:
            layer = model.get_submodule(r.name)
            q = getattr(layer, "weight_quantizer", None)  # its steps: one per channel, or per block
            scales = q.step.numel() if q is not None else layer.weight.shape[0]
            quantized += r.weight_params * (32 - r.w_bits) - 32 * scales  # codes instead of floats, + scales
    # One scale per activation quantizer: a layer's input, or both operands of an attention matmul.
    activation_scales = 32 * sum((1 if r.kind in ("linear", "conv") else 2) for r in rows if r.quantized)
    return fp_bits, fp_bits - quantized + activation_scales


@dataclass
class Report:
    model: str
    w_bits: int | None
    a_bits: int | None
    layers: list[LayerCount]
    fp_bits: int
    q_bits: int

    @property
    def flops(self) -> float:
        return float(sum(r.macs for r in self.layers))  # one MAC = one FLOP

    @property
    def ops(self) -> float:
        return sum(r.ops() for r in self.layers)

    @property
    def bops(self) -> float:
        return sum(r.bops() for r in self.layers)

    def summary(self) -> dict:
        return {"model": self.model, "w_bits": self.w_bits, "a_bits": self.a_bits, "fp_gflops": self.flops / 1e9,
                "ops_g": self.ops / 1e9, "bops64_g": self.bops / 1e9, "ops_reduction": self.flops / self.ops,
                "bops_reduction": self.flops / self.bops, "fp_mb": self.fp_bits / 8e6, "q_mb": self.q_bits / 8e6,
                "size_reduction": self.fp_bits / self.q_bits}

    def layer_table(self) -> str:
        lines = [f"{'layer':<34} {'kind':<7} {'W/A':>5} {'MMACs':>9} {'OPs (M)':>9} {'BOPs/64 (M)':>12}"]
        for r in self.layers:
            wa = f"{r.w_bits or '-'}/{r.a_bits}" if r.quantized else "fp"
            lines.append(f"{r.name:<34} {r.kind:<7} {wa:>5} {r.macs / 1e6:>9.2f} {r.ops() / 1e6:>9.2f} {r.bops() / 1e6:>12.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return self.summary() | {"layers": [asdict(r) | {"ops": r.ops(), "bops64": r.bops()} for r in self.layers]}


def report(model: nn.Module, cfg: QuantConfig | None, name: str = "") -> Report:
    """OPs and size of ``model`` (an FP timm model, or a quantized one whose own config is used if cfg is None)."""
    cfg = cfg or getattr(model, "qvit_config", None)
    if cfg is not None:
        from .families import family_for_model

        cfg = cfg.with_edges(family_for_model(model).edge_layers)
    rows = count_layers(model, cfg)
    fp_bits, q_bits = model_size_bits(model, rows, cfg)
    return Report(name or model.__class__.__name__, cfg.w_bits if cfg else None, cfg.a_bits if cfg else None, rows,
                  fp_bits, q_bits)
