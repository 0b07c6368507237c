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
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import QvitError
from .untrusted import MAX_IMAGE_BYTES, plain_data, read_inside, read_text, shown

FORMAT = "qvit-calibration-set"
VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SHIPPED_DIR = "calib"  # inside the package: a link to the checkout's calib/ (copied into wheels)
MAX_MANIFEST_BYTES = 64 << 20  # about 400,000 images; the shipped Fashion-MNIST set of 1,024 is 90 KB
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest holds")


def _whole(value, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def _expect(ok, where: str, entry: str, value, what: str) -> None:
    """One line naming the manifest entry that is not ``what`` it should be."""
    if not ok:
        raise QvitError(f"{where}: {entry} is {shown(value)}, not {what}: fix it or draw the set again with qvit-calib "
                        "draw")


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
    identity = str  # the type of an image's identity in a manifest

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
            raise QvitError(f"Fashion-MNIST split {shown(split)} is unknown: choose train or test")
        self.split = split
        self._arrays = None

    identity = int

    @classmethod
    def from_entry(cls, entry: dict, root=None, max_image_bytes: int = MAX_IMAGE_BYTES) -> "FashionMnistSource":
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
    def from_entry(cls, entry: dict, root=None, max_image_bytes: int = MAX_IMAGE_BYTES) -> "PhotoSource":
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

    def __init__(self, root, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.root = Path(root)
        self.max_image_bytes = max_image_bytes

    @classmethod
    def from_entry(cls, entry: dict, root=None, max_image_bytes: int = MAX_IMAGE_BYTES) -> "FolderSource":
        if root is None and not entry.get("root"):
            raise QvitError("this calibration set's images are in a folder it does not name: give the folder "
                            "(--calib-root / root=)")
        if root is None and not isinstance(entry["root"], str):
            raise QvitError(f"this calibration set's root {shown(entry['root'])} is not a folder path: give the "
                            "folder (--calib-root / root=)")
        return cls(root if root is not None else entry["root"], max_image_bytes)

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
        """Each image's bytes: a regular file whose path, resolved with its symlinks, lies inside the root, at
        most ``max_image_bytes`` (untrusted.read_inside); a path outside the root, a FIFO, a device or a file over
        the cap is refused naming the entry, before anything of it is read."""
        for rel in ids:
            data = read_inside(self.root, rel, self.max_image_bytes, "image")
            yield rel, None if data is None else _sha256(data), data

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


def source_from_spec(spec: str, split: str = "train", max_image_bytes: int = MAX_IMAGE_BYTES) -> Source:
    """'fashion-mnist', 'photos' or an image folder."""
    if spec == "fashion-mnist":
        return FashionMnistSource(split)
    if spec == "photos":
        return PhotoSource()
    return FolderSource(spec, max_image_bytes)


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
        """The set a manifest's text describes, every entry's type checked (one line naming the first that is
        wrong): no duplicate images, ``count`` equal to the list, identities of the source's kind."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise QvitError(f"{where} is not valid JSON (line {e.lineno}): fix it or draw it again with qvit-calib "
                            "draw") from None
        except (ValueError, RecursionError) as e:  # NaN/Infinity, a number of thousands of digits, deep nesting
            raise QvitError(f"{where} is not a manifest's JSON ({str(e)[:80]}): draw it again with qvit-calib "
                            "draw") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QvitError(f"{where} is not a calibration manifest (format {FORMAT!r}): draw one with qvit-calib draw")
        if data.get("version") != VERSION:
            raise QvitError(f"{where} is manifest version {shown(data.get('version'))}, this qvit-export reads "
                            f"{VERSION}: draw it again with qvit-calib draw")
        source, rule, images = data.get("source"), data.get("rule"), data.get("images")
        _expect(isinstance(data.get("name"), str) and 0 < len(data["name"]) <= 200, where, "name",
                data.get("name"), "a name of 1 to 200 characters")
        _expect(isinstance(source, dict) and isinstance(source.get("kind"), str), where, "source", source,
                "a mapping with a kind")
        if source["kind"] not in SOURCES:
            raise QvitError(f"{where} has source kind {shown(source['kind'])}: known kinds are {', '.join(SOURCES)}")
        plain_data(source, f"{where}: source", max_nodes=100)
        _expect(isinstance(rule, dict), where, "rule", rule, "a mapping of images, seed and balanced")
        for key, ok in (("images", _whole(rule.get("images"), 1)), ("seed", _whole(rule.get("seed"), 0)),
                        ("balanced", isinstance(rule.get("balanced"), bool))):
            _expect(ok, where, f"rule.{key}", rule.get(key), "a whole number" if key != "balanced" else "true or false")
        _expect(isinstance(images, list) and images, where, "images", images, "a list of one or more images")
        _expect(_whole(data.get("count"), 0) and data["count"] == len(images), where, "count", data.get("count"),
                f"the number of images listed ({len(images)})")
        kind = SOURCES[source["kind"]]
        entries, seen = [], set()
        for i, e in enumerate(images):
            entry = f"images[{i}]"
            _expect(isinstance(e, dict) and set(e) <= {"id", "sha256", "label"} and {"id", "sha256"} <= set(e),
                    where, entry, e, "a mapping of id, sha256 and label")
            ident = e["id"]
            _expect(isinstance(ident, kind.identity) and not isinstance(ident, bool)
                    and (ident >= 0 if isinstance(ident, int) else 0 < len(ident) <= 4096), where, f"{entry}.id",
                    ident, f"{'an index' if kind.identity is int else 'a name or relative path'} of a "
                           f"{source['kind']} image")
            _expect(isinstance(e["sha256"], str) and _HEX64.fullmatch(e["sha256"]), where, f"{entry}.sha256",
                    e["sha256"], "64 lowercase hexadecimal digits")
            label = e.get("label")
            _expect(label is None or (isinstance(label, str) and len(label) <= 200) or _whole(label, 0), where,
                    f"{entry}.label", label, "a class index or name")
            if ident in seen:
                raise QvitError(f"{where}: {entry} repeats image {shown(ident)}: each image is listed once; draw the "
                                "set again with qvit-calib draw")
            seen.add(ident)
            entries.append(ImageEntry(ident, e["sha256"], label))
        return cls(data["name"], dict(source), Rule(rule["images"], rule["seed"], rule["balanced"]), tuple(entries))

    # ---- images ----
    def open_source(self, root=None, max_image_bytes: int = MAX_IMAGE_BYTES) -> Source:
        return SOURCES[self.source["kind"]].from_entry(self.source, root, max_image_bytes)

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
                problems.append(f"{str(ident)[:200]} missing")
            elif digest != expected[ident]:
                problems.append(f"{str(ident)[:200]} changed")
            else:
                found.append((ident, image))
        if problems:
            shown = ", ".join(problems[:5]) + (f", ... ({len(problems)} in all)" if len(problems) > 5 else "")
            where = f" in {source.root}" if isinstance(source, FolderSource) else ""
            raise QvitError(f"calibration set {self.name}: {len(problems)} of {len(self.images)} images missing or "
                            f"changed{where} ({shown}): restore them, or draw the set again with qvit-calib draw")
        return found

    def verify(self, root=None, progress: bool = False, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        """Raise, naming them, when any listed image is missing or its content changed."""
        self._read(self.open_source(root, max_image_bytes), progress)

    def load(self, model, root=None, progress: bool = True, max_image_bytes: int = MAX_IMAGE_BYTES):
        """The images as the model's input [N, C, H, W], after checking every one against the manifest."""
        source = self.open_source(root, max_image_bytes)
        source.check_model(model)  # before any image is read
        return source.preprocess(self._read(source, progress), model)

    def batches(self, model, batch_size: int = 256, root=None, progress: bool = True,
                max_image_bytes: int = MAX_IMAGE_BYTES) -> list:
        x = self.load(model, root, progress, max_image_bytes)
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
    return CalibrationSet.from_json(read_text(path, MAX_MANIFEST_BYTES, "calibration set"), str(path))


def is_manifest_spec(spec) -> bool:
    """Whether ``spec`` names a manifest (a shipped name or a .json file) rather than images."""
    if isinstance(spec, CalibrationSet):
        return True
    text = os.fspath(spec)
    return text.endswith(".json") or (Path(text).parent == Path(".") and text in shipped_names())
