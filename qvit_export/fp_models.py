"""load_fp_model: the one way a float model is loaded, for qvit-train (its teacher, or the start of an FP run),
qvit-quantize (the weights to quantize) and qvit-report (the teacher of --attention).

A float model comes from timm's pretrained download, from a file (our FP checkpoint, which names its model and
arguments, or a timm weights file for a named model, its arguments passing the family's allow-list and, where the
caller asks, its head and input channels read from the file), or, with neither, is a named model freshly
initialised (an FP run from scratch). Messages name the sources as the caller's flags or recipe keys do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import QvitError
from .untrusted import shown


@dataclass(frozen=True)
class Names:
    """How messages name the weights, the model name and its arguments: "--weights", "--model", "--model-arg"
    on qvit-quantize; "teacher", "model", "recipe model_kwargs" in a recipe."""

    weights: str = "weights"
    model: str = "model"
    kwargs: str = "model_kwargs"


def load_fp_model(name: str | None = None, kwargs: dict | None = None, weights=None, pretrained: bool = False,
                  names: Names = Names(), read_shape: bool = False) -> nn.Module:
    """The float model, in eval mode: timm's pretrained ``name`` (``pretrained``), the model in the file ``weights``,
    or ``name`` freshly initialised. ``kwargs`` are timm.create_model arguments (checked against the family's
    allow-list); our checkpoint carries its own, and ``kwargs`` that contradict them are refused. ``read_shape``:
    a timm weights file's classifier and patch embedding set ``num_classes`` and ``in_chans`` where ``kwargs``
    does not."""
    from .checkpoint import model_from_checkpoint, read_weights_file
    from .model_args import check_model_kwargs
    from .timm_models import build_from_state, create_model
    from .untrusted import check_finite

    kwargs = dict(kwargs or {})
    if weights is None:
        if not name:
            raise QvitError(f"give the model: {names.model} (a timm model name) or {names.weights} (a file)")
        kwargs = check_model_kwargs(name, kwargs, names.kwargs)
        try:
            return create_model(name, pretrained=pretrained, **kwargs).eval()
        except QvitError:
            raise
        except Exception as e:  # noqa: BLE001 - the hub fails in many ways offline
            raise QvitError(f"could not build {name}{' with timm pretrained weights' if pretrained else ''} "
                            f"({type(e).__name__}: {str(e)[:120]}): download the weights elsewhere and give the file "
                            f"as {names.weights}") from None
    if pretrained:
        raise QvitError(f"{names.weights} and pretrained both give the weights: keep one of them")
    path = Path(weights)
    if not path.is_file():
        raise QvitError(f"{names.weights} not found: {path} (an FP checkpoint of qvit-train mode=fp, or a timm "
                        "weights file)")
    ckpt, state = read_weights_file(path)
    if ckpt is not None:
        if ckpt["quant"] is not None:
            raise QvitError(f"{names.weights} {path} is already quantized: give the FP model's weights (a qvit-train "
                            "mode=fp best.pt or a timm weights file)")
        own = ckpt["model"]
        if name and own["name"] != name:
            raise QvitError(f"{path} holds a {own['name'][:80]}, not {name}: drop {names.model} or give matching "
                            "weights")
        if kwargs and _plain(kwargs) != _plain(own["kwargs"]):
            raise QvitError(f"{path} names its own model and arguments ({shown(own['kwargs'])}): drop {names.kwargs}, "
                            "or make it match")
        return model_from_checkpoint(ckpt, path).eval()
    if not name:
        raise QvitError(f"{path} is a plain weights file: say which timm model it belongs to with {names.model}")
    kwargs = check_model_kwargs(name, kwargs, names.kwargs)
    if read_shape:
        kwargs = _shape_from_state(name, state, kwargs, names)
    model = build_from_state(name, kwargs, state, f"{path} ({names.kwargs})",
                             hint=f"give the model's other timm.create_model arguments with {names.kwargs} "
                                  "(img_size=..., embed_dim=...)")
    check_finite(model, str(path))
    return model.eval()


def _plain(value):
    """Arguments compared as data: lists and tuples alike."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _shape_from_state(name: str, state: dict, kwargs: dict, names: Names) -> dict:
    """``kwargs`` plus what a timm weights file says about the model's shape and the caller did not: the
    classifier's ``num_classes`` (a fine-tuned head) and the input layer's ``in_chans``."""
    from .families import family_for_model
    from .timm_models import meta_model

    default = meta_model(name, kwargs, names.kwargs, f"check the {names.kwargs} values")
    out = dict(kwargs)
    classifier = (getattr(default, "pretrained_cfg", None) or {}).get("classifier") or "head"
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    head = state.get(f"{first}.weight")
    if "num_classes" not in kwargs and head is not None and head.dim() == 2 and head.shape[0] != default.num_classes:
        out["num_classes"] = int(head.shape[0])
    family = family_for_model(default)
    proj = state.get(f"{family.input_layer_name}.weight")
    if "in_chans" not in kwargs and proj is not None and proj.dim() == 4 \
            and proj.shape[1] != family.input_layer(default).in_channels:
        out["in_chans"] = int(proj.shape[1])
    return out
