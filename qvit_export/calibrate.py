"""calibrate(model, data): set every LSQ step (and fit IRM) from real batches. Also the whole PTQ path.

1. IRM: unfitted IRM norms are fitted so the float model's output stays close to the FP model's (irm.py).
2. Activations: with every quantizer off, record each activation quantizer's input (min, max|x|, a random
   sample), then choose its sign and step. Weight steps come from the weights alone.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration_set import CalibrationSet, read_manifest
from .errors import QvitError
from .irm import IRM_STEPS, fit_irm
from .layers import QuantAttentionMixin
from .lsq import ACTIVATION, WEIGHT, LSQQuantizer
from .quantize import quantizers, quantizers_disabled
from .untrusted import MAX_IMAGE_BYTES

SAMPLES_PER_BATCH = 1 << 15  # values kept per quantizer per batch for the MSE/percentile search
MAX_SAMPLES = 1 << 19
MSE_GRID = torch.linspace(0.05, 1.0, 96)  # candidate steps as fractions of max|x| / qmax
PERCENTILE = 99.99


# ---- step rules for one tensor -------------------------------------------------------------------

def step_lsq(x: torch.Tensor, qmax: int, dim: int | None = None) -> torch.Tensor:
    """The LSQ paper's rule: 2·mean|x| / sqrt(qmax) (per row of ``x`` when ``dim`` is given)."""
    mean_abs = x.abs().mean() if dim is None else x.abs().mean(dim=dim)
    return 2 * mean_abs / qmax**0.5


def step_mse(x: torch.Tensor, qmin: int, qmax: int, max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Step minimising the quantization MSE, searched on a grid; per row of a 2-D ``x``, else per tensor."""
    rows = x if x.dim() == 2 else x.reshape(1, -1)
    top = rows.abs().amax(dim=1) if max_abs is None else max_abs.reshape(-1).expand(rows.shape[0])
    top = top.clamp_min(1e-12)
    best_err = torch.full_like(top, float("inf"))
    best = top / qmax
    for frac in MSE_GRID:
        s = (frac * top / qmax).unsqueeze(1)
        err = ((torch.clamp(torch.round(rows / s), qmin, qmax) * s - rows) ** 2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s.squeeze(1), best)
    return best if x.dim() == 2 else best[0]


def step_percentile(x: torch.Tensor, qmax: int, dim: int | None = None) -> torch.Tensor:
    q = PERCENTILE / 100
    top = torch.quantile(x.abs().float(), q) if dim is None else torch.quantile(x.abs().float(), q, dim=dim)
    return top.clamp_min(1e-12) / qmax


def choose_step(method: str, x: torch.Tensor, q: LSQQuantizer, max_abs=None) -> torch.Tensor:
    """One step per row of ``x`` for a weight quantizer (a row per channel, or per block), per tensor otherwise."""
    dim = None if q.per_tensor else 1
    if method == "lsq":
        return step_lsq(x, q.qmax, dim)
    if method == "percentile":
        return step_percentile(x, q.qmax, dim)
    return step_mse(x, q.qmin, q.qmax, max_abs if q.per_tensor else None)


# ---- statistics ------------------------------------------------------------------------------------

class _ActivationStats:
    def __init__(self, seed: int):
        self.min = float("inf")
        self.max_abs = 0.0
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.min = min(self.min, x.min().item())
        self.max_abs = max(self.max_abs, x.abs().max().item())
        if x.numel() > SAMPLES_PER_BATCH:
            x = x[torch.randint(x.numel(), (SAMPLES_PER_BATCH,), generator=self.gen, device="cpu").to(x.device)]
        self.samples.append(x.cpu())

    def sample(self) -> torch.Tensor:
        x = torch.cat(self.samples)
        if x.numel() > MAX_SAMPLES:
            x = x[torch.randperm(x.numel(), generator=self.gen)[:MAX_SAMPLES]]
        return x


# ---- driver ----------------------------------------------------------------------------------------

def input_batches(model: nn.Module, data) -> list[torch.Tensor]:
    """The calibration inputs as a list of tensors, from batches or from one run of ``forward_loop(model)``."""
    if callable(data):
        seen: list[torch.Tensor] = []
        hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        try:
            with torch.no_grad(), quantizers_disabled(model):
                data(model)
        finally:
            hook.remove()
    elif isinstance(data, torch.Tensor):
        seen = [data]
    elif isinstance(data, Iterable):
        seen = [(b[0] if isinstance(b, (tuple, list)) else b) for b in data]
    else:
        raise QvitError("calibrate needs batches of images (a tensor, a list or a DataLoader) or a forward_loop(model)")
    from .timm_models import input_shape

    expected = input_shape(model)
    want = f"[batch, {', '.join(map(str, expected))}]"
    if not seen or not all(isinstance(x, torch.Tensor) for x in seen):
        raise QvitError(f"calibrate got no image batches: pass real images shaped {want}")
    for x in seen:
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise QvitError(f"calibration images are shaped {list(x.shape)} but this model takes {want}: resize and "
                            "convert them with the model's eval transform (timm.data.create_transform)")
        if not x.is_floating_point():
            raise QvitError(f"calibration images are {x.dtype}, not float: normalise them with the model's eval "
                            "transform (timm.data.create_transform) first")
        if not bool(torch.isfinite(x).all()):
            raise QvitError("calibration images contain NaN or infinite values: check how they were loaded and "
                            "normalised")
    return seen


def calibrate(model: nn.Module, data, method: str | None = None, irm_steps: int = IRM_STEPS, seed: int = 0,
              progress: bool = True, data_root=None, batch_size: int = 256,
              max_image_bytes: int = MAX_IMAGE_BYTES) -> nn.Module:
    """Initialise every quantizer step (and fit unfitted IRM norms) of a quantized model from real data.

    ``data``: a calibration set (a ``CalibrationSet``, a manifest path, or a shipped name such as
    'fashion-mnist' or 'photos'; its images are checked against the manifest, preprocessed for the model and fed
    in ``batch_size`` batches in manifest order, and ``model.qvit_calibration`` records which set it was, which
    ``save_checkpoint`` keeps), image batches (a tensor, a list or a DataLoader of tensors or (image, label)
    pairs) or a callable ``forward_loop(model)`` that runs the model on them. ``data_root``: where a folder
    manifest's images are, when not where it says; ``max_image_bytes``: the largest image file read from it. ``method``: 'mse' (the default unless the
    model's QuantConfig says otherwise), 'lsq' (2·mean|x|/sqrt(Qp)) or 'percentile'. ``irm_steps``: Adam steps
    that fit the IRM norms to the FP model's output (0 leaves them at gamma=1, beta=0). ``progress``: show bars.
    Returns the model, in eval mode.
    """
    cfg = getattr(model, "qvit_config", None)
    method = method or (cfg.calibration if cfg else "mse")
    if method not in ("mse", "lsq", "percentile"):
        raise QvitError(f"calibration method {method!r} is unknown: choose mse, lsq or percentile")
    named = list(quantizers(model))
    if not named:
        raise QvitError("model has no quantizers: call qvit_export.quantize(model, cfg) before calibrate")
    record = None
    if isinstance(data, (str, os.PathLike, CalibrationSet)):
        calib_set = data if isinstance(data, CalibrationSet) else read_manifest(data)
        data = calib_set.batches(model, batch_size, root=data_root, progress=progress,
                                 max_image_bytes=max_image_bytes)
        record = calib_set.record()
    batches = input_batches(model, data)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    fit_irm(model, batches, steps=irm_steps, seed=seed, progress=progress)

    # Activation statistics in float, IRM in place, explicit attention so q/k/v/softmax inputs are seen.
    acts = {name: q for name, q in named if q.role == ACTIVATION}
    stats = {name: _ActivationStats(seed + i) for i, name in enumerate(acts)}
    hooks = [q.register_forward_pre_hook(lambda m, inp, s=stats[name]: s.update(inp[0])) for name, q in acts.items()]
    attentions = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    for m in attentions:
        m.force_explicit = True
    try:
        with torch.no_grad(), quantizers_disabled(model):
            for x in tqdm(batches, desc="calibrate", unit="batch", leave=False, disable=not progress):
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        for m in attentions:
            m.force_explicit = False

    for name, q in acts.items():
        st = stats[name]
        if not st.samples:
            raise QvitError(f"quantizer '{name}' saw no data during calibration: is it on the model's forward path?")
        q.signed = st.min < 0
        q.set_step(choose_step(method, st.sample(), q, torch.tensor(st.max_abs)))
    for name, q in named:
        if q.role == WEIGHT:  # its owner's weight is all the data it needs
            w = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
            rows = w.reshape(-1, q.granularity.size) if q.per_block else w.reshape(w.shape[0], -1)
            q.set_step(choose_step(method, rows.float(), q))  # one row per channel, or per block
    from .quantize import check_steps

    check_steps(model, "calibration failed")  # e.g. non-finite weights
    model.qvit_calibration = record  # None: calibrated on images no manifest names
    model.train(was_training)
    return model
