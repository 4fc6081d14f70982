"""Content-based retrieval with an encoder: nearest neighbours on cosine similarity and precision@k."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest(query: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D), (N, D) -> (Q, k) gallery indices and cosine similarities, most similar first."""
    g = F.normalize(gallery.float(), dim=1)
    idx, sim = [], []
    for s in range(0, len(query), chunk):
        q = F.normalize(query[s:s + chunk].float(), dim=1)
        v, i = (q @ g.T).topk(min(k, len(g)), dim=1)
        idx.append(i)
        sim.append(v)
    return torch.cat(idx), torch.cat(sim)


def precision_at_k(query_labels: torch.Tensor, gallery_labels: torch.Tensor, neighbours: torch.Tensor) -> float:
    """Mean fraction of each query's k neighbours that are relevant: same class, or, for
    multi-label (N, L) labels, sharing at least one positive finding."""
    nb = gallery_labels[neighbours]  # (Q, k, L)
    q = query_labels.unsqueeze(1)  # (Q, 1, L)
    if query_labels.shape[1] == 1:
        relevant = (nb == q).all(-1)
    else:
        relevant = ((nb > 0) & (q > 0)).any(-1)
    return float(relevant.float().mean())
