"""Weighted k-nearest-neighbour classification on cosine similarity.

The protocol of Wu et al. (2018) as used by DINO (Caron et al., ICCV 2021): the k most similar
training features vote for their labels with weight exp(sim / T); k = 20, T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, n_outputs: int,
               multi_label: bool = False, k: int = 20, temperature: float = 0.07,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores for each query.

    Args:
        train_x: (N, D) training features.
        train_y: (N,) class indices, or (N, L) 0/1 labels when ``multi_label``.
        query_x: (Q, D) query features.
        n_outputs: number of classes (or labels).

    Returns:
        (Q, n_outputs) scores: vote shares summing to 1 per row (multi-class), or per-label
        weighted means of the neighbours' labels (multi-label).
    """
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    if multi_label:
        targets = train_y.float()  # (N, L)
    else:
        targets = F.one_hot(train_y.long().view(-1), n_outputs).float()  # (N, K)
    out = []
    for start in range(0, len(query_x), chunk):
        q = F.normalize(query_x[start:start + chunk].float(), dim=1)  # (q, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        w = (sim / temperature).exp()  # (q, k)
        votes = (w.unsqueeze(-1) * targets[idx]).sum(1)  # (q, K)
        out.append(votes / w.sum(1, keepdim=True))
    return torch.cat(out)
