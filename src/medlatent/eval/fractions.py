"""Stratified, seeded subsets of the training labels (1%, 10%, ... of the labels)."""

from __future__ import annotations

import math

import torch

from medlatent.errors import ConfigError


def label_fraction(labels: torch.Tensor, fraction: float, seed: int, multi_label: bool = False) -> torch.Tensor:
    """Indices of a ``fraction`` of the training set, per class, reproducible by seed.

    Each class keeps ceil(fraction * n_c) images, at least one, so every class stays
    represented. Multi-label sets have no single class per image; they are sampled uniformly.

    Args:
        labels: (N,) or (N, L) labels.

    Returns:
        (M,) sorted int64 indices.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    if fraction == 1:
        return torch.arange(n)
    if multi_label:
        return torch.randperm(n, generator=g)[: max(1, math.ceil(fraction * n))].sort().values
    y = labels.view(n, -1)[:, 0]
    chosen = []
    for c in torch.unique(y):
        members = (y == c).nonzero().view(-1)
        take = max(1, math.ceil(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(chosen).sort().values
