"""Checkpoints: round trip, weights_only loading, and one clear line for every bad file."""
import argparse
import pickle
import subprocess
import sys

import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, create_model, load_checkpoint, quantize, save_checkpoint
from qvit_export.checkpoint import FORMAT, read_checkpoint
from qvit_export.config import DEFAULT_IRM


@pytest.fixture
def quantized(small_vit, fmnist_calibration):
    return calibrate(quantize(small_vit, QuantConfig(w_bits=3, a_bits=3, irm=True)), fmnist_calibration[:1], irm_steps=2)


def _one_line_error(path, match):
    with pytest.raises(QvitError, match=match) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_round_trip_gives_identical_logits(quantized, small_vit, fmnist_calibration, tmp_path):
    x = fmnist_calibration[0][:64]
    for model in (quantized, small_vit):
        path = save_checkpoint(tmp_path / "m.pt", model, metrics={"top1": 12.5})
        loaded = load_checkpoint(path)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert loaded.qvit_checkpoint["metrics"] == {"top1": 12.5}
        assert getattr(loaded, "qvit_config", None) == getattr(model, "qvit_config", None)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary files left


def test_checkpoint_is_plain_data(quantized, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", quantized)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["model"]["name"] == "vit_tiny_patch16_224"
    assert raw["quant"]["w_bits"] == 3 and raw["quant"]["irm"] == DEFAULT_IRM  # the variant by name, not True
    assert raw["state_dict"]["blocks.0.attn.q_quantizer._extra_state"]["bits"] == 3


def test_file_that_needs_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": argparse.Namespace(a=1)}, path)  # any non-allowlisted class
    _one_line_error(path, "needs pickle")


def test_missing_truncated_corrupt_and_foreign_files(quantized, tmp_path):
    _one_line_error(tmp_path / "nope.pt", "checkpoint not found")
    good = save_checkpoint(tmp_path / "good.pt", quantized)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "truncated.pt", "truncated or not a PyTorch file")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 64)
    _one_line_error(tmp_path / "noise.pt", "truncated or not a PyTorch file")
    torch.save(quantized.state_dict(), tmp_path / "bare.pt")
    _one_line_error(tmp_path / "bare.pt", "not a qvit-export checkpoint")
    raw = torch.load(good, weights_only=True)
    torch.save(raw | {"version": 99}, tmp_path / "future.pt")
    _one_line_error(tmp_path / "future.pt", "format version 99")


def test_checkpoint_for_another_model_is_refused(quantized, tmp_path):
    raw = torch.load(save_checkpoint(tmp_path / "good.pt", quantized), weights_only=True)
    torch.save(raw | {"model": {"name": "test_vit", "kwargs": {}}}, tmp_path / "other.pt")
    _one_line_error(tmp_path / "other.pt", "does not match test_vit")
    kwargs = dict(raw["model"]["kwargs"], embed_dim=48)
    torch.save(raw | {"model": {"name": raw["model"]["name"], "kwargs": kwargs}}, tmp_path / "shape.pt")
    _one_line_error(tmp_path / "shape.pt", "size mismatch")
    torch.save(raw | {"quant": dict(raw["quant"], w_bits=8)}, tmp_path / "bits.pt")
    _one_line_error(tmp_path / "bits.pt", "8-bit but the state dict holds a 3-bit")


def test_failed_save_leaves_nothing_behind(quantized, tmp_path):
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(tmp_path / "m.pt", quantized, extra={"not data": lambda: None})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_the_folders_it_made(tmp_path):
    from qvit_export.atomic import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a" / "b" / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_damaged_payloads_are_one_line(quantized, tmp_path):
    raw = torch.load(save_checkpoint(tmp_path / "good.pt", quantized), weights_only=True)
    torch.save(raw | {"model": {"kwargs": {}}}, tmp_path / "noname.pt")
    _one_line_error(tmp_path / "noname.pt", "well-formed model name")
    data = bytearray((tmp_path / "good.pt").read_bytes())
    for i in range(200, len(data), 997):  # flip bytes throughout: zip records, pickle, tensor storage
        data[i] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(QvitError) as err:
        load_checkpoint(tmp_path / "flipped.pt")
    assert "\n" not in str(err.value)


def test_save_reads_the_architecture_timm_recorded(tmp_path):
    import timm

    path = save_checkpoint(tmp_path / "m.pt", timm.create_model("test_vit", num_classes=7))
    assert read_checkpoint(path)["model"] == {"name": "test_vit", "kwargs": {"num_classes": 7}}
    path = save_checkpoint(tmp_path / "m.pt", timm.create_model("test_vit"), model_name="test_vit")
    assert read_checkpoint(path)["model"] == {"name": "test_vit", "kwargs": {}}
    bare = timm.create_model("test_vit")
    bare.pretrained_cfg = {}
    with pytest.raises(QvitError, match="model_name="):
        save_checkpoint(tmp_path / "n.pt", bare)


def test_timm_weights_file_loads_through_create_model(tmp_path):
    src = create_model("test_vit")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model("test_vit", weights=tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True))


def test_missing_dataset_is_one_line_and_nonzero_exit(tmp_path):
    env = {"QVIT_FASHION_MNIST": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "qvit_export.demo", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], run.stderr
    assert not (tmp_path / "w" / "fp_teacher.pt").exists()
