"""Build timm models by name and remember how, so a checkpoint can rebuild the same architecture."""
from __future__ import annotations

from torch import nn

from .errors import QvitError
from .families import family_for_model, supported
from .torch_files import load_state_dict_file
from .untrusted import check_finite, shown


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model takes."""
    return family_for_model(model).input_shape(model)


def create_model(name: str, pretrained: bool = False, weights: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` plus a record of (name, kwargs) on ``model.qvit_source``, for a trusted caller: the
    arguments go to timm as they are. What a file or a command line names goes through ``build_from_state``.

    ``weights``: a local timm state-dict file (for machines with no model hub), checked as any file is (plain
    tensors, finite); ``pretrained`` uses timm's own download path.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise QvitError(f"unknown timm model {shown(name)}: pick a name of one of qvit-export's families: {supported()}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise QvitError(f"timm model '{name}' rejected its arguments {shown(kwargs)}: {str(e)[:200]}") from None
    if weights is not None:
        try:
            model.load_state_dict(load_state_dict_file(weights))
        except RuntimeError as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing" in ln),
                          str(e).splitlines()[0])
            raise QvitError(f"weights {weights} do not fit {name} {shown(kwargs) if kwargs else ''}: {detail[:200]}; "
                            "pass the weights of this model (and its num_classes, img_size, ...)") from None
        check_finite(model, f"weights {weights}")
    model.qvit_source = {"name": name, "kwargs": dict(kwargs)}
    return model


# Buffers a model allocates beyond its state dict (Swin's relative position index and attention mask): the
# largest real one, Swin-B at 384 (window 12), holds 10 MB of them; a bound far above that is still far below
# what a window or image size from a file could ask for.
MAX_UNSAVED_BYTES = 1 << 30


def meta_model(name: str, kwargs: dict, where: str, hint: str) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` on the meta device (shapes only, nothing allocated), for arguments
    already checked (model_args); arguments that contradict each other are one line."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise QvitError(f"{where}: timm cannot build {name} from {shown(kwargs, 200)} ({type(e).__name__}: "
                        f"{str(e)[:120]}): {hint}") from None


def build_from_state(name: str, kwargs, state: dict, where: str, cfg=None,
                     hint: str = "the file was written for another model") -> nn.Module:
    """The model ``name(**kwargs)`` (quantized with ``cfg``) holding ``state``, when all three come from a file or
    a command line: the arguments pass the family's allow-list (model_args), the model is built on the meta
    device and compared with ``state`` (keys, shapes, extra state) before anything is allocated, then built for
    real (never from timm's hub) and loaded. ``where`` names the source in messages; ``hint`` says what to do
    when the weights do not fit."""
    from .model_args import check_model_kwargs
    from .quantize import quantize

    kwargs = check_model_kwargs(name, kwargs, where)
    skeleton = meta_model(name, kwargs, where, hint)
    if cfg is not None:
        skeleton = quantize(skeleton, cfg, inplace=True)
    expected = skeleton.state_dict()
    _compare_state(expected, state, f"{where} does not match {name}", hint)
    saved = set(expected)
    unsaved = sum(b.numel() * b.element_size() for n, b in skeleton.named_buffers() if n not in saved)
    if unsaved > MAX_UNSAVED_BYTES:
        raise QvitError(f"{where}: {name} with {shown(kwargs, 200)} would allocate {unsaved / 2**30:.1f} GiB of "
                        "buffers beyond its weights: give a smaller window_size or img_size")
    del skeleton
    model = create_model(name, **kwargs)
    if cfg is not None:
        model = quantize(model, cfg, inplace=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise QvitError(f"{where} does not match {name}: {detail[:200]}; {hint}") from None
    return model


def _compare_state(expected: dict, stored: dict, mismatch: str, hint: str) -> None:
    """``stored`` (from a file) has exactly the keys of ``expected`` (a meta model's state dict), each tensor of
    the same shape and kind, each extra state of the same keys and types; and its tensors, counted once per
    storage they share, hold no more values than the file holds bytes (a tensor is a view of its storage, so a
    small file could otherwise fill a large model with views of one storage)."""
    import torch

    missing, unexpected = sorted(set(expected) - set(stored)), sorted(k for k in stored if k not in expected)
    if missing or unexpected:
        raise QvitError(f"{mismatch}: missing {[shown(k) for k in missing[:3]]}, unexpected "
                        f"{[shown(k) for k in unexpected[:3]]}: {hint}")
    values, storages = 0, {}
    for key, want in expected.items():
        got = stored[key]
        if torch.is_tensor(want):
            if not torch.is_tensor(got) or tuple(got.shape) != tuple(want.shape) \
                    or got.is_floating_point() != want.is_floating_point():
                what = f"{list(got.shape)} {got.dtype}" if torch.is_tensor(got) else type(got).__name__
                raise QvitError(f"{mismatch}: size mismatch for {key}: the file holds {what}, the model "
                                f"{list(want.shape)} {want.dtype}; {hint}")
            values += got.numel()
            storage = got.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        elif not (isinstance(got, dict) and isinstance(want, dict) and got.keys() == want.keys()
                  and all(type(got[k]) is type(want[k]) for k in want)):
            raise QvitError(f"{mismatch}: entry {key} is {shown(got)}, the model keeps "
                            f"{shown(sorted(want)) if isinstance(want, dict) else type(want).__name__} there; {hint}")
    if values > sum(storages.values()):
        raise QvitError(f"{mismatch}: its tensors hold {values:,} values in {sum(storages.values()):,} bytes of data "
                        "(views sharing storage): the file is damaged or hostile; re-save it with torch.save")


def _architecture_kwargs(model: nn.Module) -> dict:
    """The timm.create_model arguments that shape ``model``, read from the model itself (by its family)."""
    return family_for_model(model).architecture_kwargs(model)


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
