"""Calibration sets as data: a manifest names the images that calibrate a model, reproducibly and reviewably.

A manifest is a small JSON file (format in ``calib/README.md``): where the images come from (a *source*), the
rule that drew them (count, seed, class balance), and one line per image with its identity (an index into a
dataset, a path relative to a folder, a photograph's name), its label where the source has classes, and the
SHA-256 of its content. Loading a set re-hashes every image it reads, so a calibration never runs on images
other than the ones the manifest names; ``verify`` does the same without loading a model.

The draw is a function of (seed, identity) alone: each candidate gets the key ``sha256("<seed>:<identity>")``
and the images with the smallest keys are taken (per class, when balanced). It needs no random generator
whose stream could change between library versions, and an image's key does not depend on the others, so
adding images to a folder changes a draw only where a new image's key is among the smallest. The manifest
lists images in key order, which is also the order they are fed to calibration.

Sources are registered by kind (``@register_source``): Fashion-MNIST's IDX files, scikit-image's photographs,
and image folders (ImageNet layout); a new kind is one class.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import QvitError

FORMAT = "qvit-calibration-set"
VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SHIPPED_DIR = "calib"  # inside the package: a link to the checkout's calib/ (copied into wheels)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def draw_key(seed: int, identity) -> str:
    """The draw's sort key of one image: sha256 of "<seed>:<identity>"."""
    return _sha256(f"{seed}:{identity}".encode())


# ---- sources -----------------------------------------------------------------------------------------

SOURCES: dict[str, type] = {}


def register_source(cls):
    """Class decorator: make a source kind available to manifests by its ``kind``."""
    SOURCES[cls.kind] = cls
    return cls


class Source:
    """Where images come from. ``candidates()`` lists (identity, label) without reading images; ``read(ids)``
    yields (identity, content hash, image) for the given identities, the image being what ``preprocess``
    takes."""

    kind = ""
    has_labels = True

    def describe(self) -> dict:
        """The manifest's ``source`` entry (enough to find the images again)."""
        return {"kind": self.kind}

    def candidates(self) -> list[tuple]:
        raise NotImplementedError

    def read(self, ids: list):
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Refuse, before any image is read, a model these images cannot be preprocessed for."""

    def preprocess(self, images: list, model):
        """The model's input batch [N, C, H, W] (float) for the (identity, image) pairs ``read`` returned."""
        raise NotImplementedError

    def dataset_hint(self) -> str | None:
        """What qvit-export's ``--parity-data auto`` should use for a model calibrated on this source."""
        return None


def _pil_transform(model, what: str):
    """timm's eval transform for ``model`` at its input size, and the PIL mode of its images."""
    from .data import eval_transform, image_mode

    if model is None:
        raise QvitError(f"{what} are preprocessed by the model's eval transform: pass the model")
    return eval_transform(model, what), image_mode(model)


@register_source
class FashionMnistSource(Source):
    """Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist). Identity: the image's index in the split;
    hash: sha256 of its 784 pixel bytes; preprocessed as qvit-export's Fashion-MNIST loader does."""

    kind = "fashion-mnist"

    def __init__(self, split: str = "train"):
        if split not in ("train", "test"):
            raise QvitError(f"Fashion-MNIST split {split!r} is unknown: choose train or test")
        self.split = split
        self._arrays = None

    @classmethod
    def from_entry(cls, entry: dict, root=None) -> "FashionMnistSource":
        return cls(entry.get("split", "train"))

    def describe(self) -> dict:
        return {"kind": self.kind, "split": self.split}

    def _load(self):
        if self._arrays is None:
            from .data import fashion_mnist_arrays

            self._arrays = fashion_mnist_arrays(self.split)
        return self._arrays

    def candidates(self) -> list[tuple]:
        images, labels = self._load()
        return [(i, int(labels[i])) for i in range(len(images))]

    def read(self, ids):
        images, _ = self._load()
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(images):
                yield i, None, None
                continue
            pixels = images[i]
            yield i, _sha256(pixels.tobytes()), pixels

    def check_model(self, model) -> None:
        from .timm_models import input_shape

        if model is not None and input_shape(model) != (1, 28, 28):
            raise QvitError(f"Fashion-MNIST images are 1x28x28 but this model takes "
                            f"{'x'.join(map(str, input_shape(model)))}: calibrate it on photos or an image folder")

    def preprocess(self, images, model):
        import numpy as np

        from .data import fashion_mnist_tensor

        self.check_model(model)
        return fashion_mnist_tensor(np.stack([pixels for _, pixels in images]))

    def dataset_hint(self) -> str:
        return "fashion-mnist"


@register_source
class PhotoSource(Source):
    """scikit-image's bundled photographs. Identity: the name in ``skimage.data``; hash: sha256 of the pixel
    array (its shape and dtype, then its bytes); preprocessed by timm's eval transform for the model."""

    kind = "photos"
    has_labels = False

    @classmethod
    def from_entry(cls, entry: dict, root=None) -> "PhotoSource":
        return cls()

    @staticmethod
    def _hash(array) -> str:
        return _sha256(f"{array.shape}|{array.dtype}|".encode() + array.tobytes())

    def candidates(self) -> list[tuple]:
        from .data import PHOTOS

        return [(name, None) for name in PHOTOS]

    def read(self, ids):
        import skimage.data

        from .data import PHOTOS

        for name in ids:
            if name not in PHOTOS:
                yield name, None, None
                continue
            array = getattr(skimage.data, name)()
            yield name, self._hash(array), array

    def check_model(self, model) -> None:
        _pil_transform(model, "the photographs")

    def preprocess(self, images, model):
        from .data import photo_tensor

        self.check_model(model)
        return photo_tensor([array for _, array in images], model)


@register_source
class FolderSource(Source):
    """An image folder: class sub-folders of images, or an ImageNet layout whose ``train/`` is used. Identity:
    the path relative to the root (``train/n01440764/x.JPEG``); label: the class folder's name; hash: sha256
    of the file's bytes (what ``sha256sum`` prints); preprocessed by timm's eval transform for the model."""

    kind = "folder"

    def __init__(self, root):
        self.root = Path(root)

    @classmethod
    def from_entry(cls, entry: dict, root=None) -> "FolderSource":
        if root is None and not entry.get("root"):
            raise QvitError("this calibration set's images are in a folder it does not name: give the folder "
                            "(--calib-root / root=)")
        return cls(root if root is not None else entry["root"])

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root)}

    def _classes_dir(self) -> Path:
        if not self.root.is_dir():
            raise QvitError(f"image folder {self.root} not found: give a folder of class sub-folders of images "
                            "(or an ImageNet layout with train/)")
        return self.root / "train" if (self.root / "train").is_dir() else self.root

    def candidates(self) -> list[tuple]:
        base = self._classes_dir()
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(base)
            if rel_dir == Path("."):
                continue  # images directly in the root have no class
            label = rel_dir.parts[0]
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    found.append(((Path(dirpath) / name).relative_to(self.root).as_posix(), label))
        if not found:
            raise QvitError(f"no images in class sub-folders of {base}: put one sub-folder of images per class there")
        return found

    def read(self, ids):
        for rel in ids:
            path = self.root / rel
            try:
                data = path.read_bytes()
            except OSError:
                yield rel, None, None
                continue
            yield rel, _sha256(data), data

    def check_model(self, model) -> None:
        _pil_transform(model, f"the images of {self.root}")

    def preprocess(self, images, model):
        from PIL import Image, UnidentifiedImageError

        import torch

        transform, mode = _pil_transform(model, f"the images of {self.root}")
        out = []
        for rel, data in images:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    out.append(transform(image.convert(mode)))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                raise QvitError(f"cannot read image {self.root / rel} ({str(e).splitlines()[0][:100]}): remove it "
                                "and draw the calibration set again") from None
        return torch.stack(out)

    def dataset_hint(self) -> str:
        return str(self.root)


def source_from_spec(spec: str, split: str = "train") -> Source:
    """'fashion-mnist', 'photos' or an image folder."""
    if spec == "fashion-mnist":
        return FashionMnistSource(split)
    if spec == "photos":
        return PhotoSource()
    return FolderSource(spec)


# ---- the manifest ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How a set was drawn: ``images`` requested, ``seed``, class-``balanced`` or not."""

    images: int
    seed: int
    balanced: bool

    def to_dict(self) -> dict:
        return {"images": self.images, "seed": self.seed, "balanced": self.balanced,
                "key": "sha256('<seed>:<id>'), smallest first" + (", per class" if self.balanced else "")}


@dataclass(frozen=True)
class ImageEntry:
    id: object  # int index, relative path or photograph name
    sha256: str
    label: object = None

    def to_dict(self) -> dict:
        return {"id": self.id, "sha256": self.sha256} | ({} if self.label is None else {"label": self.label})


@dataclass(frozen=True)
class CalibrationSet:
    """A manifest: ``name``, the ``source`` entry, the draw ``rule`` and the ``images`` in calibration order."""

    name: str
    source: dict
    rule: Rule
    images: tuple[ImageEntry, ...]

    # ---- text ----
    def to_json(self) -> str:
        """The file's text: a readable header, then one image per line (a diff names the images that changed).
        Same set, same bytes."""
        head = {"format": FORMAT, "version": VERSION, "name": self.name, "source": self.source,
                "rule": self.rule.to_dict(), "count": len(self.images)}
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}," for k, v in head.items()]
        lines.append('  "images": [')
        rows = [json.dumps(e.to_dict()) for e in self.images]
        lines += [f"    {row}{',' if i < len(rows) - 1 else ''}" for i, row in enumerate(rows)]
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    @property
    def sha256(self) -> str:
        return _sha256(self.to_json().encode())

    def record(self) -> dict:
        """What checkpoints and ONNX metadata keep: which set calibrated the model."""
        return {"name": self.name, "sha256": self.sha256, "images": len(self.images), "source": self.source}

    @classmethod
    def from_json(cls, text: str, where: str = "calibration set") -> "CalibrationSet":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise QvitError(f"{where} is not valid JSON (line {e.lineno}): fix it or draw it again with qvit-calib "
                            "draw") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QvitError(f"{where} is not a calibration manifest (format {FORMAT!r}): draw one with qvit-calib draw")
        if data.get("version") != VERSION:
            raise QvitError(f"{where} is manifest version {data.get('version')}, this qvit-export reads {VERSION}: "
                            "draw it again with qvit-calib draw")
        try:
            rule = data["rule"]
            images = tuple(ImageEntry(e["id"], e["sha256"], e.get("label")) for e in data["images"])
            made = cls(str(data["name"]), dict(data["source"]), Rule(int(rule["images"]), int(rule["seed"]),
                                                                        bool(rule["balanced"])), images)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise QvitError(f"{where} lacks a well-formed {e} entry: draw it again with qvit-calib draw") from None
        if made.source.get("kind") not in SOURCES:
            raise QvitError(f"{where} has source kind {made.source.get('kind')!r}: known kinds are "
                            f"{', '.join(SOURCES)}")
        if not images:
            raise QvitError(f"{where} lists no images: draw it again with qvit-calib draw --images N")
        return made

    # ---- images ----
    def open_source(self, root=None) -> Source:
        return SOURCES[self.source["kind"]].from_entry(self.source, root)

    def _read(self, source: Source, progress: bool) -> list:
        """Every image as (identity, image), after checking each against the manifest; one line naming the
        missing or changed ones otherwise."""
        from tqdm.auto import tqdm

        expected = {e.id: e.sha256 for e in self.images}
        found, problems = [], []
        reader = source.read([e.id for e in self.images])
        for ident, digest, image in tqdm(reader, total=len(self.images), desc=f"read {self.name}", unit="img",
                                         leave=False, disable=not progress):
            if digest is None:
                problems.append(f"{ident} missing")
            elif digest != expected[ident]:
                problems.append(f"{ident} changed")
            else:
                found.append((ident, image))
        if problems:
            shown = ", ".join(problems[:5]) + (f", ... ({len(problems)} in all)" if len(problems) > 5 else "")
            where = f" in {source.root}" if isinstance(source, FolderSource) else ""
            raise QvitError(f"calibration set {self.name}: {len(problems)} of {len(self.images)} images missing or "
                            f"changed{where} ({shown}): restore them, or draw the set again with qvit-calib draw")
        return found

    def verify(self, root=None, progress: bool = False) -> None:
        """Raise, naming them, when any listed image is missing or its content changed."""
        self._read(self.open_source(root), progress)

    def load(self, model, root=None, progress: bool = True):
        """The images as the model's input [N, C, H, W], after checking every one against the manifest."""
        source = self.open_source(root)
        source.check_model(model)  # before any image is read
        return source.preprocess(self._read(source, progress), model)

    def batches(self, model, batch_size: int = 256, root=None, progress: bool = True) -> list:
        x = self.load(model, root, progress)
        return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]

    def dataset_hint(self, root=None) -> str | None:
        return self.open_source(root).dataset_hint()


def draw(source: Source, images: int, seed: int = 0, balanced: bool = False, name: str | None = None,
         progress: bool = True) -> CalibrationSet:
    """Draw ``images`` from ``source``: the smallest keys sha256("<seed>:<id>"), per class when ``balanced``
    (classes in sorted order; the first ``images % classes`` classes take one more)."""
    from tqdm.auto import tqdm

    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise QvitError(f"--images {images!r}: give a whole number of images, 1 or more")
    candidates = source.candidates()
    if images > len(candidates):
        raise QvitError(f"{source.kind} has {len(candidates)} images, fewer than the {images} asked for: ask for "
                        f"{len(candidates)} or fewer")
    keyed = sorted((draw_key(seed, ident), ident, label) for ident, label in candidates)
    if balanced:
        if not source.has_labels:
            raise QvitError(f"the {source.kind} have no classes to balance: drop --balanced")
        classes = sorted({label for _, _, label in keyed})
        quota = {c: images // len(classes) + (1 if i < images % len(classes) else 0) for i, c in enumerate(classes)}
        sizes = Counter(label for _, _, label in keyed)
        short = [c for c in classes if sizes[c] < quota[c]]
        if short:
            raise QvitError(f"class {short[0]} has fewer than {quota[short[0]]} images: ask for fewer --images or "
                            "drop --balanced")
        taken, chosen = dict.fromkeys(classes, 0), []
        for key, ident, label in keyed:
            if taken[label] < quota[label]:
                taken[label] += 1
                chosen.append((ident, label))
    else:
        chosen = [(ident, label) for _, ident, label in keyed[:images]]
    labels = dict(chosen)
    entries = []
    for ident, digest, _ in tqdm(source.read([i for i, _ in chosen]), total=len(chosen), desc="hash images",
                                 unit="img", leave=False, disable=not progress):
        if digest is None:
            raise QvitError(f"cannot read image {ident} of {source.kind}: remove it or fix its permissions")
        entries.append(ImageEntry(ident, digest, labels[ident] if source.has_labels else None))
    default = f"{source.kind if source.kind != 'folder' else Path(source.root).name}-{images}-seed{seed}"
    return CalibrationSet(name or default, source.describe(), Rule(images, seed, balanced), tuple(entries))


# ---- finding manifests -----------------------------------------------------------------------------

def shipped_dir() -> Path:
    """The manifests shipped with the package (the checkout's calib/; package data in a wheel)."""
    return Path(str(resources.files("qvit_export") / SHIPPED_DIR))


def shipped_names() -> list[str]:
    folder = shipped_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def read_manifest(spec) -> CalibrationSet:
    """A manifest by shipped name (``fashion-mnist``, ``photos``) or by path."""
    path = Path(spec)
    if not path.suffix and path.parent == Path(".") and (shipped_dir() / f"{spec}.json").is_file():
        path = shipped_dir() / f"{spec}.json"
    if not path.is_file():
        raise QvitError(f"calibration set {spec} not found: give a manifest file (qvit-calib draw writes one) or a "
                        f"shipped name ({', '.join(shipped_names()) or 'none installed'})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise QvitError(f"cannot read calibration set {path} ({type(e).__name__}): check the file") from None
    return CalibrationSet.from_json(text, str(path))


def is_manifest_spec(spec) -> bool:
    """Whether ``spec`` names a manifest (a shipped name or a .json file) rather than images."""
    if isinstance(spec, CalibrationSet):
        return True
    text = os.fspath(spec)
    return text.endswith(".json") or (Path(text).parent == Path(".") and text in shipped_names())
