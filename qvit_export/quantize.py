"""quantize(model, cfg): turn a timm model of a supported family into its Q-ViT form by swapping module classes."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

from torch import nn

from .config import QuantConfig
from .errors import QvitError
from .families import family_for_model
from .layers import IRMNorm, QuantAttentionMixin, QuantConv2d, QuantLinear
from .lsq import WEIGHT, LSQQuantizer, block_refusal


def quantize(model: nn.Module, cfg: QuantConfig, inplace: bool = False) -> nn.Module:
    """Return ``model`` with quantized Linear/Conv2d/attention layers (uncalibrated).

    State-dict keys stay timm's, plus the quantizer steps (and IRM norms), so a timm FP checkpoint loads
    into the result. The input model is left untouched unless ``inplace``.
    """
    family = family_for_model(model, "the model to quantize")
    swaps = family.attention_swaps()
    if any(True for _ in quantizers(model)):
        raise QvitError("this model is already quantized: quantize the FP model instead")
    if cfg.irm and family.irm_refusal:
        raise QvitError(family.irm_refusal)
    cfg = cfg.with_edges(family.edge_layers)
    if not inplace:
        model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        kind = type(mod)
        w_bits, a_bits = cfg.bits_for(name)
        if family.keeps_float(name):
            continue
        if kind is nn.Linear:
            mod.__class__ = QuantLinear
            blocked = cfg.w_block and not cfg.is_edge(name) \
                and block_refusal(mod.in_features, mod.out_features, w_bits, cfg.w_block) is None
            mod.attach_quantizers(w_bits, a_bits, name, cfg.w_block if blocked else None)
        elif kind is nn.Conv2d:
            mod.__class__ = QuantConv2d
            mod.attach_quantizers(w_bits, a_bits, name)
        elif kind in swaps:
            head_dim = family.head_dim(mod)
            mod.__class__ = swaps[kind]
            mod.attach_quantizers(a_bits, cfg.irm, head_dim, name)
        elif name.endswith(".attn") and kind not in swaps.values():
            raise QvitError(f"cannot quantize attention '{name}' of type {kind.__name__}: a {family.name} model "
                            f"quantizes {', '.join(c.__name__ for c in swaps)} only")
    _exclude_groups(model, cfg)
    model.qvit_config = cfg
    return model


def quantizer_group(model: nn.Module, name: str) -> str | None:
    """The QUANT_GROUPS name of the quantizer called ``name`` in a quantized model, or None for one outside the
    blocks' MHSA and MLP (the 8-bit patch embedding and head, Swin's patch merging), which every config keeps."""
    owner, _, part = name.rpartition(".")
    cfg = getattr(model, "qvit_config", None)
    if cfg is not None and cfg.is_edge(owner):
        return None
    parent_name, _, leaf = owner.rpartition(".")
    if part in ("q_quantizer", "k_quantizer", "v_quantizer", "attn_quantizer"):
        return "mhsa_acts"
    if isinstance(model.get_submodule(parent_name), QuantAttentionMixin):  # qkv (or q/k/v_proj), proj
        return "mhsa_weights" if part == "weight_quantizer" else "mhsa_inputs"
    if parent_name.rpartition(".")[2] == "mlp":  # fc1/fc2, or a gated MLP's fc1_g/fc1_x/fc2
        return "mlp"
    return None


def _exclude_groups(model: nn.Module, cfg: QuantConfig) -> None:
    model.qvit_config = cfg  # quantizer_group reads the edge layers from it
    for name, q in quantizers(model):
        group = quantizer_group(model, name)
        q.excluded = group is not None and group not in cfg.groups


def quantizers(model: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """(name, quantizer) for every LSQ quantizer in the model, in module order."""
    for name, mod in model.named_modules():
        if isinstance(mod, LSQQuantizer):
            yield name, mod


def irm_norms(model: nn.Module) -> Iterator[tuple[str, IRMNorm]]:
    for name, mod in model.named_modules():
        if isinstance(mod, IRMNorm):
            yield name, mod


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    for _, q in quantizers(model):
        q.enabled = enabled


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module, weights: bool = True):
    """Run the model in float (an FP teacher, or calibration statistics), then restore each quantizer.
    ``weights=False`` switches off only the activation quantizers: the PyTorch twin of a weight-only export."""
    saved = [(q, q.enabled) for _, q in quantizers(model) if weights or q.role != WEIGHT]
    for q, _ in saved:
        q.enabled = False
    try:
        yield model
    finally:
        for q, enabled in saved:
            q.enabled = enabled


# The smallest step training may leave: LSQQuantizer's forward clamps a step at float32's tiny, below which no
# gradient flows, so a step that an optimizer update pushes through zero would stay there for good, its channel
# quantized to zeros and its checkpoint refused by check_steps. Measured: the demo W4A4 student (AdamW, lr 2e-4,
# one epoch) drove one of 384 per-channel qkv weight steps to -1.0e-3. At this floor every code saturates, so the
# step's gradient (qmax or qmin per element) is alive and the step can grow back.
MIN_STEP = 1e-8


def clamp_steps(model: nn.Module) -> None:
    """Keep every learned step at or above MIN_STEP (after each optimizer update)."""
    import torch

    with torch.no_grad():
        for _, q in quantizers(model):
            q.step.clamp_(min=MIN_STEP)


def check_steps(model: nn.Module, source: str) -> None:
    """Refuse a calibrated quantizer whose step is zero, negative, NaN or infinite (a damaged checkpoint or a
    broken calibration: such a step exports as a scale of 1.2e-38 or inf), naming the quantizer."""
    import torch

    for name, q in quantizers(model):
        if not q.initialized:
            continue
        step = q.step.detach()
        bad = ~torch.isfinite(step) | (step <= 0)
        if bool(bad.any()):
            value = step.reshape(-1)[bad.reshape(-1)][0].item()
            raise QvitError(f"{source}: quantizer '{name}' has step {value!r} ({int(bad.sum())} of {step.numel()} "
                            "bad); a step must be a positive finite number: recalibrate or retrain")
