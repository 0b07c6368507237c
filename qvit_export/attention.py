"""Attention diagnostics: where low-bit attention breaks, block by block, against the FP teacher.

For every attention block of a quantized student, on the same images through the student and its FP teacher:
- ``q_entropy``, ``k_entropy``: the entropy in bits of the student's quantized q and k codes (the integers its
  q/k quantizers emit, over every element of every image). The paper's argument for IRM: quantization squeezes
  q and k into few codes, and IRM keeps them spread (more information). At most ``q_bits`` (2^bits codes); None
  when that quantizer is off (a group left out, quant_groups).
- ``attn_kl``: KL(teacher ‖ student) of each query's attention row, in bits, mean over queries, heads and
  images. The student's rows are its softmax output (what its attention quantizer then rounds): at 2 bits most
  quantized probabilities are 0, whose KL would be infinite.
- ``attn_distance``, ``attn_distance_fp``: the mean attention distance of the student and of the teacher, in
  input pixels (ViT, Dosovitskiy et al. 2021): for each patch query, Σ_j a_ij · |pos_i − pos_j| over the patch
  keys (class/distillation tokens left out, the row renormalised over the patches), mean over queries and
  images; per head in ``*_heads``, their mean in the field itself. The paper shows it collapsing in the 2-bit
  baseline and restored by Q-ViT. None for Swin's window attention (no image-wide positions).
- ``dgd``: the DGD distance of this block (distill.layer_distance, q plus k, mean over images) in the chosen
  form, and ``dgd_forms`` in every form.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DGD_FORMS
from .errors import QvitError
from .families import family_for_model
from .layers import QuantAttentionMixin
from .lsq import LSQQuantizer

DIAGNOSTICS = ("q_entropy", "k_entropy", "attn_kl", "attn_distance", "attn_distance_fp", "dgd")


class _Recorder:
    """Per attention block, for one forward: the q and k quantizers' inputs and outputs, and the softmax output
    (the attention quantizer's input)."""

    def __init__(self, model: nn.Module):
        self.blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantAttentionMixin)]
        if not self.blocks:
            raise QvitError("attention diagnostics need a quantized model (qvit_export.quantize): this one has no "
                            "quantized attention")
        self.seen: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks = []

    def __enter__(self) -> "_Recorder":
        for name, attn in self.blocks:
            attn.force_explicit = True  # the fused path has no q, k or attention to look at
            slot = self.seen.setdefault(name, {})

            def record(part, transpose=False, slot=slot):
                def hook(module, inputs, output):
                    x, y = inputs[0].detach(), output.detach()
                    slot[part + "_in"], slot[part] = (x.transpose(-2, -1), y.transpose(-2, -1)) if transpose else (x, y)
                return hook

            self._hooks.append(attn.q_quantizer.register_forward_hook(record("q")))
            self._hooks.append(attn.k_quantizer.register_forward_hook(record("k", transpose=True)))
            self._hooks.append(attn.attn_quantizer.register_forward_hook(record("attn")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        for _, attn in self.blocks:
            attn.force_explicit = False


def attention_distance(attn: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean attention distance per head, summed over the batch: attn [B, H, N, N] → [H] (divide by B)."""
    patches = attn[:, :, prefix:, prefix:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (patches * distances).sum(dim=-1).mean(dim=-1).sum(dim=0)


def kl_bits(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of the mean over heads and queries of KL(teacher row ‖ student row), in bits."""
    p, q = teacher.double(), student.double()
    terms = torch.where(p > 0, p * (torch.log2(p.clamp_min(1e-300)) - torch.log2(q.clamp_min(1e-300))),
                        torch.zeros_like(p))
    return terms.sum(dim=-1).mean(dim=(1, 2)).sum()


def code_entropy(counts: torch.Tensor) -> float:
    """Entropy in bits of a histogram of codes."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def _code_counts(q: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    codes = q.int_codes(x).reshape(-1) - q.qmin
    return torch.bincount(codes.cpu(), minlength=q.qmax - q.qmin + 1)


@torch.no_grad()
def attention_diagnostics(student: nn.Module, teacher: nn.Module, images: torch.Tensor, batch_size: int = 100,
                          dgd_form: str = "cosine", progress: bool = True) -> list[dict]:
    """One entry per attention block of ``student`` (the module docstring's fields), measured on ``images``.
    ``teacher``: the FP model (a timm model or our FP checkpoint, loaded); it is not changed."""
    import copy

    from .distill import layer_distance
    from .quantize import quantizers
    from .trainer import frozen_fp_teacher

    if dgd_form not in DGD_FORMS:
        raise QvitError(f"dgd_form={dgd_form!r} is unknown: choose one of {', '.join(DGD_FORMS)}")
    if any(True for _ in quantizers(teacher)):
        raise QvitError("the teacher is quantized: give the FP model the student was trained from")
    fp = frozen_fp_teacher(copy.deepcopy(teacher))
    student_rec, teacher_rec = _Recorder(student), _Recorder(fp)
    if [n for n, _ in student_rec.blocks] != [n for n, _ in teacher_rec.blocks]:
        raise QvitError("the student and the teacher have different attention blocks: give the teacher the student "
                        "was trained from")
    geometry = family_for_model(student).patch_positions(student)
    distances = None if geometry is None else torch.cdist(geometry[0], geometry[0])
    prefix = 0 if geometry is None else geometry[1]
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    fp.to(device)
    sums: dict[str, dict] = {name: {"q_counts": None, "k_counts": None, "kl": 0.0, "dist": 0.0, "dist_fp": 0.0,
                                    "dgd": dict.fromkeys(DGD_FORMS, 0.0)} for name, _ in student_rec.blocks}
    total = 0
    batches = images.split(batch_size)
    try:
        with student_rec, teacher_rec:
            for x in tqdm(batches, desc="attention", unit="batch", leave=False, disable=not progress):
                x = x.to(device)
                student(x)
                fp(x)
                total += x.shape[0]
                for name, attn in student_rec.blocks:
                    s, t, acc = student_rec.seen[name], teacher_rec.seen[name], sums[name]
                    for part, quantizer in (("q", attn.q_quantizer), ("k", attn.k_quantizer)):
                        if quantizer.enabled:
                            counts = _code_counts(quantizer, s[part + "_in"])
                            key = part + "_counts"
                            acc[key] = counts if acc[key] is None else acc[key] + counts
                    acc["kl"] += float(kl_bits(t["attn_in"], s["attn_in"]))
                    if distances is not None:
                        d = distances.to(device)
                        acc["dist"] = acc["dist"] + attention_distance(s["attn_in"], d, prefix).cpu()
                        acc["dist_fp"] = acc["dist_fp"] + attention_distance(t["attn_in"], d, prefix).cpu()
                    for form in DGD_FORMS:
                        value = layer_distance(s["q"], t["q"], form) + layer_distance(s["k"], t["k"], form)
                        acc["dgd"][form] += float(value) * x.shape[0]
    finally:
        student.train(was_training)
    if total == 0:
        raise QvitError("attention diagnostics got no images: give at least one")
    out = []
    for name, attn in student_rec.blocks:
        acc = sums[name]
        entry = {"block": name, "q_bits": attn.q_quantizer.bits if attn.q_quantizer.enabled else None,
                 "q_entropy": code_entropy(acc["q_counts"]) if acc["q_counts"] is not None else None,
                 "k_entropy": code_entropy(acc["k_counts"]) if acc["k_counts"] is not None else None,
                 "attn_kl": acc["kl"] / total}
        if distances is not None:
            heads, heads_fp = (acc["dist"] / total).tolist(), (acc["dist_fp"] / total).tolist()
            entry |= {"attn_distance": sum(heads) / len(heads), "attn_distance_fp": sum(heads_fp) / len(heads_fp),
                      "attn_distance_heads": heads, "attn_distance_fp_heads": heads_fp}
        else:
            entry |= {"attn_distance": None, "attn_distance_fp": None}
        entry |= {"dgd": acc["dgd"][dgd_form] / total, "dgd_form": dgd_form,
                  "dgd_forms": {form: v / total for form, v in acc["dgd"].items()}}
        out.append(entry)
    for entry in out:  # finite by construction; a NaN here means a broken model, which the user must hear about
        for key in ("q_entropy", "k_entropy", "attn_kl", "attn_distance", "attn_distance_fp", "dgd"):
            if entry[key] is not None and not math.isfinite(entry[key]):
                raise QvitError(f"{entry['block']}: {key} is {entry[key]} (the student's outputs are not finite?): "
                                "check the checkpoint with qvit-eval")
    return out


def summary(entries: list[dict]) -> dict:
    """Means over the blocks (None where a field is None in any block)."""
    def mean(key):
        values = [e[key] for e in entries]
        return None if any(v is None for v in values) else sum(values) / len(values)

    return {key: mean(key) for key in DIAGNOSTICS}


def table(entries: list[dict]) -> str:
    """The diagnostics as a plain-text table, one row per block."""
    def cell(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"{'block':<22} {'H(q) bits':>9} {'H(k) bits':>9} {'KL bits':>8} {'dist':>7} {'dist FP':>7} {'DGD':>8}"]
    for e in entries + [{"block": "mean"} | summary(entries)]:
        lines.append(f"{e['block']:<22} {cell(e['q_entropy']):>9} {cell(e['k_entropy']):>9} {cell(e['attn_kl']):>8} "
                     f"{cell(e['attn_distance'], '{:.2f}'):>7} {cell(e['attn_distance_fp'], '{:.2f}'):>7} "
                     f"{cell(e['dgd']):>8}")
    return "\n".join(lines)


def plot(entries: list[dict], path, title: str = "") -> None:
    """Four panels over the blocks: q/k code entropy against the bit width, attention KL from the teacher,
    attention distance per head of student and teacher, DGD distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    x = list(range(len(entries)))
    labels = [e["block"].replace(".attn", "") for e in entries]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    for key, marker in (("q_entropy", "o-"), ("k_entropy", "s-")):
        values = [e[key] for e in entries]
        if all(v is not None for v in values):
            ax.plot(x, values, marker, label=key.replace("_", " ") + " (bits)")
    bits = {e["q_bits"] for e in entries if e["q_bits"] is not None}
    for b in bits:
        ax.axhline(b, color="k", ls="--", lw=1, label=f"{b} bits: the most {2 ** b} codes hold")
    ax.set_ylim(0, max(bits, default=1) + 0.2)
    ax.set_title("quantized q/k code entropy")
    ax.legend(fontsize=7)
    axes[1].plot(x, [e["attn_kl"] for e in entries], "o-", color="tab:red")
    axes[1].set_title("KL(teacher ‖ student) of attention rows (bits)")
    ax = axes[2]
    if all(e["attn_distance"] is not None for e in entries):
        for i, e in enumerate(entries):
            heads, heads_fp = e["attn_distance_heads"], e["attn_distance_fp_heads"]
            ax.scatter([i - 0.1] * len(heads_fp), heads_fp, color="k", s=14, label="teacher (per head)" if i == 0 else None)
            ax.scatter([i + 0.1] * len(heads), heads, color="tab:blue", s=14, label="student (per head)" if i == 0 else None)
        ax.plot(x, [e["attn_distance_fp"] for e in entries], "k--", lw=1)
        ax.plot(x, [e["attn_distance"] for e in entries], "-", color="tab:blue", lw=1)
        ax.legend(fontsize=7)
    ax.set_title("mean attention distance (pixels)")
    axes[3].plot(x, [e["dgd"] for e in entries], "o-", color="tab:green")
    axes[3].set_title(f"DGD distance ({entries[0]['dgd_form']}, q + k)")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=45, fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
