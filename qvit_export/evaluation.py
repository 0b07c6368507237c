"""Evaluation: top-1/top-5 and loss, as sums that add up across processes (the trainer) or as metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def evaluation_sums(model: nn.Module, loader, desc: str = "eval", progress: bool = True) -> torch.Tensor:
    """[top-1 hits, top-5 hits, summed cross-entropy, images] as float64: sums add up across processes."""
    device = next(iter(model.parameters()), torch.zeros(0)).device  # an ONNX/TensorRT wrapper has none
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # summed where the logits are: one copy at the end
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        batch = [(top[:, 0] == y).sum(), (top == y[:, None]).any(dim=1).sum(),
                 F.cross_entropy(logits, y, reduction="sum"), torch.tensor(y.numel(), device=device)]
        sums += torch.stack([v.double() for v in batch])
    model.train(was_training)
    return sums.cpu()


def metrics_from_sums(sums: torch.Tensor) -> dict:
    hits1, hits5, loss, total = sums.tolist()
    return {"top1": 100.0 * hits1 / total, "top5": 100.0 * hits5 / total, "loss": loss / total, "images": int(total)}


def evaluate(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 500, desc: str = "eval",
             progress: bool = True) -> dict:
    """top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` on labelled data."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    return metrics_from_sums(evaluation_sums(model, loader, desc, progress))
