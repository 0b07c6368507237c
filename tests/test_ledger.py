"""The probes' ledger (benchmarks/ledger.py): a queue's finished teacher and students outlive their run folders
(a new machine), count only for the recipe and the very teacher file they were made with, and keep no machine
path. A real queue on a tiny probe: a 1-epoch teacher and a W2A2 student trained on Fashion-MNIST."""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ledger import digest  # noqa: E402
from qat_queue import Probe, run_row, student_job, teacher_job  # noqa: E402

from qvit_export.checkpoint import read_checkpoint  # noqa: E402
from qvit_export.trainer import Processes  # noqa: E402

TINY = "{img_size: 28, patch_size: 7, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 1}"


def tiny_probe(tmp_path: Path) -> Probe:
    models = tmp_path / "models"
    if not models.exists():
        shutil.copytree(ROOT / "models", models)
        (models / "t_fp.yaml").write_text(f"extends: probe_deep_fp.yaml\nmodel_kwargs: {TINY}\nepochs: 1\n"
                                          "warmup_epochs: 0\ntrain_limit: 512\nval_limit: 256\n")
        (models / "t_qat.yaml").write_text("extends: probe_deep_qat.yaml\ntrain_limit: 256\nval_limit: 256\n"
                                           "calibration_images: 128\nirm_steps: 5\n")
    return Probe("t", str(models / "t_fp.yaml"), str(models / "t_qat.yaml"), tmp_path / "runs" / "t",
                 tmp_path / "ledger" / "t")


def overrides(seed=0):
    return {"w_bits": 2, "a_bits": 2, "irm": "head", "dgd": False, "seed": seed}


def test_finished_runs_outlive_their_folders_for_their_own_recipe_and_teacher(tmp_path):
    probe = tiny_probe(tmp_path)
    assert not probe.teacher_done()
    teacher_job(probe).run()
    assert probe.teacher_done() and probe.teacher == probe.ledger.teacher_path
    kept = json.loads(probe.ledger.teacher_json.read_text())
    assert kept["top1"] == read_checkpoint(probe.teacher_dir / "best.pt")["metrics"]["top1"]
    assert kept["device"] == Processes().describe()  # where it trained: "cpu x1" here
    assert probe.ledger.teacher_path.read_bytes() == (probe.teacher_dir / "best.pt").read_bytes()

    job = student_job(probe, "s", 0, overrides)
    assert not job.done()
    job.run()
    assert job.done()
    row = run_row(probe, "s", overrides())
    assert row["final"] is not None and len(row["attention"]) == 2  # one diagnostics entry per block
    assert row["device"] == kept["device"]
    entry = (probe.ledger.folder / "students" / "s.json").read_text()
    assert json.loads(entry)["recipe"]["teacher"].startswith("sha256:") and str(tmp_path) not in entry

    shutil.rmtree(tmp_path / "runs")  # a new machine: the run folders are gone, the ledger is committed
    again = tiny_probe(tmp_path)
    assert again.teacher_done() and again.fp()["top1"] == kept["top1"]
    assert student_job(again, "s", 0, overrides).done()
    assert run_row(again, "s", overrides()) == row
    assert run_row(again, "s", overrides(seed=1)) is None  # another recipe: not this entry

    with open(again.ledger.teacher_path, "ab") as f:  # teacher.pt is not the file teacher.json describes
        f.write(b"\0")
    assert not tiny_probe(tmp_path).teacher_done()
    kept["sha256"] = digest(again.ledger.teacher_path)  # ... or another teacher kept: its predecessor's students
    again.ledger.teacher_json.write_text(json.dumps(kept))  # do not count
    other = tiny_probe(tmp_path)
    assert other.teacher_done()
    assert run_row(other, "s", overrides()) is None and not student_job(other, "s", 0, overrides).done()
