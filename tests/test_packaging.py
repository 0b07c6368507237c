"""The product as users install it: a wheel that carries the recipes and calibration manifests, and a light front
door (the package import and every command's --help work without torch, timm, onnx or TensorRT)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("qvit_export", "qvit_quantize", "qvit_train", "qvit_eval", "qvit_report", "qvit_calib")
HEAVY = ("torch", "torchvision", "timm", "numpy", "onnx", "onnxruntime", "onnxsim", "tensorrt", "tensorrt_rtx_bindings")


@pytest.fixture(scope="module")
def blocked(tmp_path_factory) -> dict:
    """An environment in which importing any of HEAVY raises ImportError (a package of that name, first on the
    path, that refuses to load)."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in HEAVY:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}


def _python(code: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_help_and_import_without_heavy_libraries(blocked, tmp_path, figures):
    control = _python("import torch", blocked, tmp_path)
    assert control.returncode != 0 and "torch is blocked" in control.stderr  # the block works
    r = _python("import qvit_export, sys; print(qvit_export.__version__, sorted(qvit_export.__all__)[:2])", blocked,
                tmp_path)
    assert r.returncode == 0, r.stderr
    seconds = {}
    for command in COMMANDS:
        start = time.perf_counter()
        r = _python(f"import sys; sys.argv = ['{command}', '--help']; from qvit_export.cli import {command}; "
                    f"{command}()", blocked, tmp_path)
        seconds[command] = time.perf_counter() - start
        assert r.returncode == 0, (command, r.stderr[-2000:])
        assert r.stdout.startswith("usage: " + command.replace("_", "-")), r.stdout[:200]
    for sub in ("draw", "verify", "show"):
        r = _python(f"import sys; sys.argv = ['qvit-calib', '{sub}', '--help']; from qvit_export.cli import "
                    "qvit_calib; qvit_calib()", blocked, tmp_path)
        assert r.returncode == 0 and "usage: qvit-calib " + sub in r.stdout, r.stderr[-2000:]
    # reading the shipped manifests and resolving a recipe need none of them either
    r = _python("import sys; sys.argv = ['qvit-calib', 'list']; from qvit_export.cli import qvit_calib; qvit_calib()",
                blocked, tmp_path)
    assert r.returncode == 0 and "fashion-mnist: 1024 images" in r.stdout, r.stderr[-2000:]
    r = _python("import sys; sys.argv = ['qvit-train', '--recipe', 'demo_w4a4', '--print-recipe']; "
                "from qvit_export.cli import qvit_train; qvit_train()", blocked, tmp_path)
    assert r.returncode == 0 and "name: demo_w4a4" in r.stdout, r.stderr[-2000:]
    figures("--help without torch/timm/onnx/TensorRT: " + ", ".join(f"{c.replace('_', '-')} {s:.2f} s"
                                                                    for c, s in seconds.items()))


def test_api_names_still_resolve():
    import qvit_export

    for name in qvit_export.__all__:
        assert getattr(qvit_export, name) is not None
    # the two functions named like their modules stay functions after those modules are imported
    import qvit_export.calibrate  # noqa: F401
    import qvit_export.quantize  # noqa: F401

    assert callable(qvit_export.calibrate) and callable(qvit_export.quantize)
    assert qvit_export.calibrate.__module__ == "qvit_export.calibrate"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build leaves build/ and egg-info where it runs)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("qvit_export", "models", "calib"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = dist.glob("qvit_export-*.whl")
    return path


def test_wheel_carries_recipes_and_manifests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "models").glob("*.yaml"):
        assert f"qvit_export/recipes/{recipe.name}" in names
    for manifest in (ROOT / "calib").glob("*.json"):
        assert f"qvit_export/calib/{manifest.name}" in names
    with zipfile.ZipFile(wheel) as z:  # copies of the files, not links
        assert z.read("qvit_export/calib/fashion-mnist.json") == (ROOT / "calib" / "fashion-mnist.json").read_bytes()
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in COMMANDS:
        assert f"{command.replace('_', '-')} = qvit_export.cli:{command}" in entry_points


def test_wheel_installed_alone_runs_every_recipe(wheel, tmp_path):
    """A fresh virtual environment, the wheel installed with --no-deps, the project's dependencies beside it
    (this environment's site-packages on its path, without its editable qvit_export): every shipped recipe
    resolves, the demo imports, the commands answer, and the package is the installed one."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: the dependencies' folder, whose own .pth files (our editable install) are not run
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                        "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"  # no models/ or calib/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def command(name, *args, timeout=300):
        return subprocess.run([str(venv / "bin" / name), *map(str, args)], capture_output=True, text=True, cwd=work,
                              env=env, timeout=timeout)

    where = subprocess.run([str(py), "-c", "import qvit_export.demo, qvit_export; print(qvit_export.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    recipes = sorted(p.stem for p in (ROOT / "models").glob("*.yaml") if not p.stem.startswith("_"))
    assert len(recipes) >= 22
    for recipe in recipes:
        r = command("qvit-train", "--recipe", recipe, "--print-recipe")
        assert r.returncode == 0, (recipe, r.stderr[-2000:])
        assert f"name: {recipe}\n" in r.stdout
    for name in ("qvit-quantize", "qvit-export", "qvit-calib", "qvit-eval", "qvit-report"):
        r = command(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}"), r.stderr[-2000:]
    listed = command("qvit-calib", "list")
    assert listed.returncode == 0 and "photos: 17 images" in listed.stdout, listed.stderr
    assert str(venv) in listed.stdout  # the wheel's copy, not the checkout's
    verified = command("qvit-calib", "verify", "photos")
    assert verified.returncode == 0 and "all 17 images present and unchanged" in verified.stdout, verified.stderr
