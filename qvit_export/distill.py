"""Distribution-Guided Distillation (DGD, Q-ViT §3.3): match the student's query and key similarity
structure to the full-precision teacher's.

For every attention layer l and head h, a similarity matrix G (N × N over tokens) of q and of k, in one of three
forms (``DGD_FORMS``, recipe key ``dgd_form``):
    'cosine'    rows of q ℓ2-normalised over head_dim first, then G = q̂ q̂ᵀ (token-by-token cosines; ours, and
                what every run before the forms existed trained);
    'gram-row'  G = q qᵀ, then each row of G ℓ2-normalised: the similarity-preserving distillation form (Tung &
                Mori, 2019) that the paper cites for its "G = q·qᵀ, then ℓ2 normalisation";
    'gram'      G = q qᵀ, then the whole matrix ℓ2 (Frobenius) normalised, as one public re-implementation reads it;
    L_DGD = Σ_l Σ_h ‖G_q^S − G_q^T‖₂ + ‖G_k^S − G_k^T‖₂   (Frobenius norm; mean over the batch)
The student's q and k are what its attention multiplies: the outputs of its q/k quantizers (after IRM and,
for q, the folded 1/sqrt(d) scale, which every form's normalisation removes). The teacher is the FP model in the
same quantizable form with every quantizer off, so the same taps exist on both sides.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import DGD_FORMS
from .errors import QvitError
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


def _normalised(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` divided by its ℓ2 norm over ``dims``; where that norm is 0 (a row or matrix quantized to all zeros,
    common at 2 bits) the result is 0 and passes no gradient. (F.normalize would divide by its eps there and send
    1e12-sized gradients into the model.) The mask multiplies, by exactly 1 or 0: torch.where with a broadcast
    condition and a tensor of zeros took a quarter of a DGD student's step on the CPU (measured on the deep probe)."""
    norm = x.norm(dim=dims, keepdim=True)
    return x / norm.clamp_min(1e-12) * (norm > 0)


def similarity(x: torch.Tensor, form: str = "cosine") -> torch.Tensor:
    """The DGD similarity matrix per head (the module docstring's forms): [B, H, N, D] → [B, H, N, N]. Computed in
    float32 under AMP too (float64 stays float64)."""
    if form not in DGD_FORMS:
        raise QvitError(f"dgd_form={form!r} is unknown: choose one of {', '.join(DGD_FORMS)}")
    with torch.autocast(x.device.type, enabled=False):
        x = x if x.dtype == torch.float64 else x.float()
        if form == "cosine":
            x = _normalised(x, (-1,))
            return x @ x.transpose(-2, -1)
        gram = x @ x.transpose(-2, -1)
        return _normalised(gram, (-1,) if form == "gram-row" else (-2, -1))


def layer_distance(student: torch.Tensor, teacher: torch.Tensor, form: str = "cosine") -> torch.Tensor:
    """Σ_h ‖G^S − G^T‖_F for one layer's q (or k), averaged over the batch; no gradient into the teacher."""
    diff = similarity(student, form) - similarity(teacher.detach(), form)
    return diff.flatten(2).norm(dim=-1).sum(dim=1).mean()


def dgd_loss(student: QKTap, teacher: QKTap, form: str = "cosine") -> torch.Tensor:
    """L_DGD over all layers and heads, averaged over the batch; the teacher side carries no gradient."""
    if len(student.q) != len(teacher.q) or len(student.k) != len(teacher.k):
        raise ValueError(f"student has {len(student.q)} attention layers tapped, teacher {len(teacher.q)}: "
                         "DGD needs the same depth on both sides")
    total = student.q[0].new_zeros((), dtype=torch.float32)
    for s_side, t_side in ((student.q, teacher.q), (student.k, teacher.k)):
        for s, t in zip(s_side, t_side, strict=True):
            total = total + layer_distance(s, t, form)
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
