"""DGD: zero for identical teacher and student, positive otherwise, gradient only into the student."""
import pytest
import torch

from qvit_export import QuantConfig, calibrate, quantize, quantizers_disabled
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
