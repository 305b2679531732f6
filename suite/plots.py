"""Matplotlib, off-screen, for every figure the suite writes (learning curves, report plots,
feature maps). Imports nothing from the suite: any layer may use it."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]], title: str) -> Any:
    """Loss (train, val) and accuracy (top-1, top-5) per epoch, side by side: a Figure."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [h["val_top1"] for h in history], "o-", label="top-1")
    b.plot(epochs, [h["val_top5"] for h in history], "o-", label="top-5")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    b.legend()
    fig.tight_layout()
    return fig
