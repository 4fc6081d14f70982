"""Heads are data: a list of linear blocks, with presets that quote their papers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LinearBlock:
    """Linear -> optional norm -> optional activation."""

    in_dim: int
    out_dim: int
    norm: Literal["batch", "layer"] | None = None
    act: Literal["relu", "gelu"] | None = None
    bias: bool = True


class ProjectionHead(nn.Module):
    """An MLP built from :class:`LinearBlock` s: ``(B, in_dim) -> (B, out_dim)``."""

    def __init__(self, blocks: Sequence[LinearBlock]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for b in blocks:
            layers.append(nn.Linear(b.in_dim, b.out_dim, bias=b.bias))
            if b.norm == "batch":
                layers.append(nn.BatchNorm1d(b.out_dim))
            elif b.norm == "layer":
                layers.append(nn.LayerNorm(b.out_dim))
            if b.act == "relu":
                layers.append(nn.ReLU(inplace=True))
            elif b.act == "gelu":
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)
        self.blocks = tuple(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def simclr_head(in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> ProjectionHead:
    """SimCLR projection head g(.) (Chen et al., ICML 2020, Sec. 2.1).

    "We use a MLP with one hidden layer to obtain z_i = g(h_i) = W(2) sigma(W(1) h_i) where
    sigma is a ReLU non-linearity." Batch norm after the hidden layer follows the authors'
    released code (and SimCLR v2).
    """
    return ProjectionHead([
        LinearBlock(in_dim, hidden_dim, norm="batch", act="relu"),
        LinearBlock(hidden_dim, out_dim),
    ])
