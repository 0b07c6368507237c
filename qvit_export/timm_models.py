"""Build timm models by name and remember how, so a checkpoint can rebuild the same architecture."""
from __future__ import annotations

from torch import nn

from .errors import QvitError


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model takes."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "proj"):
        raise QvitError(f"{type(model).__name__} has no patch embedding: qvit-export supports timm ViT/DeiT and Swin")
    chans = embed.proj.in_channels
    size = embed.img_size if embed.img_size is not None else (224, 224)
    return (chans, *size)


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

        try:
            model.load_state_dict(load_state_dict_file(weights))
        except RuntimeError as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing" in ln),
                          str(e).splitlines()[0])
            raise QvitError(f"weights {weights} do not fit {name} {kwargs or ''}: {detail[:200]}; pass the weights "
                            "of this model (and its num_classes, img_size, ...)") from None
    model.qvit_source = {"name": name, "kwargs": dict(kwargs)}
    return model


def _architecture_kwargs(model: nn.Module) -> dict:
    """The timm.create_model arguments that shape ``model``, read from the model itself."""
    embed = model.patch_embed
    kwargs = {"num_classes": model.num_classes, "in_chans": embed.proj.in_channels,
              "img_size": tuple(embed.img_size), "patch_size": tuple(embed.patch_size)[0]}
    if hasattr(model, "blocks"):  # ViT / DeiT
        kwargs |= {"embed_dim": model.embed_dim, "depth": len(model.blocks),
                   "num_heads": model.blocks[0].attn.num_heads}
    elif hasattr(model, "layers"):  # Swin
        kwargs |= {"embed_dim": model.embed_dim, "depths": tuple(len(s.blocks) for s in model.layers),
                   "num_heads": tuple(s.blocks[0].attn.num_heads for s in model.layers),
                   "window_size": tuple(model.layers[0].blocks[0].window_size)}
    return kwargs


def describe_model(model: nn.Module) -> dict:
    """``{"name", "kwargs"}`` that rebuild ``model``'s architecture with create_model: its own record
    (``qvit_source``), else what timm put on it (``pretrained_cfg["architecture"]``) and the arguments read
    from it, kept only where they differ from that architecture's defaults and checked by rebuilding it."""
    source = getattr(model, "qvit_source", None)
    if source is not None:
        return {"name": source["name"], "kwargs": dict(source["kwargs"])}
    import timm

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name or not timm.is_model(name) or not hasattr(model, "patch_embed"):
        raise QvitError("cannot tell which timm model this is: build it with timm.create_model or "
                        "qvit_export.create_model, or pass model_name= and model_kwargs= to save_checkpoint")
    import torch

    from .quantize import quantize, quantizers_disabled

    with torch.device("meta"):
        default = _architecture_kwargs(timm.create_model(name))
    kwargs = {k: v for k, v in _architecture_kwargs(model).items() if v != default.get(k)}
    # Rebuild it as load_checkpoint will, and compare: the same keys and shapes, the same logits (quantizers
    # off, so an uncalibrated model can be saved too); options that leave no trace in the shapes (pooling, fc_norm,
    # activation) show up in the logits.
    rebuilt = timm.create_model(name, **kwargs)
    cfg = getattr(model, "qvit_config", None)
    if cfg is not None:
        rebuilt = quantize(rebuilt, cfg, inplace=True)
    own = model.state_dict()
    refuse = QvitError(f"cannot tell how this {name} was built (rebuilt from {kwargs} it differs): pass model_name= "
                       "and model_kwargs= (the timm.create_model arguments you used) to save_checkpoint")
    if set(own) != set(rebuilt.state_dict()):
        raise refuse
    try:
        rebuilt.load_state_dict(own)
    except RuntimeError:
        raise refuse from None
    device = next(model.parameters()).device
    x = torch.randn(2, *input_shape(model), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    rebuilt.to(device).eval()
    try:
        with torch.no_grad(), quantizers_disabled(model), quantizers_disabled(rebuilt):
            same = torch.equal(model(x), rebuilt(x))
    finally:
        model.train(was_training)
    if not same:
        raise refuse
    return {"name": name, "kwargs": kwargs}
