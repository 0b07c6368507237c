"""Post-training quantization in one call (what ``qvit-quantize`` runs): FP weights -> quantize -> calibrate on a
calibration set. The FP weights are a timm weights file (its head and input channels read from it), timm's
pretrained download, or an FP checkpoint of ours (which names its model)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import QvitError
from .families import family_for_model


def _inferred_kwargs(name: str, state: dict, kwargs: dict) -> dict:
    """``kwargs`` (checked: model_args) plus what a timm weights file says about the model's shape and the user did
    not: the classifier's ``num_classes`` (a fine-tuned head) and the patch embedding's ``in_chans``."""
    from .timm_models import meta_model

    default = meta_model(name, kwargs, "--model-arg", "check the --model-arg values")
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


def fp_model(name: str | None = None, weights=None, pretrained: bool = False,
             model_kwargs: dict | None = None) -> nn.Module:
    """The FP model to quantize, in eval mode."""
    from .checkpoint import model_from_checkpoint, read_weights_file

    kwargs = dict(model_kwargs or {})
    if pretrained:
        if not name:
            raise QvitError("--pretrained needs --model: a timm model name")
        from .model_args import check_model_kwargs
        from .timm_models import create_model

        kwargs = check_model_kwargs(name, kwargs, "--model-arg")
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
            raise QvitError(f"{path} holds a {ckpt['model']['name'][:80]}, not {name}: drop --model or give matching weights")
        if kwargs:
            raise QvitError(f"{path} names its own model and arguments: drop --model-arg")
        return model_from_checkpoint(ckpt, path)
    if not name:
        raise QvitError(f"{path} is a plain weights file: say which timm model it belongs to with --model")
    from .model_args import check_model_kwargs
    from .timm_models import build_from_state
    from .untrusted import check_finite

    kwargs = _inferred_kwargs(name, state, check_model_kwargs(name, kwargs, "--model-arg"))
    model = build_from_state(name, kwargs, state, str(path), hint="give the model's other timm.create_model "
                             "arguments with --model-arg (img_size=..., embed_dim=...)")
    check_finite(model, str(path))
    return model.eval()


def post_training_quantize(name: str | None, *, weights=None, pretrained: bool = False,
                           model_kwargs: dict | None = None, w_bits: int = 8, a_bits: int = 8, irm: bool = False,
                           method: str = "mse", irm_steps: int = 100, calib="photos", calib_images: int = 1024,
                           seed: int = 0, calib_root=None, batch_size: int = 256, progress: bool = True,
                           max_image_bytes: int | None = None):
    """(calibrated quantized model, its calibration set, the dataset qvit-export's parity should use).

    ``calib``: a manifest (path, shipped name or ``CalibrationSet``), or an image folder from which a
    class-balanced set of ``calib_images`` is drawn with ``seed``; ``max_image_bytes``: the largest image file
    read (default untrusted.MAX_IMAGE_BYTES).
    """
    from .untrusted import MAX_IMAGE_BYTES

    max_image_bytes = max_image_bytes or MAX_IMAGE_BYTES
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
        calib_set = draw(FolderSource(folder, max_image_bytes), calib_images, seed, balanced=True, progress=progress)
    model = quantize(fp_model(name, weights, pretrained, model_kwargs), cfg, inplace=True)
    calibrate(model, calib_set, irm_steps=irm_steps, seed=seed, progress=progress, data_root=calib_root,
              batch_size=batch_size, max_image_bytes=max_image_bytes)
    return model, calib_set, calib_set.dataset_hint(calib_root)
