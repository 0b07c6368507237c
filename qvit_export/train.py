"""Training and evaluation loops (single process). The QAT recipe machinery builds on these."""
from __future__ import annotations

import math

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
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(dim=1).sum().item(),
                              F.cross_entropy(logits, y, reduction="sum").item(), y.numel()], dtype=torch.float64)
    model.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict:
    hits1, hits5, loss, total = sums.tolist()
    return {"top1": 100.0 * hits1 / total, "top5": 100.0 * hits5 / total, "loss": loss / total, "images": int(total)}


def evaluate(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 500, desc: str = "eval",
             progress: bool = True) -> dict:
    """top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` on labelled data."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    return metrics_from_sums(evaluation_sums(model, loader, desc, progress))


def train_classifier(model: nn.Module, data: Dataset, epochs: int, batch_size: int = 128, lr: float = 1e-3,
                     weight_decay: float = 0.05, seed: int = 0, desc: str = "train") -> list[float]:
    """Plain supervised training (AdamW, cosine schedule with one warm-up epoch, cross-entropy).

    Returns the mean loss of each epoch. Deterministic for a given seed on the CPU.
    """
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps, warmup = epochs * len(loader), len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup))))
    model.train()
    epoch_losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch")
        for x, y in bar:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        epoch_losses.append(total / count)
    model.eval()
    return epoch_losses
