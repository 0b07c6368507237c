"""DGD: zero for identical teacher and student, positive otherwise, gradient only into the student; each form
(cosine, gram-row, gram) equal to its formula written out."""
import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, quantize, quantizers_disabled
from qvit_export.config import DGD_FORMS
from qvit_export.demo import DEMO_KWARGS
from qvit_export.distill import QKTap, dgd_loss, similarity, tapped

DEPTH, HEADS = DEMO_KWARGS["depth"], DEMO_KWARGS["num_heads"]


@pytest.fixture
def teacher_and_student(small_vit, fmnist_calibration):
    teacher = quantize(small_vit, QuantConfig(irm=False))
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=True)), fmnist_calibration[:1],
                        irm_steps=2)
    return teacher, student


def _teacher_forward(teacher, x):
    with torch.no_grad(), quantizers_disabled(teacher):
        return teacher(x)


def test_dgd_is_zero_for_identical_models(teacher_and_student, fmnist_calibration):
    teacher, _ = teacher_and_student
    x = fmnist_calibration[0][:16]
    with tapped(teacher, teacher) as (a, b):
        _teacher_forward(teacher, x)
        assert len(a.q) == DEPTH  # one (q, k) per block: the same hooks fired for both taps
        assert float(dgd_loss(a, b)) == 0.0


def test_dgd_is_positive_and_trains_only_the_student(teacher_and_student, fmnist_calibration):
    teacher, student = teacher_and_student
    x = fmnist_calibration[0][:16]
    student.train()
    with tapped(student, teacher) as (ts, tt):
        student(x)
        _teacher_forward(teacher, x)
        assert [q.shape for q in ts.q] == [q.shape for q in tt.q] == [torch.Size([16, HEADS, 50, 32])] * DEPTH
        loss = dgd_loss(ts, tt)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    reached = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "blocks.0.attn.q_norm.weight" in reached and f"blocks.{DEPTH - 1}.attn.qkv.weight" in reached
    assert f"blocks.{DEPTH - 1}.attn.k_quantizer.step" in reached
    assert "head.weight" not in reached  # DGD acts on attention only


def test_tap_restores_the_fast_path(teacher_and_student):
    teacher, _ = teacher_and_student
    with QKTap(teacher) as tap:
        assert all(a.force_explicit for a in tap.attentions)
    assert not any(a.force_explicit for a in tap.attentions)


def test_a_row_quantized_to_zero_passes_no_gradient():
    """At 2 bits whole q rows round to 0; F.normalize's eps would turn them into 1e12-sized gradients."""
    x = torch.randn(2, 3, 5, 8)
    x[0, 1, 2] = 0.0
    x.requires_grad_(True)
    g = similarity(x)
    assert torch.all(g[0, 1, 2] == 0) and torch.all(g[0, 1, :, 2] == 0)
    assert torch.allclose(g[1, 0].diagonal(), torch.ones(5))
    g.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 100 and torch.all(x.grad[0, 1, 2] == 0)


# ---- the DGD forms, each against a direct implementation of its formula --------------------------------------

def _direct_similarity(x: torch.Tensor, form: str) -> torch.Tensor:
    """The formulas written out one sample and head at a time, as the paper and the module docstring state them."""
    B, H, N, _ = x.shape
    out = torch.zeros(B, H, N, N, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            rows = x[b, h]
            if form == "cosine":  # q̂ q̂ᵀ with each token's row of q at unit length
                unit = torch.stack([r / torch.sqrt((r * r).sum()) if (r != 0).any() else r for r in rows])
                out[b, h] = unit @ unit.T
                continue
            gram = torch.stack([torch.stack([(rows[i] * rows[j]).sum() for j in range(N)]) for i in range(N)])
            if form == "gram-row":  # each row of G = q qᵀ at unit length
                out[b, h] = torch.stack([g / torch.sqrt((g * g).sum()) if (g != 0).any() else g for g in gram])
            else:  # the whole of G at unit Frobenius norm
                total = torch.sqrt((gram * gram).sum())
                out[b, h] = gram / total if total > 0 else gram
    return out


def _direct_dgd(student_q, student_k, teacher_q, teacher_k, form: str) -> torch.Tensor:
    """Σ_l Σ_h ‖G_S − G_T‖_F over q and k, mean over the batch, one matrix at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for s_side, t_side in ((student_q, teacher_q), (student_k, teacher_k)):
        for s, t in zip(s_side, t_side):
            diff = _direct_similarity(s, form) - _direct_similarity(t, form)
            B, H = diff.shape[:2]
            total = total + sum(torch.sqrt((diff[b, h] ** 2).sum()) for b in range(B) for h in range(H)) / B
    return total


class _Taps:
    def __init__(self, q, k):
        self.q, self.k = q, k


@pytest.mark.parametrize("form", DGD_FORMS)
def test_dgd_form_equals_its_formula(form):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 7, 5)  # batch, heads, tokens, head_dim

    def layers():
        return [torch.randn(shape, generator=gen, dtype=torch.float64) * 3 for _ in range(2)]

    sq, sk, tq, tk = layers(), layers(), layers(), layers()
    sq[0][1, 0, 4] = 0.0  # a query row quantized to zeros: no direction
    for s in sq:
        assert torch.allclose(similarity(s, form), _direct_similarity(s, form), rtol=0, atol=1e-13)
    got = dgd_loss(_Taps(sq, sk), _Taps(tq, tk), form)
    want = _direct_dgd(sq, sk, tq, tk, form)
    assert got.dtype == torch.float64 and abs(got.item() - want.item()) < 1e-12 * want.item()
    # what tells the forms apart: 'cosine' ignores each token's length, 'gram-row' keeps it (a row's length is
    # normalised only after the products), 'gram' keeps the lengths of rows relative to each other
    longer = sq[1].clone()
    longer[:, :, 2] *= 5
    changed = not torch.allclose(similarity(longer, form), similarity(sq[1], form))
    assert changed == (form != "cosine")
    assert torch.allclose(similarity(sq[1] * 7, form), similarity(sq[1], form), atol=1e-13)  # scale-free, all three


@pytest.mark.parametrize("form", ["gram-row", "gram"])
def test_gram_forms_pass_no_gradient_from_a_zero_row(form):
    x = torch.randn(2, 3, 5, 8)
    x[0, 1, 2] = 0.0
    x.requires_grad_(True)
    g = similarity(x, form)
    assert torch.all(g[0, 1, 2] == 0) and torch.all(g[0, 1, :, 2] == 0)
    g.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0, 1, 2] == 0)


def test_cosine_form_is_the_dgd_every_earlier_run_trained(teacher_and_student, fmnist_calibration):
    """The default form is today's maths to the bit: the token cosines of the previous implementation."""
    teacher, student = teacher_and_student
    x = fmnist_calibration[0][:8]
    with torch.no_grad(), tapped(student, teacher) as (ts, tt):
        student(x)
        _teacher_forward(teacher, x)
        for s in ts.q + ts.k:
            s = s.float()
            norm = s.norm(dim=-1, keepdim=True)
            unit = torch.where(norm > 0, s / norm.clamp_min(1e-12), torch.zeros_like(s))
            assert torch.equal(similarity(s), unit @ unit.transpose(-2, -1))
        forms = {form: dgd_loss(ts, tt, form).item() for form in DGD_FORMS}
    assert forms["cosine"] == dgd_loss(ts, tt).item() and len(set(forms.values())) == 3 and min(forms.values()) > 0


def test_unknown_form_is_one_line():
    with pytest.raises(QvitError, match="dgd_form='sp' is unknown: choose one of cosine, gram-row, gram"):
        similarity(torch.ones(1, 1, 2, 2), "sp")
