"""Build timm models by name and remember how, so a checkpoint can rebuild the same architecture."""
from __future__ import annotations

from torch import nn

from .errors import QvitError


def create_model(name: str, pretrained: bool = False, weights: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` plus a record of (name, kwargs) on ``model.qvit_source``.

    ``weights``: a local timm state-dict file (for machines with no model hub); ``pretrained`` uses
    timm's own download path.
    """
    import timm

    if not timm.is_model(name):
        raise QvitError(f"unknown timm model '{name}': pick a name from timm.list_models('deit*') or ('swin*')")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise QvitError(f"timm model '{name}' rejected its arguments {kwargs}: {e}") from None
    if weights is not None:
        from .checkpoint import load_state_dict_file

        model.load_state_dict(load_state_dict_file(weights))
    model.qvit_source = {"name": name, "kwargs": dict(kwargs)}
    return model
