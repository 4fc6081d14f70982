"""LoRA on a ViT's attention query and value projections, or on every Linear of its blocks.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. A frozen weight W
gets a trainable low-rank update: ``h = W x + (alpha / r) B A dropout(x)`` with A (r, D) random
and B (D, r) zero, so training starts from the pretrained model exactly. The paper adapts W_q
and W_v; MONAI's attention holds q, k and v in one fused ``qkv`` Linear (rows [q | k | v]), so
the update is added to the q and v thirds only. (peft's LoRA targets whole Linear modules and
would adapt k as well, which is why this is our own.) For inference the update can be merged
into W (no extra cost) and unmerged again.

``LoRALinear`` puts one update on any whole Linear; ``AdaptConfig(lora_targets="all")`` uses it
on every Linear of every block (fused qkv, attention output, both MLP layers), as QLoRA
(Dettmers et al., NeurIPS 2023) found necessary to match full fine-tuning.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def set_merged(layer: LoRAQKV | LoRALinear, weight: torch.Tensor, merged: bool) -> None:
    """Add (merge) or subtract (unmerge) ``layer.delta_weight()`` in ``weight`` once per change of state."""
    if layer.merged != merged:
        delta = layer.delta_weight().to(weight.dtype)
        weight.add_(delta if merged else -delta)
        layer.merged = merged


class LoRAQKV(nn.Module):
    """A fused (D -> 3D) qkv projection with LoRA updates on its q and v parts.

    Args:
        qkv: the frozen ``nn.Linear(D, 3D)``.
        rank: r, the rank of each update.
        alpha: scaling numerator; the update is multiplied by alpha / r.
        dropout: dropout on the input of the low-rank path.
    """

    def __init__(self, qkv: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = qkv
        self.dim = qkv.out_features // 3
        self.lora_A = nn.Parameter(torch.empty(2, rank, qkv.in_features))  # (q|v, r, D)
        self.lora_B = nn.Parameter(torch.zeros(2, self.dim, rank))  # (q|v, D, r): zero, so no change at start
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and the reference code)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(3D, D): the update (alpha / r) [B_q A_q; 0; B_v A_v] in the fused layout."""
        dq, dv = (self.lora_B @ self.lora_A) * self.scaling  # (D, D) each
        return torch.cat([dq, torch.zeros_like(dq), dv])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)  # (B, L, 3D)
        if self.merged:
            return out
        low = torch.einsum("bld,srd->sblr", self.dropout(x), self.lora_A)  # (2, B, L, r)
        dq, dv = torch.einsum("sblr,sor->sblo", low, self.lora_B) * self.scaling  # (B, L, D) each
        return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def merge(self) -> None:
        """W <- W + delta: same outputs (without dropout), no extra inference cost."""
        set_merged(self, self.qkv.weight, True)

    def unmerge(self) -> None:
        """W <- W - delta: back to the base weights and a separate low-rank path."""
        set_merged(self, self.qkv.weight, False)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear(D_in, D_out)`` with one low-rank update: h = W x + (alpha / r) B A x.

    Args:
        linear: the frozen layer.
        rank: r; A is (r, D_in) random, B is (D_out, r) zero.
        alpha: scaling numerator; the update is multiplied by alpha / r.
        dropout: dropout on the input of the low-rank path.
    """

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features))  # (r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))  # (D_out, r): zero, no change at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(D_out, D_in): the update (alpha / r) B A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)  # (..., D_out)
        if self.merged:
            return out
        return out + (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scaling  # (..., r) -> (..., D_out)

    def merge(self) -> None:
        """W <- W + delta."""
        set_merged(self, self.linear.weight, True)

    def unmerge(self) -> None:
        """W <- W - delta."""
        set_merged(self, self.linear.weight, False)


def lora_layers(model: nn.Module) -> list[LoRAQKV | LoRALinear]:
    return [m for m in model.modules() if isinstance(m, (LoRAQKV, LoRALinear))]


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()
