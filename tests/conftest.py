"""Shared real-data fixtures: scikit-image photographs, Fashion-MNIST, and the trained demo ViT."""
import os
from pathlib import Path

import pytest
import torch

from qvit_export import create_model
from qvit_export.data import fashion_mnist, photo_batch
from qvit_export.demo import DEMO_KWARGS, DEMO_MODEL, calibration_batches

FIGURES: list[str] = []  # measured figures, printed at the end of the run (they are what the issues ask to report)

CACHE = Path(os.environ.get("QVIT_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


@pytest.fixture(scope="session")
def photos_224():
    """17 real photographs through timm's ImageNet eval transform: [17, 3, 224, 224]."""
    return photo_batch(create_model("deit_tiny_patch16_224"))


@pytest.fixture(scope="session")
def fmnist_test():
    return fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_calibration():
    return calibration_batches()


@pytest.fixture(scope="session")
def fmnist_teacher_ckpt():
    """The checkpoint of the demo ViT trained on Fashion-MNIST (2 epochs, a few minutes once; cached in
    .cache/tests)."""
    from qvit_export.recipe import load_recipe
    from qvit_export.trainer import train_or_reuse

    return train_or_reuse(load_recipe("demo_fp"), CACHE / "fp")


@pytest.fixture(scope="session")
def fmnist_teacher(fmnist_teacher_ckpt):
    """The demo ViT trained on Fashion-MNIST, loaded."""
    from qvit_export import load_checkpoint

    return load_checkpoint(fmnist_teacher_ckpt)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """scikit-image's photographs as PNG files in an ImageNet layout: train/grey/*.png and train/colour/*.png."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from qvit_export.data import PHOTOS

    root = tmp_path_factory.mktemp("photo_folder")
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.dtype != np.uint8:
            array = (array * 255).astype(np.uint8)
        folder = root / "train" / ("grey" if array.ndim == 2 else "colour")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def fmnist_folder(tmp_path_factory):
    """60 Fashion-MNIST test images as PNG files, 20 in each of three class folders."""
    from PIL import Image

    from qvit_export.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays

    images, labels = fashion_mnist_arrays("test")
    root = tmp_path_factory.mktemp("fmnist_folder")
    for label in (0, 1, 9):
        folder = root / FASHION_MNIST_CLASSES[label].replace("/", "-").replace(" ", "-")
        folder.mkdir()
        for index in [i for i in range(len(labels)) if labels[i] == label][:20]:
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return root


@pytest.fixture(scope="session")
def photo_exports(photos_224, tmp_path_factory):
    """{(model, bits): (quantized model, ONNX path, parity report)} for DeiT-tiny and Swin-tiny at W8A8..W2A2,
    random init, calibrated on the photographs."""
    from qvit_export import QuantConfig, calibrate, quantize
    from qvit_export.onnx_export import export_onnx
    from qvit_export.parity import compare

    out = {}
    folder = tmp_path_factory.mktemp("photo_exports")
    for name in ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        torch.manual_seed(0)
        fp = create_model(name)
        for bits in (8, 4, 3, 2):
            qm = calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm=True)), [photos_224], irm_steps=2)
            path = export_onnx(qm, folder / f"{name}_w{bits}.onnx")
            out[name, bits] = qm, path, compare(qm, path, photos_224, progress=False)
    return out


@pytest.fixture(scope="session")
def fmnist_exports(fmnist_teacher, fmnist_calibration, tmp_path_factory):
    """{bits: (PTQ model of the demo teacher at WbAb, its int8 ONNX)} for 8, 4, 3 and 2 bits."""
    from qvit_export import QuantConfig, calibrate, quantize
    from qvit_export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("fmnist_exports")
    out = {}
    for bits in (8, 4, 3, 2):
        # 20 IRM steps, not 100: parity does not depend on how well IRM fits (saves 2 minutes of the suite)
        qm = calibrate(quantize(fmnist_teacher, QuantConfig(w_bits=bits, a_bits=bits, irm=bits < 8)),
                       fmnist_calibration, irm_steps=20)
        out[bits] = qm, export_onnx(qm, folder / f"w{bits}.onnx")
    return out


@pytest.fixture(scope="session")
def fmnist_w4a4_ckpt(fmnist_teacher, fmnist_calibration, tmp_path_factory):
    """W4A4 PTQ of the demo teacher (IRM on), saved as a checkpoint that names its dataset."""
    from qvit_export import QuantConfig, calibrate, quantize, save_checkpoint

    student = calibrate(quantize(fmnist_teacher, QuantConfig(w_bits=4, a_bits=4, irm=True)), fmnist_calibration,
                        progress=False)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "w4a4.pt", student, extra={"dataset": "fashion-mnist"})


@pytest.fixture
def small_vit():
    """The demo architecture, random init: quick enough for gradient and checkpoint tests."""
    torch.manual_seed(0)
    return create_model(DEMO_MODEL, **DEMO_KWARGS).eval()


@pytest.fixture(scope="session")
def figures():
    """Call with a line of measured figures; the run's terminal summary lists them all."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures measured by this run")
        for line in FIGURES:
            terminalreporter.write_line(line)


# The fast tier (`make test-fast`, `pytest -m "not slow"`) leaves out every test marked slow: by hand where a test
# exports or builds a full-size model on its own, and here for every test that uses a fixture that does (measured
# 2026-12-03, 2 cores: training the demo teacher takes minutes on a fresh machine; photo_exports, 5.6 minutes).
SLOW_FIXTURES = {"fmnist_teacher_ckpt", "photo_exports"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
