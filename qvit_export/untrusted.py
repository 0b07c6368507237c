"""Data from files someone else may have written: checked before it is used, formatted or written anywhere.

- Containers (a checkpoint's metrics and extra data, ONNX metadata): plain JSON-like values, walked with a budget
  of nodes and string characters. A node is counted each time it appears, so a list shared by reference (which
  weights-only unpickling keeps, and which YAML aliases make) counts as the data it expands into when it is
  formatted or written: ``[[[...]] * 2] * 2`` nested 30 times is 16 bytes of pickle per level and 2^30 nodes.
- Tensors: dense, strided, of a plain dtype, and no larger than the storage they view (a stride-0 view of one
  float is any size), finite where they are floating point.
- Files read under a root (images of a folder or a manifest): the path, resolved with its symlinks, lies inside
  the resolved root; only a regular file is read (a FIFO would block, a device never end), up to a size cap.
- ``shown``: a value's repr for a message, cut short, and never a repr that would expand shared references.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from .errors import QvitError

# A 300-epoch ImageNet run's last.pt holds about 1.2M nodes (3 per step in its per-step losses); walking 4M takes
# 2 to 8 s on one core, so a shared-reference bomb costs that much before it is refused.
MAX_NODES = 4_000_000
MAX_STRING_CHARS = 64 << 20    # characters of all strings together, each counted where it appears
MAX_IMAGE_BYTES = 64 << 20     # one image file; a 24-bit 4096x4096 BMP is 48 MiB
PLAIN = (str, int, float, bool, type(None))


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for a message: at most ``limit`` characters; a container of more than a few items is named by
    its type and length instead (its repr could expand shared references into gigabytes)."""
    if isinstance(value, PLAIN):
        text = repr(value) if not isinstance(value, str) else repr(value[:limit])
    elif isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, PLAIN) for v in value):
        text = repr(type(value)(v if not isinstance(v, str) else v[:limit] for v in value))
    elif isinstance(value, (list, tuple, dict, set)):
        return f"<{type(value).__name__} of {len(value)} items>"
    else:
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def plain_data(value, where: str, tensors: bool = False, max_nodes: int = MAX_NODES,
               max_chars: int = MAX_STRING_CHARS) -> None:
    """Refuse ``value`` unless it is JSON-like (dicts with string or integer keys, lists, tuples, strings, finite
    numbers, booleans, None; tensors too with ``tensors``) of at most ``max_nodes`` nodes and ``max_chars`` string
    characters, counting each appearance. One line naming the entry (``where`` is the value's own name). The walk
    keeps one iterator per level, so its memory follows the depth, not the size."""
    nodes = chars = 0
    # (the container's path as a (parent, key) chain, an iterator over its (key, child) pairs, whether a mapping)
    stack = [(None, iter([(where, value)]), False)]
    while stack:
        parent, children, mapping = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            continue
        key, item = step
        nodes += 1
        if mapping:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise QvitError(f"{_path(parent)} has a key of type {type(key).__name__}: keys must be strings or "
                                "whole numbers; the file is damaged")
            chars += len(key) if isinstance(key, str) else 0
        if isinstance(item, str):
            chars += len(item)
        if nodes > max_nodes or chars > max_chars:
            raise QvitError(f"{where} is too large (more than {max_nodes:,} entries or {max_chars >> 20} MiB of text, "
                            "counting shared references each time): the file is damaged or hostile; refused")
        if isinstance(item, float) and not math.isfinite(item):
            raise QvitError(f"{_path((parent, key))} holds {item!r}: values must be finite numbers; the file is "
                            "damaged")
        if isinstance(item, dict):
            stack.append(((parent, key), iter(item.items()), True))
        elif isinstance(item, (list, tuple)):
            stack.append(((parent, key), enumerate(item), False))
        elif tensors and _is_tensor(item):
            check_tensor(item, _path((parent, key)))
        elif not isinstance(item, PLAIN):
            raise QvitError(f"{_path((parent, key))} is a {type(item).__name__}: only plain data (numbers, strings, "
                            f"lists, mappings{', tensors' if tensors else ''}) is read from a file; refused")


def _path(chain) -> str:
    """'extra.recipe.augment[3]' from a (parent, key) chain."""
    keys = []
    while chain is not None:
        chain, key = chain
        keys.append(key)
    text = str(keys[-1])
    for key in reversed(keys[:-1]):
        text += f"[{key}]" if isinstance(key, int) else f".{str(key)[:40]}"
    return text


def _is_tensor(value) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def check_tensor(t, name: str) -> None:
    """A tensor read from a file: dense, strided, of a plain dtype, no larger than the storage it views."""
    import torch

    if t.layout != torch.strided or t.is_nested or str(t.dtype).removeprefix("torch.") not in _DTYPES:
        raise QvitError(f"{name} is a {t.layout} {t.dtype} tensor: weights are dense tensors of a plain dtype; "
                        "re-save the file with torch.save(model.state_dict())")
    if t.numel() * t.element_size() > t.untyped_storage().nbytes():
        raise QvitError(f"{name} ({list(t.shape)}) views fewer bytes than it holds (a broadcast view): the file is "
                        "damaged or hostile; re-save it with torch.save(model.state_dict())")


def nonfinite(named_tensors, where: str) -> None:
    """Refuse the first floating-point tensor of ``named_tensors`` ((name, tensor) pairs) holding NaN or inf."""
    import torch

    for name, t in named_tensors:
        if not torch.is_tensor(t) or not t.is_floating_point() or t.device.type == "meta":
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            value = t.detach().reshape(-1)[bad.reshape(-1)][0].item()
            raise QvitError(f"{where}: tensor '{name}' holds {value} ({int(bad.sum())} of {t.numel()} values not "
                            "finite): the weights are damaged; retrain, recalibrate or use another file")


def check_finite(model, where: str) -> None:
    """Refuse a model any of whose parameters or buffers holds NaN or inf, naming the tensor."""
    nonfinite(model.named_parameters(), where)
    nonfinite(model.named_buffers(), where)


def check_zip(path: Path) -> None:
    """torch.save writes its zip entries stored, never compressed; a compressed entry can expand about 1000x (a
    zip bomb, which torch.load would inflate). Legacy (non-zip) files pass: they hold their bytes as they are."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load names a damaged file in its own terms
    if packed:
        raise QvitError(f"{path} holds compressed entries ({shown(packed[0], 60)}), which torch.save never writes "
                        "and which could expand without bound: re-save it with torch.save")


def read_text(path: Path, cap: int, what: str) -> str:
    """The text of a small input file (a recipe, a manifest), refused beyond ``cap`` bytes or when not UTF-8."""
    data = read_file(path, cap, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise QvitError(f"{what} {path} is not UTF-8 text: give the file itself") from None


def read_file(path: Path, cap: int, what: str) -> bytes:
    """The bytes of ``path``: a regular file (a FIFO or a device is refused, not read), at most ``cap`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise QvitError(f"cannot read {what} {path} ({e.strerror}): check the path") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise QvitError(f"{what} {path} is not a regular file: give a file")
        if info.st_size > cap:
            raise QvitError(f"{what} {path} is {info.st_size:,} bytes, more than the {cap:,} allowed: give a smaller "
                            "file (or raise the limit)")
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew while it was read
        raise QvitError(f"{what} {path} is more than {cap:,} bytes: give a smaller file")
    return data


def inside(root: Path, relative, what: str) -> Path:
    """``root / relative``, refused unless ``relative`` is a relative path and the result, resolved with its
    symlinks, lies inside the resolved ``root``. The message names the entry only: not where a link leads, nor
    whether anything is there."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise QvitError(f"{what} {shown(relative)} is not a path relative to its folder: fix the entry")
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise QvitError(f"{what} {shown(relative)} points outside its folder {root}: only paths inside the folder "
                        "are read; fix the entry")
    base = root.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise QvitError(f"{what} {shown(relative)} is a link that leads outside its folder {root}: only files "
                        "inside the folder are read; replace the link by the file")
    return target


def check_folder_links(root: Path, what: str) -> None:
    """Refuse a folder holding a link to a folder outside it, or to one of the link's own ancestors (a loop):
    timm's folder reader follows links to folders, so either would list what lies elsewhere, or without end."""
    base = root.resolve()
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = link.resolve()
            rel = link.relative_to(root).as_posix()
            if not target.is_relative_to(base):
                raise QvitError(f"{what} {root}: {rel} is a link that leads outside the folder: only files inside it "
                                "are read; replace the link by the folder")
            if link.parent.resolve().is_relative_to(target):
                raise QvitError(f"{what} {root}: {rel} is a link to a folder that holds it (a loop): remove it")


def read_inside(root: Path, relative, cap: int, what: str) -> bytes | None:
    """The bytes of the regular file ``root / relative`` (checked with ``inside``, at most ``cap`` bytes), or None
    when there is no such file."""
    target = inside(root, relative, what)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (getattr(os, "ELOOP", -1),):  # became a link after it was resolved
            raise QvitError(f"{what} {shown(relative)} changed into a link while it was read: run again") from None
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise QvitError(f"{what} {shown(relative)} in {root} is not a regular file (a folder, FIFO or device): "
                            "only image files are read; remove it")
        if info.st_size > cap:
            raise QvitError(f"{what} {shown(relative)} in {root} is {info.st_size:,} bytes, more than the limit of "
                            f"{cap:,} (--max-image-mb): remove it or raise the limit")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise QvitError(f"{what} {shown(relative)} in {root} grew past {cap:,} bytes while it was read: run again")
    return data
