"""2-D maps of an embedding: UMAP when the optional ``umap-learn`` is installed, t-SNE otherwise."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class MapPoints:
    """A 2-D map of embeddings, ready to draw.

    Attributes:
        coords: (M, 2) projected points.
        labels: (M,) class of each point, or None (multi-label or unlabelled: one colour).
        thumbs: (point index, (H, W[, 3]) image) pairs shown beside the map.
        how: the projection used ("UMAP" or "t-SNE").
        index: (M,) position in the split of each point (points are a subsample), or None.
    """

    coords: np.ndarray
    labels: np.ndarray | None
    thumbs: list[tuple[int, np.ndarray]]
    how: str
    index: np.ndarray | None = None


def map_points(features: torch.Tensor, labels: torch.Tensor | None, images: torch.Tensor, max_points: int = 2000,
               n_thumbs: int = 12, seed: int = 0) -> MapPoints:
    """Subsample, project to 2-D and pick thumbnails.

    Args:
        features: (N, D) embeddings; labels: (N, 1) class indices, (N, L) multi-label or None;
            images: (N, C, *S) stored images.
    """
    idx = subsample(labels, len(features), max_points, seed)
    coords, how = embedding_2d(features[idx], seed)
    y = labels[idx, 0].numpy() if labels is not None and labels.shape[1] == 1 else None
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n_thumbs]
    return MapPoints(coords, y, list(zip(pick.tolist(), display_images(images[idx[pick]]))), how, idx.numpy())


def map_callback(images: torch.Tensor, labels: torch.Tensor | None, mean: list[float], std: list[float],
                 device: torch.device, every: int, draw: Callable[[MapPoints, int, int], None],
                 max_points: int = 1000) -> Callable[[nn.Module, int, int], None]:
    """For pretraining: ``callback(encoder, epoch, step)`` maps a fixed subsample of the images
    every ``every`` epochs and hands the points to ``draw(points, epoch, step)``, so the
    representation can be watched forming."""
    idx = subsample(labels, len(images), max_points, 0)
    images, labels = images[idx], None if labels is None else labels[idx]

    def callback(encoder: nn.Module, epoch: int, step: int) -> None:
        if epoch % every:
            return
        points = map_points(extract_features(encoder, images, mean, std, device), labels, images, max_points)
        points.index = idx.numpy()[points.index]  # positions in the whole split, not in the subsample
        draw(points, epoch, step)

    return callback
