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


def mocov2_head(in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> ProjectionHead:
    """MoCo v2 projection head (Chen, Fan, Girshick, He 2020): "we replace the fc head in MoCo
    with a 2-layer MLP head (hidden layer 2048-d, with ReLU)"."""
    return ProjectionHead([LinearBlock(in_dim, hidden_dim, act="relu"), LinearBlock(hidden_dim, out_dim)])


def byol_projection_head(in_dim: int, hidden_dim: int = 1024, out_dim: int = 256) -> ProjectionHead:
    """BYOL projector g (Grill et al. 2020, Sec. 3.3): "a multi-layer perceptron (MLP) consisting
    in a linear layer with output size 4096 followed by batch normalization, rectified linear
    units (ReLU), and a final linear layer with output dimension 256". Also its predictor q."""
    return ProjectionHead([LinearBlock(in_dim, hidden_dim, norm="batch", act="relu"),
                           LinearBlock(hidden_dim, out_dim)])


def mocov3_projection_head(in_dim: int, hidden_dim: int = 1024, out_dim: int = 256) -> ProjectionHead:
    """MoCo v3 projector (Chen, Xie, He 2021, Sec. 4): "The projection head is a 3-layer MLP ...
    the hidden layers are 4096-d and are with ReLU; the output layers are 256-d, without ReLU.
    In MoCo v3, all layers in both MLPs have BN"."""
    return ProjectionHead([LinearBlock(in_dim, hidden_dim, norm="batch", act="relu"),
                           LinearBlock(hidden_dim, hidden_dim, norm="batch", act="relu"),
                           LinearBlock(hidden_dim, out_dim, norm="batch", bias=False)])


def mocov3_prediction_head(dim: int = 256, hidden_dim: int = 1024) -> ProjectionHead:
    """MoCo v3 predictor: "the prediction head is a 2-layer MLP" (BN in every layer)."""
    return ProjectionHead([LinearBlock(dim, hidden_dim, norm="batch", act="relu"),
                           LinearBlock(hidden_dim, dim, norm="batch", bias=False)])


class DINOHead(nn.Module):
    """DINO projection head (Caron et al., ICCV 2021, Sec. 3.1 and Appendix): "a 3-layer
    multi-layer perceptron (MLP) with hidden dimension 2048 followed by l2 normalization and a
    weight normalized fully connected layer with K dimensions". GELU, no batch norm.

    Args:
        in_dim: encoder output size. out_dim: K. hidden_dim: MLP width. bottleneck_dim: 256.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = ProjectionHead([LinearBlock(in_dim, hidden_dim, act="gelu"),
                                   LinearBlock(hidden_dim, hidden_dim, act="gelu"),
                                   LinearBlock(hidden_dim, bottleneck_dim)])
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)  # the norm g, fixed to 1
        self.last.parametrizations.weight.original0.requires_grad_(False)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, K) logits."""
        z = nn.functional.normalize(self.mlp(x), dim=-1)
        return self.last(z)
