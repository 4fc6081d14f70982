"""Visual prompt tuning.

Jia et al., "Visual Prompt Tuning", ECCV 2022. P learnable tokens are inserted between the CLS
token and the patch tokens of a frozen ViT. VPT-shallow inserts them once, at the input;
VPT-deep gives every block its own fresh prompts (the previous block's prompt outputs are
discarded). The output is the CLS token, as for the plain encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from medlatent.nets.backbones import ViTEncoder


class PromptedViT(nn.Module):
    """A ViT encoder with prompt tokens; (B, C, *S) -> (B, D).

    Args:
        vit: the (frozen) encoder; its blocks and norm are used as they are.
        n_prompts: P, prompt tokens per layer.
        deep: VPT-deep (prompts at every block) instead of VPT-shallow.
    """

    def __init__(self, vit: ViTEncoder, n_prompts: int = 10, deep: bool = True) -> None:
        super().__init__()
        self.vit = vit
        dim = vit.out_dim
        self.prompts = nn.Parameter(torch.empty(len(vit.blocks) if deep else 1, n_prompts, dim))  # (layers, P, D)
        bound = math.sqrt(6.0 / (3 * vit.patch_size ** vit.spatial_dims + dim))  # Xavier over patch + D, as VPT
        nn.init.uniform_(self.prompts, -bound, bound)
        self.n_prompts = n_prompts
        self.deep = deep
        self.out_dim, self.in_channels, self.spatial_dims = dim, vit.in_channels, vit.spatial_dims
        self.patch_size, self.num_patches, self.prefers_channels_last = vit.patch_size, vit.num_patches, False

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, 1 + P + L, D) after the last norm."""
        t = self.vit.embed(x)  # (B, L, D)
        b, p = t.shape[0], self.n_prompts
        cls = self.vit.cls_token.expand(b, -1, -1)  # (B, 1, D)
        t = torch.cat([cls, self.prompts[0].expand(b, -1, -1), t], dim=1)  # (B, 1 + P + L, D)
        for i, block in enumerate(self.vit.blocks):
            if self.deep and i > 0:  # replace the prompt outputs by this block's own prompts
                t = torch.cat([t[:, :1], self.prompts[i].expand(b, -1, -1), t[:, 1 + p:]], dim=1)
            t = block(t)
        return self.vit.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]  # (B, D)
