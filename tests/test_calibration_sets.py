"""Calibration sets as manifests (calib/, qvit-calib): reproducible draws, verification against the data on disk,
and the record of which set calibrated a model."""
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, load_checkpoint, quantize, save_checkpoint
from qvit_export.calibration_set import (FashionMnistSource, FolderSource, draw, read_manifest, shipped_dir,
                                         shipped_names)
from qvit_export.cli import calib_main
from qvit_export.recipe import shipped_recipes

from test_cli import one_error_line, run


def test_shipped_manifests_are_the_checkout_files_and_verify():
    assert shipped_names() == ["fashion-mnist", "photos"]
    # one copy: the package's calib/ is the checkout's calib/ (a link), as its recipes/ is models/
    checkout = Path(__file__).resolve().parent.parent
    assert shipped_dir().resolve() == (checkout / "calib").resolve()
    assert shipped_recipes().resolve() == (checkout / "models").resolve()
    fm = read_manifest("fashion-mnist")
    assert len(fm.images) == 1024 and fm.source == {"kind": "fashion-mnist", "split": "train"}
    assert sorted(Counter(e.label for e in fm.images).values()) == [102] * 6 + [103] * 4
    assert len({e.id for e in fm.images}) == 1024
    fm.verify()
    photos = read_manifest("photos")
    assert len(photos.images) == 17 and photos.images[0].label is None
    photos.verify()


def test_draw_is_byte_identical_and_reproduces_the_shipped_set(tmp_path, capsys):
    outs = []
    for i in range(2):
        out = tmp_path / f"draw{i}.json"
        assert calib_main(["draw", "--source", "fashion-mnist", "--images", "1024", "--seed", "0", "--balanced",
                           "--name", "fashion-mnist", "--out", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] == (shipped_dir() / "fashion-mnist.json").read_bytes()  # calib/ is reproducible from its rule
    other = draw(FashionMnistSource("train"), 1024, seed=1, balanced=True, name="fashion-mnist", progress=False)
    assert other.to_json().encode() != outs[0]
    assert len({e.id for e in other.images} & {e.id for e in read_manifest("fashion-mnist").images}) < 100


def test_manifest_names_images_one_per_line(fmnist_folder, tmp_path):
    """A reviewer reads a manifest in a diff: one image per line, with its path, label and content hash."""
    made = draw(FolderSource(fmnist_folder), 12, seed=0, balanced=True, progress=False)
    lines = made.to_json().splitlines()
    image_lines = [json.loads(ln.strip().rstrip(",")) for ln in lines if ln.strip().startswith('{"id"')]
    assert len(image_lines) == 12 and len(lines) == 12 + 10  # header: 8 lines before the images, 2 after
    assert sorted(Counter(e["label"] for e in image_lines).values()) == [4, 4, 4]
    first = image_lines[0]
    assert (fmnist_folder / first["id"]).is_file() and first["id"].startswith(first["label"] + "/")
    assert first["sha256"] == hashlib.sha256((fmnist_folder / first["id"]).read_bytes()).hexdigest()
    # a bigger draw keeps the ids of a smaller one with the same seed (keys depend on the image alone)
    bigger = draw(FolderSource(fmnist_folder), 30, seed=0, balanced=False, progress=False)
    smaller = draw(FolderSource(fmnist_folder), 10, seed=0, balanced=False, progress=False)
    assert [e.id for e in bigger.images[:10]] == [e.id for e in smaller.images]


def test_verify_refuses_changed_and_missing_images(fmnist_folder, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(fmnist_folder, folder)
    manifest = tmp_path / "set.json"
    assert calib_main(["draw", "--source", str(folder), "--images", "9", "--balanced", "--out", str(manifest)]) == 0
    ok = run("qvit_calib", "verify", manifest)
    assert ok.returncode == 0 and "all 9 images present and unchanged" in ok.stdout, ok.stderr
    made = read_manifest(manifest)
    changed, gone = made.images[0].id, made.images[1].id
    other = next(p for p in sorted(folder.rglob("*.png")) if p.relative_to(folder).as_posix() not in
                 {e.id for e in made.images})
    shutil.copy(other, folder / changed)  # another real image under the same name
    (folder / gone).unlink()
    line = one_error_line(run("qvit_calib", "verify", manifest))
    assert "2 of 9 images missing or changed" in line and f"{changed} changed" in line and f"{gone} missing" in line
    # the images moved elsewhere: --root says where
    moved = tmp_path / "moved"
    shutil.copytree(fmnist_folder, moved)
    assert run("qvit_calib", "verify", manifest, "--root", moved).returncode == 0
    # and the library refuses the changed folder the same way
    with pytest.raises(QvitError, match="2 of 9 images missing or changed"):
        made.verify()


def test_calibrate_records_the_set_in_checkpoint(small_vit, tmp_path):
    qm = calibrate(quantize(small_vit, QuantConfig(w_bits=8, a_bits=8, irm=False)), "fashion-mnist", progress=False)
    expected = read_manifest("fashion-mnist").record()
    assert qm.qvit_calibration == expected
    path = save_checkpoint(tmp_path / "m.pt", qm)
    assert torch.load(path, weights_only=True)["extra"]["calibration"]["sha256"] == expected["sha256"]
    assert load_checkpoint(path).qvit_calibration == expected
    # batches that no manifest names leave no record
    again = calibrate(quantize(small_vit, QuantConfig(w_bits=8, a_bits=8, irm=False)),
                      read_manifest("fashion-mnist").batches(None, progress=False)[:1], progress=False)
    assert again.qvit_calibration is None


def test_manifest_order_is_the_calibration_order(small_vit):
    """calibrate(model, manifest) is calibrate(model, its images in manifest order, in batches of 256)."""
    batches = read_manifest("fashion-mnist").batches(None, 256, progress=False)
    assert [len(b) for b in batches] == [256] * 4
    by_name = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=False)), "fashion-mnist",
                        progress=False)
    by_batches = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=False)), batches, progress=False)
    a, b = by_name.state_dict(), by_batches.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_recipes_take_a_manifest_or_draw_one():
    from qvit_export.recipe import load_recipe
    from qvit_export.trainer import calibration_set

    named = calibration_set(load_recipe("demo_w4a4", {"calibration_set": "fashion-mnist"}), progress=False)
    assert named.to_json() == read_manifest("fashion-mnist").to_json()
    drawn = calibration_set(load_recipe("demo_w4a4", {"calibration_images": 50, "seed": 4}), progress=False)
    assert (len(drawn.images), drawn.rule.seed, drawn.rule.balanced) == (50, 4, True)
    assert sorted(Counter(e.label for e in drawn.images).values()) == [5] * 10
