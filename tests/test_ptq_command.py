"""qvit-quantize: post-training quantization in one command, from timm weights or our FP checkpoint, to a checkpoint
that qvit-export takes (and straight on to ONNX and an engine)."""
import json

import onnx
import pytest
import timm
import torch

from qvit_export import QuantConfig, load_checkpoint, read_checkpoint
from qvit_export.calibration_set import read_manifest
from qvit_export.demo import ptq
from qvit_export.evaluation import evaluate

from test_cli import run

RTX = ["--target", "tensorrt-rtx", "--compute-capability", "sm89"]


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_demo_teacher_w8a8_equals_the_api(fmnist_teacher_ckpt, fmnist_teacher, fmnist_test, tmp_path, figures):
    """The command and calibrate() on the same manifest give the same checkpoint, hence the same accuracy;
    qvit-export takes it as it is and proves parity."""
    out = tmp_path / "w8a8.pt"
    r = run("qvit_quantize", "--weights", fmnist_teacher_ckpt, "--bits", 8, "--calib", "fashion-mnist", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibrated vit_tiny_patch16_224 W8A8 on fashion-mnist (1024 images" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8.pt"]  # a manifest by name: nothing else written
    command = load_checkpoint(out)
    api = ptq(fmnist_teacher, QuantConfig(w_bits=8, a_bits=8, irm=False), "fashion-mnist")
    a, b = command.state_dict(), api.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    top1 = {name: evaluate(m, fmnist_test, progress=False)["top1"] for name, m in (("command", command), ("api", api))}
    figures(f"qvit-quantize W8A8 (demo teacher, calib/fashion-mnist.json): top-1 {top1['command']:.2f}%, "
            f"calibrate() API {top1['api']:.2f}%")
    assert top1["command"] == top1["api"]
    manifest = read_manifest("fashion-mnist")
    extra = read_checkpoint(out)["extra"]
    assert extra["calibration"] == manifest.record() and extra["dataset"] == "fashion-mnist"
    e = run("qvit_export", "--ckpt", out, "--onnx", tmp_path / "w8a8.onnx", "--parity-images", 1000)
    assert e.returncode == 0, e.stderr[-2000:]
    assert "parity data: 1000 images of fashion-mnist" in e.stdout
    meta = _metadata(tmp_path / "w8a8.onnx")
    assert json.loads(meta["calibration"])["sha256"] == manifest.sha256
    assert json.loads((tmp_path / "w8a8.parity.json").read_text())["top1_agreement"] >= 99.9


@pytest.fixture(scope="module")
def deit_weights(tmp_path_factory):
    """A timm DeiT-tiny weights file with its own 10-class head (random init: no hub here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "deit_tiny_10.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), path)
    return path


@pytest.mark.slow  # exports a full-size model
def test_timm_weights_on_photos_to_an_engine(deit_weights, tmp_path, figures):
    """The two commands of the README: timm weights with their own head (num_classes read from the file) ->
    qvit-quantize on the photographs -> qvit-export with parity and an SM89 plan whose every quantized GEMM,
    qkv included (W8A8 without IRM), runs on INT8."""
    out = tmp_path / "deit_w8a8.pt"
    r = run("qvit_quantize", "--model", "deit_tiny_patch16_224", "--weights", deit_weights, "--bits", 8,
            "--calib", "photos", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = read_checkpoint(out)
    assert ckpt["model"] == {"name": "deit_tiny_patch16_224", "kwargs": {"num_classes": 10}}
    assert ckpt["extra"]["calibration"]["name"] == "photos"
    plan = tmp_path / "deit_w8a8.plan"
    e = run("qvit_export", "--ckpt", out, "--engine", plan, *RTX)
    assert e.returncode == 0, e.stderr[-2000:]
    assert "parity data: 17 scikit-image photographs" in e.stdout and "top-1 agreement 100.000%" in e.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit_w8a8.build.json", "deit_w8a8.onnx",
                                                          "deit_w8a8.parity.json", "deit_w8a8.plan", "deit_w8a8.pt"]
    summary = json.loads((tmp_path / "deit_w8a8.build.json").read_text())["anatomy"]["summary"]
    figures("qvit-quantize deit_tiny W8A8 (photos) -> qvit-export SM89: " + next(
        ln for ln in e.stdout.splitlines() if ln.startswith("anatomy:")))
    assert summary["float_gemms"] == 0 and summary["unmatched"] == 0
    meta = _metadata(tmp_path / "deit_w8a8.onnx")
    assert json.loads(meta["calibration"])["sha256"] == read_manifest("photos").sha256
    from qvit_export.onnx_export import file_sha256

    assert meta["checkpoint"] == "deit_w8a8.pt" and meta["checkpoint_sha256"] == file_sha256(out)


SMALL_RGB = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def test_image_folder_draws_and_writes_its_manifest(photo_folder, tmp_path):
    """--calib FOLDER draws a class-balanced set and writes it beside the checkpoint, in the same transaction; a
    model built at another size than its architecture's (--model-arg) gets timm's eval transform at its size."""
    torch.manual_seed(0)
    weights = tmp_path / "small_vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=2, **SMALL_RGB).state_dict(), weights)
    out = tmp_path / "out" / "w4a8.pt"
    args = [arg for key, value in SMALL_RGB.items() for arg in ("--model-arg", f"{key}={value}")]
    r = run("qvit_quantize", "--model", "vit_tiny_patch16_224", "--weights", weights, *args, "--w-bits", 4,
            "--a-bits", 8, "--calib", photo_folder, "--calib-images", 8, "--seed", 3, "--out", out,
            "--onnx", out.with_suffix(".onnx"), "--parity-data", photo_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    drawn = out.with_name("w4a8.calib.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4a8.calib.json", "w4a8.onnx", "w4a8.parity.json",
                                                            "w4a8.pt"]
    manifest = read_manifest(drawn)
    assert len(manifest.images) == 8 and sorted({e.label for e in manifest.images}) == ["colour", "grey"]
    ckpt = read_checkpoint(out)
    assert ckpt["extra"]["calibration"] == manifest.record()
    assert ckpt["model"]["kwargs"] == SMALL_RGB | {"num_classes": 2}  # num_classes read from the weights
    assert "parity data: 17 images of" in r.stdout
    assert run("qvit_calib", "verify", drawn).returncode == 0
    # the same draw from the library: the same manifest
    from qvit_export.calibration_set import FolderSource, draw

    assert draw(FolderSource(photo_folder), 8, seed=3, balanced=True, progress=False).to_json() == drawn.read_text()


def test_engine_on_the_same_command(fmnist_teacher_ckpt, tmp_path):
    """--engine goes on to the TensorRT-RTX plan; the whole set is written together."""
    r = run("qvit_quantize", "--weights", fmnist_teacher_ckpt, "--bits", 4, "--irm", "--irm-steps", 20, "--calib",
            "fashion-mnist", "--out", tmp_path / "w4a4.pt", "--engine", tmp_path / "w4a4.plan", *RTX,
            "--parity-images", 500)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4a4.build.json", "w4a4.onnx", "w4a4.parity.json",
                                                           "w4a4.plan", "w4a4.pt"]
    summary = json.loads((tmp_path / "w4a4.build.json").read_text())["anatomy"]["summary"]
    assert summary["float_gemms"] == 0 and summary["unmatched"] == 0 and summary["int8_gemms"] >= 14
    assert "anatomy:" in r.stdout


def test_per_block_weight_steps_to_an_int4_engine(fmnist_teacher_ckpt, tmp_path):
    """--w-block 64: per-block weight steps, refused before any work unless the export is INT4 in the same blocks;
    then the checkpoint, the INT4 graph (each block its own step) and the TensorRT-RTX plan as one set."""
    from onnx import numpy_helper

    base = ["--weights", fmnist_teacher_ckpt, "--w-bits", 4, "--a-bits", 8, "--w-block", 64, "--calib",
            "fashion-mnist", "--out", tmp_path / "blocks.pt"]
    refused = run("qvit_quantize", *base, "--onnx", tmp_path / "blocks.onnx")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: --w-block 64 weights deploy only as INT4 blocks of 64: add --precision int4 (or int4-weight-only) "
        "--int4-block 64, or drop --w-block")
    assert list(tmp_path.iterdir()) == []
    r = run("qvit_quantize", *base, "--precision", "int4", "--engine", tmp_path / "blocks.plan", *RTX,
            "--parity-images", 500)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_checkpoint(tmp_path / "blocks.pt")["quant"]["w_block"] == 64
    graph = onnx.load(str(tmp_path / "blocks.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    blocked = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 8 and all(not (inits[n.input[1]] == inits[n.input[1]][:1]).all() for n in blocked)
    parity = json.loads((tmp_path / "blocks.parity.json").read_text())
    assert parity["images"] == 500 and parity["weights_identical"] and parity["top1_agreement"] >= 99.8
    summary = json.loads((tmp_path / "blocks.build.json").read_text())["anatomy"]["summary"]
    assert summary["float_gemms"] == 0 and summary["unmatched"] == 0
