"""qvit-train: recipes, QAT on real data, torchrun DDP (gloo) equals one process, exact resume after a kill,
and bad inputs as one line."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qvit_export import QvitError, read_checkpoint, save_checkpoint
from qvit_export.config import DEFAULT_IRM, SAVED_TRUE_IRM
from qvit_export.recipe import RECIPE_DIRS, Augment, Recipe, load_recipe
from qvit_export.trainer import Trainer, finished_run, saved_run, train_or_reuse

QVIT_TRAIN = [sys.executable, "-c",
              "import sys; from qvit_export.cli import qvit_train; sys.argv[0] = 'qvit-train'; qvit_train()"]
# A small QAT job: 8 steps of 32 Fashion-MNIST images per epoch, all three losses on.
TINY = ["--set", "train_limit=256", "--set", "val_limit=200", "--batch-size", "32", "--set", "calibration_images=64",
        "--set", "irm_steps=5", "--no-progress"]


def stored(path):
    return read_checkpoint(path)["state_dict"]


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if isinstance(a[k], torch.Tensor))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, fmnist_teacher):
    return save_checkpoint(tmp_path_factory.mktemp("teacher") / "fp.pt", fmnist_teacher)


def test_every_recipe_resolves():
    names = sorted(p.stem for p in RECIPE_DIRS[1].glob("*.yaml") if not p.stem.startswith("_"))
    assert {"demo_fp", "demo_w4a4", "deit_small_w4a4", "swin_tiny_w2a2"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
    deit = load_recipe("deit_tiny_w3a3")
    assert (deit.quant.w_bits, deit.quant.a_bits, deit.model, deit.dgd) == (3, 3, "deit_tiny_patch16_224", False)
    assert deit.quant.irm == DEFAULT_IRM  # irm: true in the file; the run records the variant it trains
    over = load_recipe("demo_w4a4", {"w_bits": 2, "augment.hflip": 0.0, "lr": 1e-4})
    assert (over.quant.w_bits, over.augment.hflip, over.lr) == (2, 0.0, 1e-4)


def test_a_recipe_is_a_frozen_dataclass_holding_a_quant_config():
    """The typed recipe: quantization keys form a QuantConfig, augmentation an Augment, nothing is a string key;
    its flat form is what a file writes and a run saves, and reads back to the same recipe."""
    import dataclasses

    from qvit_export import QuantConfig

    recipe = load_recipe("swin_tiny_w2a2", {"quant_groups": ["mhsa_acts", "mlp"], "irm": "token"})
    assert isinstance(recipe.quant, QuantConfig) and isinstance(recipe.augment, Augment)
    assert recipe.quant == QuantConfig(2, 2, irm="token", calibration=recipe.quant.calibration,
                                       groups=("mlp", "mhsa_acts"))
    assert recipe.augment.scale == (0.08, 1.0) and isinstance(recipe.augment.scale, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 1.0
    flat = recipe.to_dict()
    assert list(flat) == list(load_recipe("demo_fp").to_dict())  # one key order: the file format's
    assert flat["quant_groups"] == ["mlp", "mhsa_acts"] and flat["w_bits"] == 2 and flat["augment"]["scale"] == [0.08, 1.0]
    assert Recipe.from_mapping(flat) == recipe and recipe.trains_as(flat)
    assert not recipe.trains_as(flat | {"seed": 1})
    assert recipe.overridden({"seed": 1, "augment.re_prob": 0.0}) == Recipe.from_mapping(
        flat | {"seed": 1, "augment": flat["augment"] | {"re_prob": 0.0}})
    assert Recipe.from_mapping(yaml.safe_load(recipe.to_yaml())) == recipe  # the file a run writes reads back
    with pytest.raises(QvitError, match="lr='fast' must be a finite number"):
        recipe.overridden({"lr": "fast"})
    assert flat["w_block"] is None and recipe.overridden({"w_block": 64}).quant.w_block == 64
    assert Recipe.from_mapping({"model": "vit_tiny_patch16_224", "mode": "fp"}) == load_recipe(
        None, {"model": "vit_tiny_patch16_224", "mode": "fp"})  # what a mapping leaves out is at its default
    with pytest.raises(QvitError, match="a recipe is a mapping of keys to values, not list"):
        Recipe.from_mapping(["lr", 1])
    with pytest.raises(QvitError, match="w_block=96 is not an INT4 block size"):
        recipe.overridden({"w_block": 96})


def test_qat_steps_lower_the_loss(teacher_ckpt, tmp_path, figures):
    recipe = load_recipe("demo_w4a4", {"teacher": str(teacher_ckpt), "train_limit": 640, "val_limit": 500,
                                       "batch_size": 64, "calibration_images": 256, "irm_steps": 10, "lr": 2e-4,
                                       "dgd": True, "dgd_form": "cosine", "dgd_weight": 0.01})
    trainer = Trainer(recipe, tmp_path, progress=False)
    x = torch.stack([trainer.train_set[i][0] for i in range(256)])
    y = torch.tensor([trainer.train_set[i][1] for i in range(256)])

    def objective():
        trainer.model.train()
        with torch.no_grad():
            loss, parts = trainer._loss(x, y)
        return loss.item(), parts["dgd"].item()

    before, dgd_before = objective()
    result = trainer.run()
    after, dgd_after = objective()
    figures(f"QAT W4A4 IRM+DGD, 10 steps of 64 images: loss {before:.3f} -> {after:.3f} (DGD {dgd_before:.2f} -> "
            f"{dgd_after:.2f}), val top-1 {result['best']['val_top1']:.1f}% on 500 images")
    assert after < before and dgd_after < dgd_before
    assert {p.name for p in tmp_path.iterdir()} == {"recipe.yaml", "calibration.json", "metrics.csv", "last.pt",
                                                    "best.pt", "curves.png"}
    # the run names the images that calibrated it: a class-balanced draw from the training data, recorded in best.pt
    from qvit_export.calibration_set import read_manifest

    drawn = read_manifest(tmp_path / "calibration.json")
    assert drawn.rule.balanced and drawn.source == {"kind": "fashion-mnist", "split": "train"}
    assert read_checkpoint(tmp_path / "best.pt")["extra"]["calibration"] == drawn.record()


def test_steps_and_irm_have_their_own_learning_rates(fmnist_teacher):
    from qvit_export import QuantConfig, quantize
    from qvit_export.quantize import irm_norms, quantizers
    from qvit_export.recipe import with_defaults
    from qvit_export.trainer import param_groups

    model = quantize(fmnist_teacher, QuantConfig(4, 4, irm="blend"))
    groups = param_groups(model, 0.05, 1e-3, step_lr_scale=0.1, irm_lr_scale=10.0)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups if g["lr"] != 1e-3}
    assert by_lr[1e-4] == {id(q.step) for _, q in quantizers(model)}
    assert by_lr[1e-2] == {id(p) for _, norm in irm_norms(model) for p in norm.parameters()}
    assert len(by_lr[1e-2]) == 3 * 2 * len(model.blocks)  # weight, bias, blend of q_norm and k_norm per block
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0, 0.0]
    # a run saved before these keys existed is the run of today's recipe (their defaults train the same way)
    recipe = load_recipe("demo_w4a4")
    older = {k: v for k, v in recipe.to_dict().items() if k not in ("step_lr_scale", "irm_lr_scale")}
    assert recipe.trains_as(older) and (recipe.step_lr_scale, recipe.irm_lr_scale) == (1.0, 1.0)
    # a QAT run saved with irm: true (before runs named the variant) trained the paper's IRM, whatever the default
    assert with_defaults(recipe.to_dict() | {"irm": True})["irm"] == SAVED_TRUE_IRM == "token"
    assert Recipe.from_saved(recipe.to_dict() | {"irm": True}).quant.irm == "token"
    # an FP run has no IRM: one saved with irm: true (as FP runs were) is today's FP recipe
    fp = load_recipe("demo_fp")
    assert fp.trains_as(fp.to_dict() | {"irm": True}) and fp.quant.irm == DEFAULT_IRM
    assert fp.trains_as(fp.to_dict() | {"irm": "token"})  # whatever the default becomes: a teacher stays valid
    assert not recipe.trains_as(recipe.to_dict() | {"irm": "token"})  # a student's IRM is its training
    # nor DGD: a teacher saved while DGD's default was on is today's; a student without DGD has no DGD form or
    # weight to compare; a DGD student's form and weight are its training
    assert fp.trains_as(fp.to_dict() | {"dgd": True, "dgd_form": "cosine", "dgd_weight": 0.01})
    assert not recipe.dgd and recipe.trains_as(recipe.to_dict() | {"dgd_form": "cosine", "dgd_weight": 0.5})
    dgd = load_recipe("demo_w4a4", {"dgd": True})
    assert (dgd.dgd_form, dgd.dgd_weight) == ("gram-row", 1.0)  # the paper's DGD, one key away
    assert not dgd.trains_as(dgd.to_dict() | {"dgd_form": "cosine"})
    assert not dgd.trains_as(dgd.to_dict() | {"dgd_weight": 0.5}) and not recipe.trains_as(dgd.to_dict())
    assert recipe.trains_as(dgd.to_dict() | {"dgd_weight": 0.0})  # weight 0 trains without DGD, as the Trainer does


def test_autocast_path(teacher_ckpt, tmp_path):
    """The AMP path qvit-train takes on CUDA, run under CPU autocast: codes in float32, finite, loss falls."""
    recipe = load_recipe("demo_w4a4", {"teacher": str(teacher_ckpt), "train_limit": 64, "val_limit": 100,
                                       "batch_size": 32, "calibration_images": 64, "irm_steps": 2})
    trainer = Trainer(recipe, tmp_path, progress=False)
    trainer.amp_dtype = torch.bfloat16  # what recipe amp=true selects on a GPU
    x = torch.stack([trainer.train_set[i][0] for i in range(32)])
    y = torch.tensor([trainer.train_set[i][1] for i in range(32)])
    losses = [trainer._step(x, y)[0].item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(teacher_ckpt, tmp_path):
    # Augmentation on: SeededAugment must give each sample the same crop and flip whatever the process count.
    common = ["--recipe", "demo_w4a4", "--teacher", teacher_ckpt, *TINY, "--set", "train_limit=64", "--set", "dgd=true",
              "--set", "augment.hflip=0.5", "--set", "augment.crop_padding=2"]
    one_thread = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun's default per process; calibration then agrees
    one = subprocess.run([*QVIT_TRAIN, *common, "--out", tmp_path / "one"], capture_output=True, text=True, timeout=300,
                         env=one_thread)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                          str(free_port()), "--no-python", *QVIT_TRAIN, *common, "--out", tmp_path / "two"],
                         capture_output=True, text=True, timeout=300, env=one_thread)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = stored(tmp_path / "one" / "last.pt"), stored(tmp_path / "two" / "last.pt")
    assert a.keys() == b.keys()
    # Two steps: after more, LSQ code flips and Adam's sign-like first updates amplify float noise (8 steps: 6e-4).
    assert max_difference(a, b) < 1e-5
    metrics_one = read_checkpoint(tmp_path / "one" / "last.pt")["metrics"]
    metrics_two = read_checkpoint(tmp_path / "two" / "last.pt")["metrics"]
    assert metrics_one["images"] == metrics_two["images"] == 200
    assert abs(metrics_one["top1"] - metrics_two["top1"]) <= 0.5  # 1 image of 200: a near tie may flip


def killed_run(args, run_dir, epochs_saved: int) -> dict:
    """Start a run, SIGKILL it as soon as `epochs_saved` epochs after the calibrated start (epoch 0) are saved;
    the saved training state."""
    proc = subprocess.Popen([*args, "--out", run_dir], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    csv = run_dir / "metrics.csv"
    while (not csv.exists() or csv.read_text().count("\n") < 2 + epochs_saved) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the next epoch has just begun
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    return read_checkpoint(run_dir / "last.pt")["extra"]


def test_killed_run_resumes_to_the_same_result(teacher_ckpt, tmp_path):
    common = ["--recipe", "demo_w4a4", "--teacher", teacher_ckpt, *TINY, "--epochs", "3"]
    whole = subprocess.run([*QVIT_TRAIN, *common, "--out", tmp_path / "whole"], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    whole_csv = (tmp_path / "whole" / "metrics.csv").read_text()
    assert whole_csv.count("\n") == 5  # header, epoch 0 (the calibrated start), epochs 1-3
    assert whole_csv.splitlines()[1].startswith("0,")

    # qvit-train --resume, after epoch 1
    run_dir = tmp_path / "killed"
    saved = killed_run([*QVIT_TRAIN, *common], run_dir, 1)
    assert saved["epoch"] == 1
    recipe = Recipe.from_saved(saved["recipe"])
    assert finished_run(run_dir, recipe) is None
    resumed = subprocess.run([*QVIT_TRAIN, "--resume", run_dir / "last.pt", "--no-progress"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # train_or_reuse (make demo, the ablations), after epoch 0: it continues the run, without calibrating again
    reused_dir = tmp_path / "killed_at_start"
    saved_at_start = killed_run([*QVIT_TRAIN, *common], reused_dir, 0)
    assert saved_at_start["epoch"] == 0 and saved_at_start["recipe"] == saved["recipe"]
    assert saved_run(reused_dir, recipe)["extra"]["epoch"] == 0
    assert train_or_reuse(recipe, reused_dir, progress=False) == reused_dir / "best.pt"

    whole_rows = [ln.split(",")[:9] for ln in whole_csv.splitlines()]
    for run in (run_dir, reused_dir):
        assert max_difference(stored(tmp_path / "whole" / "last.pt"), stored(run / "last.pt")) < 1e-6
        assert finished_run(run, recipe) == run / "best.pt"
        resumed_rows = [ln.split(",")[:9] for ln in (run / "metrics.csv").read_text().splitlines()]
        assert whole_rows == resumed_rows  # loss terms and validation metrics per epoch; timings differ


def one_error_line(result) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    return errors[0]


def test_bad_inputs_give_one_line(teacher_ckpt, tmp_path, capsys, monkeypatch):
    from qvit_export.cli import _run, train_main

    def train(*args) -> str:
        capsys.readouterr()
        if "--out" not in args and "--resume" not in args:
            args = (*args, "--out", tmp_path / "run")
        code = _run(train_main, [*map(str, args), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        return err

    assert "unknown recipe key 'bogus'" in train("--recipe", "demo_fp", "--set", "bogus=1")
    assert "recipe 'nope' not found" in train("--recipe", "nope")
    assert "data folder not found" in train("--recipe", "demo_fp", "--data", tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    assert "no images in" in train("--recipe", "demo_fp", "--set", "model_kwargs={}", "--data", tmp_path / "empty",
                                   "--out", tmp_path / "e")
    monkeypatch.setenv("QVIT_FASHION_MNIST", str(tmp_path))
    line = train("--recipe", "demo_fp", "--out", tmp_path / "f")
    assert "Fashion-MNIST not found" in line and "apt-get install dataset-fashion-mnist" in line
    monkeypatch.delenv("QVIT_FASHION_MNIST")
    assert "teacher not found" in train("--recipe", "demo_w4a4", "--teacher", tmp_path / "none.pt")
    assert "already holds a run" in train("--recipe", "demo_w4a4", "--out", _a_run(tmp_path))
    assert "holds no training state" in train("--resume", teacher_ckpt)
    assert not any(p.name in ("e", "f", "run") for p in tmp_path.iterdir())  # nothing written by failed runs
    # The installed command as a user runs it: non-zero exit, the one line last.
    garbage = tmp_path / "teacher.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    result = subprocess.run([*QVIT_TRAIN, "--recipe", "demo_w4a4", "--teacher", garbage, "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert "truncated or not a PyTorch file" in one_error_line(result)


def _a_run(tmp_path: Path) -> Path:
    run = tmp_path / "previous"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    return run


def test_recipe_errors_are_clear():
    with pytest.raises(QvitError, match="w_bits=5 is not supported"):
        load_recipe("demo_w4a4", {"w_bits": 5})
    with pytest.raises(QvitError, match="needs a teacher"):
        load_recipe("demo_w4a4", {"teacher": None})
    with pytest.raises(QvitError, match="unknown augment key 'blur'"):
        load_recipe("demo_fp", {"augment.blur": 1})


def test_teacher_sources(teacher_ckpt, fmnist_teacher, fmnist_calibration, tmp_path):
    """Our FP checkpoint and a plain timm weights file give the same teacher; a quantized one is refused."""
    from qvit_export import QuantConfig, quantize
    from qvit_export.demo import DEMO_KWARGS, DEMO_MODEL
    from qvit_export.trainer import load_teacher

    weights = tmp_path / "timm_weights.pth"
    torch.save(fmnist_teacher.state_dict(), weights)
    x = fmnist_calibration[0][:8]
    expected = fmnist_teacher(x)
    for spec in (teacher_ckpt, weights):
        teacher = load_teacher(load_recipe("demo_w4a4", {"teacher": str(spec), "model": DEMO_MODEL,
                                                              "model_kwargs": DEMO_KWARGS}))
        assert torch.equal(teacher.eval()(x), expected)
    with pytest.raises(QvitError, match="plain weights file"):
        load_teacher(load_recipe("demo_w4a4", {"teacher": str(weights), "model": None, "model_kwargs": {}}))
    quantized = save_checkpoint(tmp_path / "q.pt", quantize(fmnist_teacher, QuantConfig(w_bits=8, a_bits=8, irm=False)))
    with pytest.raises(QvitError, match="teacher .* is already quantized"):
        load_teacher(load_recipe("demo_w4a4", {"teacher": str(quantized), "model": None, "model_kwargs": {}}))
