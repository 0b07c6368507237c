"""The timm.create_model arguments a file may set: an allow-list of shape arguments per model family.

A checkpoint, a weights file's recipe or a ``--model-arg`` names a timm model and the arguments that shape it.
Those arguments reach ``timm.create_model``, which also takes arguments that are not shapes at all:
``pretrained`` and ``pretrained_cfg_overlay`` (an HTTP request to any address, written into torch's hub cache),
``checkpoint_path`` (a read of any local file), ``device``/``dtype``. So only the arguments listed here for the
model's family pass, each with its type and range; anything else is refused naming the key. The ranges hold the
real models (DeiT-B/384, Swin-B, DINOv2 ViT-g with registers) with room to spare, and stop a few bytes of
arguments from describing a model that would not fit in memory before the state dict is compared: that
comparison runs on a model built on the ``meta`` device (timm_models.build_from_state), so a model the ranges
allow but the weights do not hold is refused before anything is allocated. ``window_size`` is kept small
because Swin's relative position index (not in the state dict) grows with its fourth power.

Families are keyed by the timm model class (a subclass, such as the distilled DeiT, belongs to its base's family).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import QvitError
from .untrusted import shown

MAX_NAME_CHARS = 200  # the longest timm model name is under 80 characters


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind`` is int, float, bool, choice, size (an int or a pair of ints) or ints (a tuple of
    ints, ``length`` long at most); numbers lie in [lo, hi]; ``nullable`` also takes None."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    nullable: bool = False
    length: int = 0

    def describe(self) -> str:
        if self.kind == "bool":
            what = "true or false"
        elif self.kind == "choice":
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "size":
            what = f"a whole number or a pair of whole numbers, {self.lo:g} to {self.hi:g}"
        elif self.kind == "ints":
            what = f"a list of 1 to {self.length} whole numbers, {self.lo:g} to {self.hi:g}"
        else:
            what = f"a {'whole ' if self.kind == 'int' else ''}number from {self.lo:g} to {self.hi:g}"
        return what + (" or null" if self.nullable else "")

    def check(self, value) -> tuple[bool, object]:
        """(whether ``value`` fits, the value normalised: lists become tuples)."""
        if value is None:
            return self.nullable, None
        if self.kind == "bool":
            return isinstance(value, bool), value
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices, value
        if self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return ok and self.lo <= value <= self.hi, value
        if self.kind == "int" or (self.kind == "size" and not isinstance(value, (list, tuple))):
            return self._int(value), value
        least, most = (2, 2) if self.kind == "size" else (1, self.length)
        if not isinstance(value, (list, tuple)) or not least <= len(value) <= most:
            return False, value
        return all(map(self._int, value)), tuple(value)

    def _int(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi


_DROP = Arg("float", 0.0, 1.0)
_COMMON = {  # both families
    "img_size": Arg("size", 1, 4096), "in_chans": Arg("int", 1, 64), "num_classes": Arg("int", 0, 100_000),
    "embed_dim": Arg("int", 1, 8192), "mlp_ratio": Arg("float", 0.0625, 16.0), "qkv_bias": Arg("bool"),
    "dynamic_img_size": Arg("bool"), "drop_rate": _DROP, "proj_drop_rate": _DROP, "attn_drop_rate": _DROP,
    "drop_path_rate": _DROP,
}


@dataclass(frozen=True)
class Family:
    """A model family: the timm class it is built from, and the arguments that shape it."""

    name: str
    module: str  # where timm defines the class
    cls: str
    args: dict

    def timm_class(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.cls)


FAMILIES = (
    Family("ViT/DeiT", "timm.models.vision_transformer", "VisionTransformer", _COMMON | {
        "patch_size": Arg("size", 1, 1024), "depth": Arg("int", 1, 64), "num_heads": Arg("int", 1, 256),
        "global_pool": Arg("choice", choices=("", "avg", "avgmax", "max", "token", "map")),
        "class_token": Arg("bool"), "no_embed_class": Arg("bool"), "reg_tokens": Arg("int", 0, 64),
        "pre_norm": Arg("bool"), "final_norm": Arg("bool"), "fc_norm": Arg("bool", nullable=True),
        "qk_norm": Arg("bool"), "proj_bias": Arg("bool"), "init_values": Arg("float", 0.0, 10.0, nullable=True),
        "dynamic_img_pad": Arg("bool"), "pos_drop_rate": _DROP, "patch_drop_rate": _DROP,
    }),
    Family("Swin", "timm.models.swin_transformer", "SwinTransformer", _COMMON | {
        "patch_size": Arg("int", 1, 1024), "depths": Arg("ints", 1, 64, length=8),
        "num_heads": Arg("ints", 1, 256, length=8), "head_dim": Arg("int", 1, 1024, nullable=True),
        "window_size": Arg("size", 1, 32), "global_pool": Arg("choice", choices=("", "avg")),
        "always_partition": Arg("bool"), "strict_img_size": Arg("bool"),
    }),
)


def family_of(name) -> Family:
    """The family of the timm model ``name``, from the class timm builds for it (on the meta device: nothing is
    allocated and nothing is downloaded)."""
    import timm

    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not timm.is_model(name):
        raise QvitError(f"unknown timm model {shown(name)}: pick a name from timm.list_models('deit*') or ('swin*')")
    return _family(name)


@lru_cache(maxsize=64)
def _family(name: str) -> Family:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    for family in FAMILIES:
        if isinstance(model, family.timm_class()):
            return family
    raise QvitError(f"timm model '{name}' is a {type(model).__name__}: qvit-export builds timm VisionTransformer "
                    "(ViT, DeiT) and SwinTransformer models only")


def check_model_kwargs(name: str, kwargs, where: str) -> dict:
    """``kwargs`` for ``timm.create_model(name, ...)`` from a file or a command line, checked against the
    family's allow-list (lists become tuples). Raises QvitError naming the first key that is not allowed or whose
    value does not fit; ``where`` says where the arguments came from."""
    family = family_of(name)
    if not isinstance(kwargs, dict):
        raise QvitError(f"{where}: the model arguments must be a mapping of names to values, not {shown(kwargs)}")
    out = {}
    for key, value in kwargs.items():
        spec = family.args.get(key) if isinstance(key, str) else None
        if spec is None:
            raise QvitError(f"{where}: model argument {shown(key)} is refused: a file may set only the shape "
                            f"arguments of a {family.name} model ({', '.join(sorted(family.args))}); timm's "
                            "pretrained download is --pretrained on the command line")
        ok, normalised = spec.check(value)
        if not ok:
            raise QvitError(f"{where}: model argument '{key}'={shown(value)} must be {spec.describe()}")
        out[key] = normalised
    return out
