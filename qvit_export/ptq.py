"""Post-training quantization in one call (what ``qvit-quantize`` runs): FP weights -> quantize -> calibrate on a
calibration set. The FP weights are a timm weights file (its head and input channels read from it), timm's
pretrained download, or an FP checkpoint of ours (which names its model)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import QvitError


def _inferred_kwargs(name: str, state: dict, kwargs: dict) -> dict:
    """``kwargs`` plus what a timm weights file says about the model's shape and the user did not: the classifier's
    ``num_classes`` (a fine-tuned head) and the patch embedding's ``in_chans``."""
    import timm
    import torch

    with torch.device("meta"):
        default = timm.create_model(name, **kwargs)
    out = dict(kwargs)
    classifier = (getattr(default, "pretrained_cfg", None) or {}).get("classifier") or "head"
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    head = state.get(f"{first}.weight")
    if "num_classes" not in kwargs and head is not None and head.dim() == 2 and head.shape[0] != default.num_classes:
        out["num_classes"] = int(head.shape[0])
    proj = state.get("patch_embed.proj.weight")
    if "in_chans" not in kwargs and proj is not None and proj.dim() == 4 \
            and proj.shape[1] != default.patch_embed.proj.in_channels:
        out["in_chans"] = int(proj.shape[1])
    return out


def fp_model(name: str | None = None, weights=None, pretrained: bool = False,
             model_kwargs: dict | None = None) -> nn.Module:
    """The FP model to quantize, in eval mode."""
    from .checkpoint import model_from_checkpoint, read_weights_file
    from .timm_models import create_model

    kwargs = dict(model_kwargs or {})
    if pretrained:
        if not name:
            raise QvitError("--pretrained needs --model: a timm model name")
        try:
            return create_model(name, pretrained=True, **kwargs).eval()
        except QvitError:
            raise
        except Exception as e:  # noqa: BLE001 - the hub fails in many ways offline
            raise QvitError(f"could not fetch timm's pretrained {name} ({type(e).__name__}): download the weights "
                            "elsewhere and pass them with --weights FILE") from None
    if weights is None:
        raise QvitError("PTQ needs trained weights: give --weights FILE (timm weights or our FP checkpoint) or "
                        "--pretrained")
    path = Path(weights)
    ckpt, state = read_weights_file(path)
    if ckpt is not None:
        if ckpt["quant"] is not None:
            raise QvitError(f"{path} is already quantized: give the FP model's weights (a qvit-train mode=fp "
                            "best.pt or a timm weights file)")
        if name and ckpt["model"]["name"] != name:
            raise QvitError(f"{path} holds a {ckpt['model']['name']}, not {name}: drop --model or give matching weights")
        if kwargs:
            raise QvitError(f"{path} names its own model and arguments: drop --model-arg")
        return model_from_checkpoint(ckpt, path)
    if not name:
        raise QvitError(f"{path} is a plain weights file: say which timm model it belongs to with --model")
    import timm

    if not timm.is_model(name):
        raise QvitError(f"unknown timm model '{name}': pick a name from timm.list_models('deit*') or ('swin*')")
    kwargs = _inferred_kwargs(name, state, kwargs)
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing" in ln),
                      str(e).splitlines()[0])
        raise QvitError(f"{path} does not fit {name} {kwargs or ''}: {detail[:160]}; give the model's other "
                        "timm.create_model arguments with --model-arg (img_size=..., embed_dim=...)") from None
    return model.eval()


def post_training_quantize(name: str | None, *, weights=None, pretrained: bool = False,
                           model_kwargs: dict | None = None, w_bits: int = 8, a_bits: int = 8, irm: bool = False,
                           method: str = "mse", irm_steps: int = 100, calib="photos", calib_images: int = 1024,
                           seed: int = 0, calib_root=None, batch_size: int = 256, progress: bool = True):
    """(calibrated quantized model, its calibration set, the dataset qvit-export's parity should use).

    ``calib``: a manifest (path, shipped name or ``CalibrationSet``), or an image folder from which a
    class-balanced set of ``calib_images`` is drawn with ``seed``.
    """
    from .calibrate import calibrate
    from .calibration_set import FolderSource, draw, is_manifest_spec, read_manifest
    from .config import QuantConfig
    from .quantize import quantize

    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, irm=irm, calibration=method)  # bad bits fail before loading
    if is_manifest_spec(calib):
        calib_set = calib if not isinstance(calib, (str, Path)) else read_manifest(calib)
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise QvitError(f"--calib {calib}: not a manifest (.json or a shipped name) nor an image folder")
        calib_set = draw(FolderSource(folder), calib_images, seed, balanced=True, progress=progress)
    model = quantize(fp_model(name, weights, pretrained, model_kwargs), cfg, inplace=True)
    calibrate(model, calib_set, irm_steps=irm_steps, seed=seed, progress=progress, data_root=calib_root,
              batch_size=batch_size)
    return model, calib_set, calib_set.dataset_hint(calib_root)
