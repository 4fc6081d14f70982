"""Figures that show what an encoder learned: DINO attention maps and MAE reconstructions.

Everything is drawn with matplotlib's Agg backend (no display needed) into a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from medlatent.eval.maps import MapPoints


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


PROTOCOL_STYLE = {"knn": ("k-NN (frozen)", "tab:blue"), "linear": ("linear probe (frozen)", "tab:orange"),
                  "finetune": ("fine-tuned", "tab:green"), "lpft": ("LP-FT", "tab:olive"),
                  "semi": ("FixMatch, pretrained", "tab:purple"), "supervised": ("supervised from scratch", "tab:red"),
                  "semi-scratch": ("FixMatch from scratch", "tab:brown")}


def efficiency_figure(summary: list[dict], title: str, out: Path, metric: str = "acc") -> Path:
    """Test metric against the fraction of training labels, one line per protocol, +-1 std."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for protocol, (label, colour) in PROTOCOL_STYLE.items():
        rows = sorted((r for r in summary if r["protocol"] == protocol and r["split"] == "test"),
                      key=lambda r: r["fraction"])
        if not rows:
            continue
        x = [r["fraction"] * 100 for r in rows]
        y = np.array([r[metric] for r in rows])
        sd = np.array([r[f"{metric}_std"] for r in rows])
        ax.plot(x, y, "o-", color=colour, label=label)
        ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("training labels used (%)")
    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def embedding_map_figure(coords: np.ndarray, labels: np.ndarray | None, class_names: list[str],
                         thumbs: list[tuple[int, np.ndarray]], title: str, out: Path) -> Path:
    """Scatter of 2-D coordinates coloured by class, with a few image thumbnails placed on it."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=3, c="tab:gray")
    else:
        cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
        for c, name in enumerate(class_names):
            m = labels == c
            ax.scatter(coords[m, 0], coords[m, 1], s=3, color=cmap(c % cmap.N), label=name[:30])
        ax.legend(fontsize=6, markerscale=4, loc="best")
    for i, img in thumbs:
        box = OffsetImage(img, zoom=0.9, cmap="gray" if img.ndim == 2 else None)
        ax.add_artist(AnnotationBbox(box, coords[i], frameon=True, pad=0.1))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out)


def draw_embedding_map(points: "MapPoints", class_names: list[str], title: str, out: Path) -> Path:
    """The figure of a :class:`medlatent.eval.maps.MapPoints`."""
    return embedding_map_figure(points.coords, points.labels, class_names, points.thumbs, f"{title} ({points.how})", out)


def retrieval_figure(queries: list[np.ndarray], neighbours: list[list[np.ndarray]], relevant: list[list[bool]],
                     title: str, out: Path) -> Path:
    """One row per query: the query, then its nearest gallery images (green frame: same class)."""
    plt = _plt()
    k = len(neighbours[0])
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.3 * (k + 1), 1.3 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        axes[r, 0].imshow(q, cmap="gray" if q.ndim == 2 else None)
        for j in range(k):
            img = neighbours[r][j]
            ax = axes[r, j + 1]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if relevant[r][j] else "tab:red")
                spine.set_linewidth(2.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str, out: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    short = [c[:14] for c in class_names]
    ax.set_xticks(range(n), short, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(n), short, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, out)


def training_curves_figure(metrics: list[dict], title: str, out: Path) -> Path:
    """Loss (and learning rate) against steps from a run's metrics.jsonl."""
    plt = _plt()
    rows = [m for m in metrics if "loss" in m and "lr" in m]
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    if rows:
        steps = [m["step"] for m in rows]
        ax.plot(steps, [m["loss"] for m in rows], color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(steps, [m["lr"] for m in rows], color="tab:gray", alpha=0.6)
        ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def mil_figure(bags: list[tuple[list[np.ndarray], list[float], list[bool]]], title: str, out: Path) -> Path:
    """One row per bag: its images, each titled with its attention weight; the instances that
    make the bag positive are framed in green."""
    plt = _plt()
    n = max(len(images) for images, _, _ in bags)
    fig, axes = plt.subplots(len(bags), n, figsize=(1.05 * n, 1.3 * len(bags)), squeeze=False)
    for r, (images, weights, positive) in enumerate(bags):
        top = max(weights)
        for j, img in enumerate(images):
            ax = axes[r, j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_title(f"{weights[j]:.2f}", fontsize=7, fontweight="bold" if weights[j] == top else "normal")
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if positive[j] else "lightgray")
                spine.set_linewidth(2.5 if positive[j] else 0.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def sample_grid_figure(rows: list[list[np.ndarray]], row_names: list[str], title: str, out: Path) -> Path:
    """One row per class (or one row of unconditional samples): generated images side by side."""
    plt = _plt()
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n, 0.95 * len(rows) + 0.4), squeeze=False)
    for r, images in enumerate(rows):
        for j in range(n):
            ax = axes[r, j]
            if j < len(images):
                ax.imshow(images[j], cmap="gray" if images[j].ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        axes[r, 0].set_ylabel(row_names[r][:18], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def memorisation_figure(pairs: list[tuple[np.ndarray, np.ndarray, float]], sample_ratios: np.ndarray,
                        test_ratios: np.ndarray, title: str, out: Path) -> Path:
    """Left: histograms of nearest-training distance / test median for samples and for real test
    images. Right: the closest sample / training-image pairs side by side."""
    plt = _plt()
    fig = plt.figure(figsize=(3.2 + 1.1 * len(pairs), 3.0))
    grid = fig.add_gridspec(2, 1 + len(pairs), width_ratios=[3] + [1] * len(pairs))
    ax = fig.add_subplot(grid[:, 0])
    bins = np.linspace(0, max(2.5, float(np.percentile(np.concatenate([sample_ratios, test_ratios]), 99))), 40)
    ax.hist(test_ratios, bins, alpha=0.6, density=True, label="real test")
    ax.hist(sample_ratios, bins, alpha=0.6, density=True, label="samples")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("nearest-training distance / test median", fontsize=8)
    ax.legend(fontsize=7)
    for j, (sample, train, ratio) in enumerate(pairs):
        for r, (img, name) in enumerate(((sample, f"sample {ratio:.2f}"), (train, "nearest train"))):
            a = fig.add_subplot(grid[r, 1 + j])
            a.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            a.set_title(name, fontsize=6)
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def heatmap_figure(images: list[np.ndarray], heatmaps: list[np.ndarray], titles: list[str], title: str,
                   out: Path) -> Path:
    """Two rows: the images, and their anomaly heatmaps (3-D: the middle slice)."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
    for j, (img, heat) in enumerate(zip(images, heatmaps)):
        h = heat[heat.shape[0] // 2] if heat.ndim == 3 else heat
        axes[0, j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[0, j].set_title(titles[j], fontsize=6)
        axes[1, j].imshow(h, cmap="inferno")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return _save(fig, out)


def rate_distortion_figure(rows: list[dict], title: str, out: Path) -> Path:
    """PSNR and SSIM against bytes per image, one line per codec family."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault("JPEG (scan bytes)" if r["codec"] == "JPEG" else "autoencoder (8-bit code)", []).append(r)
    for name, rs in families.items():
        rs = sorted(rs, key=lambda r: r["bytes"])
        for ax, metric in zip(axes, ("psnr", "ssim")):
            ax.plot([r["bytes"] for r in rs], [r[metric] for r in rs], "o-", label=name)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    nbytes = [r["bytes"] for r in rows]
    ticks = [t * 10 ** e for e in range(6) for t in (1, 2, 5) if min(nbytes) <= t * 10 ** e <= max(nbytes) * 1.2]
    for ax, label in zip(axes, ("PSNR (dB)", "SSIM")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))  # 10, 20, 50, 100 ...: no crowded minor labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)
