"""Post-training quantization in one call (what ``qvit-quantize`` runs): FP weights -> quantize -> calibrate on a
calibration set. The FP weights are a timm weights file (its head and input channels read from it), timm's
pretrained download, or an FP checkpoint of ours (which names its model)."""
from __future__ import annotations

from pathlib import Path

from .errors import QvitError
from .fp_models import Names, load_fp_model


def post_training_quantize(name: str | None, *, weights=None, pretrained: bool = False,
                           model_kwargs: dict | None = None, w_bits: int = 8, a_bits: int = 8, irm: bool = False,
                           method: str = "mse", irm_steps: int = 100, calib="photos", calib_images: int = 1024,
                           seed: int = 0, calib_root=None, batch_size: int = 256, progress: bool = True,
                           max_image_bytes: int | None = None, w_block: int | None = None):
    """(calibrated quantized model, its calibration set, the dataset qvit-export's parity should use).

    ``calib``: a manifest (path, shipped name or ``CalibrationSet``), or an image folder from which a
    class-balanced set of ``calib_images`` is drawn with ``seed``; ``max_image_bytes``: the largest image file
    read (default untrusted.MAX_IMAGE_BYTES); ``w_block``: QuantConfig.w_block (per-block weight steps).
    """
    from .untrusted import MAX_IMAGE_BYTES

    max_image_bytes = max_image_bytes or MAX_IMAGE_BYTES
    from .calibrate import calibrate
    from .calibration_set import FolderSource, draw, is_manifest_spec, read_manifest
    from .config import QuantConfig
    from .quantize import quantize

    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, irm=irm, calibration=method, w_block=w_block)  # bad bits fail before loading
    if is_manifest_spec(calib):
        calib_set = calib if not isinstance(calib, (str, Path)) else read_manifest(calib)
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise QvitError(f"--calib {calib}: not a manifest (.json or a shipped name) nor an image folder")
        calib_set = draw(FolderSource(folder, max_image_bytes), calib_images, seed, balanced=True, progress=progress)
    if not (weights or pretrained):
        raise QvitError("PTQ needs trained weights: give --weights FILE (timm weights or our FP checkpoint) or "
                        "--pretrained")
    fp = load_fp_model(name, model_kwargs, weights, pretrained, names=Names("--weights", "--model", "--model-arg"),
                       read_shape=True)
    model = quantize(fp, cfg, inplace=True)
    calibrate(model, calib_set, irm_steps=irm_steps, seed=seed, progress=progress, data_root=calib_root,
              batch_size=batch_size, max_image_bytes=max_image_bytes)
    return model, calib_set, calib_set.dataset_hint(calib_root)
