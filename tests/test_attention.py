"""Attention diagnostics (qvit-report --attention) on the demo ViT: one finite entry per block, code entropy
within the bit width, zero everywhere for a student that computes what its teacher computes, and the
attention distance by hand."""
import json

import pytest
import torch

from qvit_export import QuantConfig, calibrate, quantize, quantizers_disabled, save_checkpoint
from qvit_export.attention import attention_diagnostics, attention_distance, code_entropy
from qvit_export.families import family_for_model
from qvit_export.cli import _run, report_main
from qvit_export.config import DGD_FORMS


@pytest.fixture(scope="module")
def w2a2_student(fmnist_teacher, fmnist_calibration):
    return calibrate(quantize(fmnist_teacher, QuantConfig(w_bits=2, a_bits=2, irm="head")), fmnist_calibration,
                     irm_steps=10, progress=False)


@pytest.fixture(scope="module")
def images(fmnist_test):
    return torch.stack([fmnist_test[i][0] for i in range(120)])


def test_one_finite_entry_per_block_and_entropy_within_the_bits(w2a2_student, fmnist_teacher, images, figures):
    entries = attention_diagnostics(w2a2_student, fmnist_teacher, images, batch_size=50, progress=False)
    assert [e["block"] for e in entries] == [f"blocks.{i}.attn" for i in range(len(fmnist_teacher.blocks))]
    for e in entries:
        assert e["q_bits"] == 2 and 0 < e["q_entropy"] <= 2 and 0 < e["k_entropy"] <= 2
        assert e["attn_kl"] > 0 and e["dgd"] > 0 and e["dgd"] == e["dgd_forms"]["cosine"]
        assert set(e["dgd_forms"]) == set(DGD_FORMS) and all(v > 0 for v in e["dgd_forms"].values())
        # 4x4 patches on a 7x7 grid: distances from 0 to 6·√2·4 = 33.9 pixels
        assert 0 < e["attn_distance"] < 34 and 0 < e["attn_distance_fp"] < 34
        assert len(e["attn_distance_heads"]) == len(e["attn_distance_fp_heads"]) == fmnist_teacher.blocks[0].attn.num_heads
    figures("attention diagnostics, demo teacher W2A2 PTQ + IRM head (120 test images): " + "; ".join(
        f"{e['block']} H(q) {e['q_entropy']:.2f} H(k) {e['k_entropy']:.2f} bits, KL {e['attn_kl']:.3f} bits, distance "
        f"{e['attn_distance']:.1f} vs FP {e['attn_distance_fp']:.1f} px" for e in entries))


def test_a_student_that_computes_the_teachers_maths_differs_by_nothing(w2a2_student, fmnist_teacher, images):
    """Quantizers off and IRM 'blend' at its start: the student is the teacher bit for bit, so every difference is 0
    exactly and both attention distances are the same number."""
    twin = quantize(fmnist_teacher, QuantConfig(w_bits=2, a_bits=2, irm="blend"))
    with quantizers_disabled(twin):
        entries = attention_diagnostics(twin, fmnist_teacher, images, batch_size=50, progress=False)
    for e in entries:
        assert e["q_entropy"] is None and e["k_entropy"] is None and e["q_bits"] is None  # nothing quantized
        assert e["attn_kl"] == 0.0 and all(v == 0.0 for v in e["dgd_forms"].values())
        assert e["attn_distance"] == e["attn_distance_fp"]


def test_attention_distance_and_entropy_by_hand(fmnist_teacher):
    student = quantize(fmnist_teacher, QuantConfig(irm=False))
    positions, prefix = family_for_model(student).patch_positions(student)
    assert prefix == 1 and positions.shape == (49, 2) and positions[8].tolist() == [4.0, 4.0]  # row 1, column 1
    distances = torch.cdist(positions, positions)
    tokens = 50
    uniform = torch.full((3, 2, tokens, tokens), 1.0 / tokens)  # CLS included: it is left out and rows renormalised
    assert torch.allclose(attention_distance(uniform, distances, prefix) / 3, distances.mean().expand(2))
    own = torch.eye(tokens).expand(1, 1, tokens, tokens)  # every patch attends to itself: distance 0
    assert attention_distance(own, distances, prefix).item() == 0.0
    assert code_entropy(torch.tensor([5, 5, 5, 5])) == 2.0 and code_entropy(torch.tensor([0, 9, 0, 0])) == 0.0


def test_qvit_report_attention_writes_json_and_png(w2a2_student, fmnist_teacher_ckpt, tmp_path, capsys):
    student = save_checkpoint(tmp_path / "w2a2.pt", w2a2_student, extra={"dataset": "fashion-mnist"})
    out = tmp_path / "attention.json"
    args = ["--ckpt", str(student), "--attention", "--teacher", str(fmnist_teacher_ckpt), "--data", "fashion-mnist",
            "--images", "64", "--json", str(out)]
    assert _run(report_main, args) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.attn" in printed and "64 images of fashion-mnist" in printed
    data = json.loads(out.read_text())
    assert data["images"] == 64 and data["dgd_form"] == "cosine" and len(data["attention"]) == 2
    assert data["w_bits"] == 2 and out.with_suffix(".png").stat().st_size > 10_000  # the OPs report is kept too
    assert _run(report_main, ["--ckpt", str(student), "--attention"]) == 2
    assert "give --ckpt STUDENT and --teacher TEACHER" in capsys.readouterr().err
    assert _run(report_main, ["--ckpt", str(fmnist_teacher_ckpt), "--attention", "--teacher",
                              str(fmnist_teacher_ckpt)]) == 2
    assert "needs a quantized student" in capsys.readouterr().err
