"""2-D maps of an embedding: UMAP when the optional ``umap-learn`` is installed, t-SNE otherwise."""

from __future__ import annotations

import numpy as np
import torch


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
