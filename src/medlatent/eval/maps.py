"""2-D maps of an embedding: UMAP when the optional ``umap-learn`` is installed, t-SNE otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from medlatent.eval.features import extract_features


def embedding_2d(features: torch.Tensor, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """(N, D) features -> ((N, 2) coordinates, the method used).

    Features are L2-normalised first (the geometry the k-NN probe uses). UMAP (McInnes et al.
    2018) keeps more global structure and is faster on large sets; scikit-learn's t-SNE (van
    der Maaten and Hinton 2008, PCA initialisation) needs no extra package.
    """
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]

            return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(x), "UMAP"
        except ImportError:
            if method == "umap":
                raise
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(5, (len(x) - 1) / 3)))
    return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x), "t-SNE"


def subsample(labels: torch.Tensor | None, n: int, max_points: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_points`` indices, drawn at random (uniformly over images), sorted."""
    if n <= max_points:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_points].sort().values


def display_images(images: torch.Tensor) -> list[np.ndarray]:
    """(N, C, *S) stored images -> (H, W) or (H, W, 3) arrays in [0, 1] for figures (3-D: middle slice)."""
    from medlatent.data.store import to_float

    x = to_float(images)
    if x.dim() == 5:
        x = x[:, :, x.shape[2] // 2]
    return [(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy() for img in x]


def draw_map(features: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], images: torch.Tensor,
             title: str, out: Path, max_points: int = 2000, n_thumbs: int = 12, seed: int = 0) -> Path:
    """Embedding map figure: subsample, project to 2-D, colour by (single) label, add thumbnails.

    Args:
        features: (N, D) embeddings; labels: (N, 1) class indices, (N, L) multi-label or None
            (multi-label and unlabelled points are drawn in one colour); images: (N, C, *S).
    """
    from medlatent.report.figures import embedding_map_figure

    idx = subsample(labels, len(features), max_points, seed)
    coords, how = embedding_2d(features[idx], seed)
    y = labels[idx, 0].numpy() if labels is not None and labels.shape[1] == 1 else None
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n_thumbs]
    thumbs = list(zip(pick.tolist(), display_images(images[idx[pick]])))
    return embedding_map_figure(coords, y, class_names, thumbs, f"{title} ({how})", out)


def map_callback(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], mean: list[float],
                 std: list[float], device: torch.device, out_dir: Path, every: int, title: str,
                 max_points: int = 1000) -> Callable[[nn.Module, int, int], None]:
    """For pretraining: ``callback(encoder, epoch, step)`` draws ``out_dir/epoch-XXXX.png`` every
    ``every`` epochs, so the representation can be watched forming. The same images (a fixed
    subsample of the labelled split) are mapped each time."""
    idx = subsample(labels, len(images), max_points, 0)
    images, labels = images[idx], None if labels is None else labels[idx]

    def callback(encoder: nn.Module, epoch: int, step: int) -> None:
        if epoch % every:
            return
        feats = extract_features(encoder, images, mean, std, device)
        draw_map(feats, labels, class_names, images, f"{title}, epoch {epoch} (step {step})",
                 out_dir / f"epoch-{epoch:04d}.png", max_points)

    return callback
