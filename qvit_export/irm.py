"""Initialising IRM so the converted model starts as close to the FP model as a LayerNorm allows.

LayerNorm over head_dim removes each token's mean and scale from q and k, and no per-channel gamma/beta can
restore a per-token scale, so the FP model cannot be reproduced exactly. Matching q/k themselves (least
squares, or moment matching, per channel) does badly: on the demo ViT the CLS token's query, whose statistics
differ from the patch tokens', loses its attention pattern and top-1 falls from 84% to 23-27% (2,000 test
images). Leaving gamma=1, beta=0 keeps 69-76% (of FP 83.5%, 10,000 test images, two teachers). What works is to fit gamma and
beta of all IRM norms together to the FP model's output (KL divergence of the softmax, every other weight
frozen, quantizers off): 80.1-80.8% after 100 steps (82% after 300).

That is the paper's variant ('token'); the 'head' variant is fitted the same way; 'blend' starts as the FP model
bit for bit and is not fitted (layers.IRM_NORMS).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .quantize import irm_norms, quantizers_disabled

IRM_STEPS = 100
IRM_LR = 0.02


@contextlib.contextmanager
def irm_bypassed(model: nn.Module):
    """Run the model as its FP original: every IRM norm passes its input through."""
    hooks = [norm.register_forward_hook(lambda m, inp, out: inp[0]) for _, norm in irm_norms(model)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def fit_irm(model: nn.Module, batches: list[torch.Tensor], steps: int = IRM_STEPS, lr: float = IRM_LR,
            seed: int = 0, progress: bool = True) -> None:
    """Fit the unfitted IRM norms of ``model`` by distilling its own FP output (see the module docstring)."""
    for _, norm in irm_norms(model):
        if not norm.fits:  # a variant that starts at the FP model is fitted as it is
            norm.fitted = True
    named = [(name, norm) for name, norm in irm_norms(model) if not norm.fitted]
    if not named:
        return
    norms = [norm for _, norm in named]
    device = next(model.parameters()).device
    # A bias on every key adds q·b to all scores of a query, which softmax ignores: in float it has no gradient
    # but rounding noise, which Adam would blow up to full-size steps. It stays 0 until QAT gives it a reason.
    params = [p for name, norm in named for pname, p in norm.named_parameters()
              if not (name.endswith("k_norm") and pname == "bias")]
    if steps > 0:
        with torch.no_grad(), quantizers_disabled(model), irm_bypassed(model):
            targets = [model(x.to(device)).log_softmax(-1) for x in batches]
        trainable = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        order = torch.randperm(steps, generator=torch.Generator().manual_seed(seed)) % len(batches)
        optimizer = torch.optim.Adam(params, lr=lr)
        try:
            with torch.enable_grad(), quantizers_disabled(model):
                bar = tqdm(order.tolist(), desc="fit IRM", unit="step", leave=False, disable=not progress)
                for i in bar:
                    log_probs = model(batches[i].to(device)).log_softmax(-1)
                    loss = F.kl_div(log_probs, targets[i], log_target=True, reduction="batchmean")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.set_postfix(kl=f"{loss.item():.4f}")
        finally:
            for p, flag in trainable.items():
                p.requires_grad_(flag)
    for norm in norms:
        norm.fitted = True
