"""Self-describing checkpoints: one file that rebuilds the model with nothing else at hand.

Layout (plain containers and tensors only, so ``torch.load(weights_only=True)`` reads it without pickle code):
    {"format": "qvit-export-checkpoint", "version": 1,
     "model": {"name": timm name, "kwargs": {...}},
     "quant": QuantConfig as a dict, or None for an FP model,
     "state_dict": {...}, "metrics": {...}, "extra": {...}}
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .config import QuantConfig
from .errors import QvitError
from .torch_files import CHECKPOINT_FORMAT as FORMAT
from .torch_files import check_state, state_dict_of, torch_load
from .untrusted import check_finite, plain_data, shown

VERSION = 1


def save_checkpoint(path, model: nn.Module, metrics: dict | None = None, extra: dict | None = None,
                    model_name: str | None = None, model_kwargs: dict | None = None) -> Path:
    """Write ``model`` (FP or quantized) to ``path`` atomically.

    The timm name and kwargs come from ``model_name``/``model_kwargs``, else from ``qvit_export.create_model``'s
    record, else from what ``timm.create_model`` put on the model (timm_models.describe_model).
    """
    from .timm_models import describe_model

    if model_name is not None:
        source = {"name": model_name, "kwargs": dict(model_kwargs or {})}
    else:
        source = describe_model(model)
    cfg = getattr(model, "qvit_config", None)
    extra = dict(extra or {})
    if getattr(model, "qvit_calibration", None) is not None:  # which calibration set (calibrate() records it)
        extra.setdefault("calibration", model.qvit_calibration)
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": source["name"], "kwargs": dict(source["kwargs"])},
        "quant": cfg.to_dict() if cfg is not None else None,
        "state_dict": state,
        "metrics": dict(metrics or {}),
        "extra": extra,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _checked(ckpt, path: Path) -> dict:
    """The checkpoint, its structure checked: everything but the model's arguments (model_args, when the model is
    built) is plain data of bounded size, read before any of it is formatted or written anywhere."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise QvitError(f"{path} is not a qvit-export checkpoint (a bare state dict?): load timm weights with "
                        "qvit_export.create_model(name, weights=...) instead")
    if ckpt.get("version") != VERSION:
        raise QvitError(f"{path} is checkpoint format version {shown(ckpt.get('version'))}, this qvit-export reads "
                        f"version {VERSION}: use the qvit-export release that wrote it")
    model, quant, state = ckpt.get("model"), ckpt.get("quant", ...), ckpt.get("state_dict")
    well_formed = (isinstance(model, dict) and isinstance(model.get("name"), str)
                   and isinstance(model.get("kwargs"), dict) and (quant is None or isinstance(quant, dict))
                   and isinstance(state, dict) and isinstance(ckpt.get("metrics", {}), dict)
                   and isinstance(ckpt.get("extra", {}), dict))
    if not well_formed:
        raise QvitError(f"{path} lacks a well-formed model name, kwargs, quant config or state dict: the file is "
                        "damaged, write it again")
    ckpt = dict(ckpt, metrics=ckpt.get("metrics", {}), extra=ckpt.get("extra", {}))
    plain_data(ckpt["quant"], f"{path}: quant", max_nodes=1000)
    plain_data(ckpt["metrics"], f"{path}: metrics")
    plain_data(ckpt["extra"], f"{path}: extra", tensors=True)  # a run's last.pt keeps its optimizer state there
    check_state(state, path)
    return ckpt


def read_checkpoint(path) -> dict:
    """The contents of a qvit-export checkpoint of a version we read, checked to be plain data (the state dict
    plain tensors, metrics and extra data bounded in size); the model's arguments are checked when it is built."""
    path = Path(path)
    return _checked(torch_load(path), path)


def model_from_checkpoint(ckpt: dict, path) -> nn.Module:
    """Rebuild the model a checkpoint read by ``read_checkpoint`` describes and load its weights; eval mode.

    The model is built through timm_models.build_from_state: its arguments pass the family's allow-list and the
    state dict is compared with a meta-device build before anything is allocated. A quantizer step that is not a
    positive finite number, or any parameter or buffer holding NaN or inf, is refused naming the tensor. The
    checkpoint's metrics and extra data are on ``model.qvit_checkpoint``.
    """
    from .timm_models import build_from_state

    cfg = None
    if ckpt["quant"] is not None:
        cfg = QuantConfig.from_dict(ckpt["quant"])
    model = build_from_state(ckpt["model"]["name"], ckpt["model"]["kwargs"], ckpt["state_dict"], str(path), cfg)
    if cfg is not None:
        from .quantize import check_steps

        check_steps(model, str(path))
    check_finite(model, str(path))
    model.qvit_checkpoint = {k: ckpt[k] for k in ("metrics", "extra")} | {"path": str(path)}
    model.qvit_calibration = ckpt["extra"].get("calibration")
    return model.eval()


def load_checkpoint(path) -> nn.Module:
    """Rebuild the model a checkpoint describes (quantized if it was) and load its weights; eval mode."""
    return model_from_checkpoint(read_checkpoint(path), path)


def read_weights_file(path) -> tuple[dict | None, dict]:
    """One read of ``path``: (our checkpoint, checked, or None for a timm weights file; the state dict)."""
    path = Path(path)
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") is not None:
        ckpt = _checked(obj, path)
        return ckpt, ckpt["state_dict"]
    return None, state_dict_of(obj, path)
