"""Real data: Fashion-MNIST from its IDX files, and scikit-image's bundled photographs through timm's
eval transform for a given model."""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import QvitError
from .timm_models import input_shape
from .untrusted import MAX_IMAGE_BYTES, check_folder_links, read_inside

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# scikit-image ships these photographs inside the wheel (others are fetched at run time, which fails offline).
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field", "immunohistochemistry",
          "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel", "retina", "cell")


def fashion_mnist_dir(root=None) -> Path:
    return Path(root or os.environ.get("QVIT_FASHION_MNIST") or FASHION_MNIST_DIR)


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped): magic 0x00 0x00 dtype ndim, big-endian uint32 dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise QvitError(f"{path} is not an unsigned-byte IDX file: re-install dataset-fashion-mnist")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise QvitError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values): re-install it")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise QvitError(f"Fashion-MNIST not found ({stem}[.gz] missing in {root}): run "
                    "'apt-get install dataset-fashion-mnist' or set QVIT_FASHION_MNIST to the folder of the IDX files")


def fashion_mnist_arrays(split: str = "train", root=None) -> tuple[np.ndarray, np.ndarray]:
    """The raw split: uint8 images [N, 28, 28] and uint8 labels [N], as the IDX files hold them."""
    if split not in _FILES:
        raise QvitError(f"split {split!r} is unknown: choose train or test")
    root = fashion_mnist_dir(root)
    images, labels = (read_idx(_find(root, stem)) for stem in _FILES[split])
    return images, labels


def fashion_mnist_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, 28, 28] → normalised float [N, 1, 28, 28], the demo ViT's input."""
    x = torch.from_numpy(np.array(images)).float().div_(255).sub_(FASHION_MNIST_MEAN)  # a copy: IDX arrays are read-only
    return x.div_(FASHION_MNIST_STD).unsqueeze(1)


def fashion_mnist(split: str = "train", root=None, limit: int | None = None) -> TensorDataset:
    """Images as normalised float tensors [N, 1, 28, 28] with int64 labels, held in memory."""
    images, labels = fashion_mnist_arrays(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorDataset(fashion_mnist_tensor(images), torch.from_numpy(labels.astype(np.int64)))


def data_config(model, what: str = "images") -> dict:
    """timm's data config for ``model`` (interpolation, crop, mean and std of its pretrained config) at the input
    size the model was built with: timm resolves the architecture's own size, which a model created with another
    ``img_size`` does not take. A model with other input channels than its config's normalisation (the 1x28x28
    demo ViT) has no such config: refused in one line, naming ``what`` would have gone through it."""
    from timm.data import resolve_data_config


    config = resolve_data_config({}, model=model)
    want = input_shape(model)
    if len(config["mean"]) != want[0]:
        raise QvitError(f"{what} would go through timm's eval transform for {want[0]}-channel input normalised for "
                        f"{len(config['mean'])} channels: this model ({'x'.join(map(str, want))}) takes data of its own "
                        "kind (e.g. fashion-mnist for a 1x28x28 model)")
    return config | {"input_size": tuple(want)}


def eval_transform(model, what: str = "images"):
    """timm's eval transform (resize, centre crop, normalise) for ``model`` (see ``data_config``)."""
    from timm.data import create_transform

    return create_transform(**data_config(model, what), is_training=False)


def photo_batch(model, names=PHOTOS) -> torch.Tensor:
    """scikit-image photographs as one batch, preprocessed by timm's eval transform for ``model``
    (resize, centre crop and normalisation resolved from the model's pretrained config)."""
    import skimage.data

    return photo_tensor([getattr(skimage.data, name)() for name in names], model)


def photo_tensor(arrays: list, model) -> torch.Tensor:
    """Photographs (scikit-image pixel arrays) through timm's eval transform for ``model``, as one batch."""
    from PIL import Image

    transform, mode = eval_transform(model, "the photographs"), image_mode(model)
    images = []
    for array in arrays:
        if array.dtype != np.uint8:
            array = (array * 255).astype(np.uint8)
        images.append(transform(Image.fromarray(array).convert(mode)))
    return torch.stack(images)


class FolderImages(torch.utils.data.Dataset):
    """Labelled images of one folder of class sub-folders (listed by timm's folder reader), read with PIL in
    ``mode``; a file that is not a readable image is named in a one-line error, never skipped. Each file is read
    as untrusted.read_inside reads it: resolved with its symlinks inside ``root``, a regular file, at most
    ``max_image_bytes`` (timm's reader follows links to folders, so a link could lead anywhere)."""

    def __init__(self, samples: list[tuple[str, int]], transform, mode: str = "RGB", root=None,
                 max_image_bytes: int = MAX_IMAGE_BYTES):
        self.samples, self.transform, self.mode = samples, transform, mode
        self.root, self.max_image_bytes = Path(root) if root is not None else None, max_image_bytes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path, target = self.samples[index]
        root = self.root if self.root is not None else Path(path).parent
        data = read_inside(root, os.path.relpath(path, root), self.max_image_bytes, "image")
        if data is None:
            raise QvitError(f"image {path} is gone: was the folder changed during the run?")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise QvitError(f"cannot read image {path} ({str(e).splitlines()[0][:120] or type(e).__name__}): "
                            "remove or replace it") from None
        return (self.transform(image) if self.transform is not None else image), target


def folder_dataset(folder: Path, transform, mode: str = "RGB",
                   max_image_bytes: int = MAX_IMAGE_BYTES) -> FolderImages:
    """The images of one folder of class sub-folders, with ``transform``; empty or missing is an error."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    check_folder_links(Path(folder), "image folder")
    try:
        samples = ReaderImageFolder(str(folder)).samples
    except (RuntimeError, OSError):  # timm refuses a folder without images
        samples = []
    if len(samples) == 0:
        raise QvitError(f"no images in {folder}: put one sub-folder of images per class there")
    return FolderImages(samples, transform, mode, folder, max_image_bytes)


def image_mode(model) -> str:
    """PIL mode of the model's input images: grey for one channel, RGB for three."""

    channels = input_shape(model)[0]
    if channels not in (1, 3):
        raise QvitError(f"this model takes {channels}-channel images: image folders hold grey or RGB images only")
    return "L" if channels == 1 else "RGB"


def image_folder(root, model, flag: str = "--data", max_image_bytes: int = MAX_IMAGE_BYTES):
    """An ImageNet-layout folder (class sub-folders, or train/ and val/ splits) through timm's eval transform."""
    root = Path(root)
    if not root.is_dir():
        raise QvitError(f"image folder {flag} {root} not found: give a folder of class sub-folders of images")
    split = next((s for s in ("val", "validation", "test") if (root / s).is_dir()), "")
    return folder_dataset(root / split, eval_transform(model, f"the images of {flag} {root}"), image_mode(model),
                          max_image_bytes)


def evaluation_dataset(spec: str, model, flag: str = "--data", max_image_bytes: int = MAX_IMAGE_BYTES):
    """'fashion-mnist' (the test split) or an image folder: labelled data for evaluation and parity. ``flag``
    is the option that named it, for the messages."""
    if spec == "fashion-mnist":
        if model is not None and input_shape(model)[0] != 1:
            raise QvitError(f"Fashion-MNIST images are grey but this model takes RGB: pass an image folder as {flag}")
        return fashion_mnist("test")
    return image_folder(spec, model, flag, max_image_bytes)


def parity_images(spec: str, model, limit: int, dataset_hint: str | None = None,
                  flag: str = "--parity-data", max_image_bytes: int = MAX_IMAGE_BYTES) -> tuple[torch.Tensor, str]:
    """Images to prove parity on, and what they are. 'auto' takes the checkpoint's own dataset when it is
    available (``dataset_hint``), else scikit-image's photographs."""
    if spec == "auto":  # the checkpoint's dataset; the built-in grey one for a 1x28x28 model; else photographs
        grey = input_shape(model) == (1, 28, 28)
        spec = dataset_hint or ("fashion-mnist" if grey else "photos")
    if spec == "photos" and input_shape(model)[0] != 3:
        raise QvitError(f"the photographs are RGB but this model takes other images: pass {flag} "
                        "fashion-mnist or an image folder")
    if spec == "photos":
        return photo_batch(model)[:limit], f"{min(limit, len(PHOTOS))} scikit-image photographs"
    dataset = evaluation_dataset(spec, model, flag, max_image_bytes)
    n = min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)]), f"{n} images of {spec}"
