"""Bottleneck adapters (Houlsby) and AdaptFormer's parallel MLP adapter, as wrappers of a
MONAI transformer block's sublayers.

* Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019: a bottleneck
  ``h + up(act(down(h)))`` after the attention and after the MLP sublayer.
* Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
  NeurIPS 2022: the same bottleneck (ReLU) in parallel with the MLP, on the block's residual
  stream, scaled by s: ``x + MLP(LN(x)) + s * up(relu(down(x)))``.

The up projections start at zero, so an adapted encoder starts equal to its base.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    """(..., D) -> (..., D): down to ``width``, activation, up again (no residual)."""

    def __init__(self, dim: int, width: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = act()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class SerialAdapter(nn.Module):
    """Houlsby: ``h = sublayer(x); h + adapter(h)``. Keeps the sublayer's call signature."""

    def __init__(self, sublayer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        h = self.sublayer(x, **kwargs)  # (B, L, D)
        return h + self.adapter(h)


class AdaptFormerMLP(nn.Module):
    """AdaptFormer: ``MLP(LN(x)) + s * adapter(x)``; it replaces a block's ``mlp`` while the
    block's ``norm2`` becomes the identity (the norm moves in here), so the block's own
    ``x + mlp(norm2(x))`` computes the AdaptFormer update."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: Bottleneck, scale: float) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.scale * self.adapter(x)
