"""The timm.create_model arguments a file may set: an allow-list of shape arguments per model family.

A checkpoint, a weights file's recipe or a ``--model-arg`` names a timm model and the arguments that shape it.
Those arguments reach ``timm.create_model``, which also takes arguments that are not shapes at all:
``pretrained`` and ``pretrained_cfg_overlay`` (an HTTP request to any address, written into torch's hub cache),
``checkpoint_path`` (a read of any local file), ``device``/``dtype``. So only the arguments the model's family
lists pass, each with its type and range; anything else is refused naming the key. The ranges hold the
real models (DeiT-B/384, Swin-B, DINOv2 ViT-g with registers) with room to spare, and stop a few bytes of
arguments from describing a model that would not fit in memory before the state dict is compared: that
comparison runs on a model built on the ``meta`` device (timm_models.build_from_state), so a model the ranges
allow but the weights do not hold is refused before anything is allocated.

Each family declares its arguments in its own module (``families/``); a model's family is the one whose timm
class it is (a subclass, such as the distilled DeiT, belongs to its base's family).
"""
from __future__ import annotations

from .errors import QvitError
from .families import family_of
from .untrusted import shown


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
