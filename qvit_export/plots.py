"""Figures people would rather look at than read: training curves."""
from __future__ import annotations

import io
from pathlib import Path

from .atomic import write_bytes


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically (a reader never sees half a file), and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def plot_training(history: list[dict], step_losses: list, steps_per_epoch: int, path, title: str = "") -> Path:
    """Training loss per logged step and per epoch (with validation loss), and validation top-1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if step_losses:
        steps, losses = zip(*step_losses, strict=True)
        ax_loss.plot([s / steps_per_epoch for s in steps], losses, lw=0.8, alpha=0.6, label="train loss (step)")
    epochs = [row["epoch"] for row in history]
    trained = [row for row in history if row["train_loss"] is not None]  # not epoch 0, QAT's calibrated start
    ax_loss.plot([row["epoch"] for row in trained], [row["train_loss"] for row in trained], "o-",
                 label="train loss (epoch mean)")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s-", label="val cross-entropy")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8, loc="upper left")
    if any(row["train_dgd"] for row in trained):  # unweighted DGD is two orders larger: its own axis
        ax_dgd = ax_loss.twinx()
        ax_dgd.plot([row["epoch"] for row in trained], [row["train_dgd"] for row in trained], "^--",
                    color="tab:red", label="DGD (unweighted)")
        ax_dgd.set_ylabel("DGD")
        ax_dgd.legend(fontsize=8, loc="upper right")
    ax_acc.plot(epochs, [row["val_top1"] for row in history], "o-", label="val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 %")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
