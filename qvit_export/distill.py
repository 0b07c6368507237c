"""Distribution-Guided Distillation (DGD, Q-ViT §3.3): match the student's query and key similarity
structure to the full-precision teacher's.

For every attention layer l and head h, with rows ℓ2-normalised over head_dim:
    G_q = q̂ q̂ᵀ and G_k = k̂ k̂ᵀ   (N × N over tokens)
    L_DGD = Σ_l Σ_h ‖G_q^S − G_q^T‖₂ + ‖G_k^S − G_k^T‖₂   (Frobenius norm; mean over the batch)
The student's q and k are what its attention multiplies: the outputs of its q/k quantizers (after IRM and,
for q, the folded 1/sqrt(d) scale, which the row normalisation removes). The teacher is the FP model in the same
quantizable form with every quantizer off, so the same taps exist on both sides.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantAttentionMixin


class QKTap:
    """Records (q, k) of every attention layer in forward order: k is stored untransposed, [B, H, N, D]."""

    def __init__(self, model: nn.Module):
        self.attentions = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
        if not self.attentions:
            raise ValueError("DGD needs a quantized model (qvit_export.quantize) to tap its queries and keys")
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self._hooks = []

    def __enter__(self) -> "QKTap":
        for attn in self.attentions:
            attn.force_explicit = True  # an FP teacher would otherwise take timm's fused path, with no q/k to tap
            self._hooks.append(attn.q_quantizer.register_forward_hook(lambda m, i, out: self.q.append(out)))
            self._hooks.append(attn.k_quantizer.register_forward_hook(
                lambda m, i, out: self.k.append(out.transpose(-2, -1))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        for attn in self.attentions:
            attn.force_explicit = False


def similarity(x: torch.Tensor) -> torch.Tensor:
    """Token-by-token cosine similarity per head: [B, H, N, D] → [B, H, N, N].

    A row quantized to all zeros (common at 2 bits) has no direction: its similarities are 0 and it passes no
    gradient. (F.normalize would divide by its eps there and send 1e12-sized gradients into the model.)
    """
    with torch.autocast(x.device.type, enabled=False):  # cosines in float32 under AMP too
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True)
        x = torch.where(norm > 0, x / norm.clamp_min(1e-12), torch.zeros_like(x))
        return x @ x.transpose(-2, -1)


def dgd_loss(student: QKTap, teacher: QKTap) -> torch.Tensor:
    """L_DGD over all layers and heads, averaged over the batch; the teacher side carries no gradient."""
    if len(student.q) != len(teacher.q) or len(student.k) != len(teacher.k):
        raise ValueError(f"student has {len(student.q)} attention layers tapped, teacher {len(teacher.q)}: "
                         "DGD needs the same depth on both sides")
    total = student.q[0].new_zeros((), dtype=torch.float32)
    for s_side, t_side in ((student.q, teacher.q), (student.k, teacher.k)):
        for s, t in zip(s_side, t_side, strict=True):
            diff = similarity(s) - similarity(t.detach())
            total = total + diff.flatten(2).norm(dim=-1).sum(dim=1).mean()
    return total


@contextlib.contextmanager
def tapped(student: nn.Module, teacher: nn.Module):
    """Tap both models for one step: ``with tapped(s, t) as (ts, tt): s(x); t(x); loss = dgd_loss(ts, tt)``."""
    with QKTap(student) as ts, QKTap(teacher) as tt:
        yield ts, tt


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                       tau: float = 1.0) -> torch.Tensor:
    """DeiT's distillation term: 'soft' = KL(teacher ‖ student) at temperature tau (times tau², so gradients
    keep their size), 'hard' = cross-entropy against the teacher's top-1."""
    teacher_logits = teacher_logits.detach().float()
    student_logits = student_logits.float()
    if kind == "soft":
        return F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                        reduction="batchmean", log_target=True) * tau * tau
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    raise ValueError(f"distillation kind {kind!r}: choose soft or hard")
