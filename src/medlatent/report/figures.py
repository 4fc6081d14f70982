"""Figures that show what an encoder learned: DINO attention maps and MAE reconstructions.

Everything is drawn with matplotlib's Agg backend (no display needed) into a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_display(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Standardised (C, H, W) -> (H, W[, 3]) in [0, 1] for imshow (3-D: the middle slice)."""
    if x.dim() == 4:  # (C, D, H, W): middle slice
        x = x[:, x.shape[1] // 2]
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    img = (x.float() * s + m).clamp(0, 1).cpu()
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _save(fig, out: Path) -> Path:  # noqa: ANN001
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, out)
    return out


def attention_figure(images: torch.Tensor, attention: torch.Tensor, mean: list[float], std: list[float],
                     out: Path) -> Path:
    """One row per image: the image, then each head's CLS attention over it, then their mean.

    Args:
        images: (B, C, H, W) standardised inputs.
        attention: (B, heads, L) CLS-to-patch attention of the last block (L = grid^2).
    """
    plt = _plt()
    b, heads, length = attention.shape
    grid = int(round(length ** 0.5))
    maps = attention.reshape(b, heads, grid, grid).float()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")  # (B, heads, H, W)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    cols = heads + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b), squeeze=False)
    for i in range(b):
        img = to_display(images[i], mean, std)
        cmap = "gray" if img.ndim == 2 else None
        axes[i, 0].imshow(img, cmap=cmap)
        for h in range(heads + 1):
            m = maps[i, h] if h < heads else maps[i].mean(0)
            axes[i, h + 1].imshow(img, cmap=cmap)
            axes[i, h + 1].imshow(m.cpu().numpy(), cmap="inferno", alpha=0.6)
        if i == 0:
            axes[0, 0].set_title("image", fontsize=8)
            for h in range(heads):
                axes[0, h + 1].set_title(f"head {h + 1}", fontsize=8)
            axes[0, heads + 1].set_title("mean", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("last-layer CLS attention per head (DINO's self-attention maps)", fontsize=9)
    return _save(fig, out)


def reconstruction_figure(images: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, mean: list[float],
                          std: list[float], out: Path) -> Path:
    """Three rows per image block: input, masked input (visible patches), reconstruction."""
    plt = _plt()
    b = len(images)
    fig, axes = plt.subplots(3, b, figsize=(1.4 * b, 4.4), squeeze=False)
    for i in range(b):
        for r, x in enumerate((images[i], masked[i], recon[i])):
            img = to_display(x, mean, std)
            axes[r, i].imshow(img, cmap="gray" if img.ndim == 2 else None)
            axes[r, i].axis("off")
    for r, name in enumerate(("input", "masked", "reconstruction")):
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    return _save(fig, out)
