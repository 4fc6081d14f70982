"""Adaptation strategies: which parameters of a pretrained encoder train, and what is added.

``adapt(encoder, cfg)`` returns a copy of the encoder with the strategy applied and only the
strategy's parameters requiring gradients (the classifier head, added later, always trains):

========== =========================================================================
linear     nothing in the encoder (linear probe through the training loop)
finetune   everything
bias       the biases only (BitFit: Ben Zaken et al., ACL 2022)
lora       low-rank updates of W_q and W_v, or of every Linear, in every block (``adapt/lora.py``)
adapter    Houlsby bottlenecks after attention and MLP (``adapt/adapters.py``)
adaptformer AdaptFormer's parallel scaled MLP adapter (``adapt/adapters.py``)
prompt     visual prompt tokens, deep or shallow (``adapt/prompts.py``)
========== =========================================================================

A new strategy is one more branch of :func:`adapt` and its name in :data:`STRATEGIES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from medlatent.adapt.adapters import AdaptFormerMLP, Bottleneck, SerialAdapter
from medlatent.adapt.lora import LoRALinear, LoRAQKV
from medlatent.adapt.prompts import PromptedViT
from medlatent.errors import ConfigError
from medlatent.nets.backbones import ViTEncoder

STRATEGIES = ("linear", "finetune", "bias", "lora", "adapter", "adaptformer", "prompt")
VIT_ONLY = ("lora", "adapter", "adaptformer", "prompt")


@dataclass
class AdaptConfig:
    """What to train. Defaults follow the papers, scaled to ViT-tiny (D = 192)."""

    strategy: Literal["linear", "finetune", "bias", "lora", "adapter", "adaptformer", "prompt"] = "lora"
    # LoRA rank r; also the bottleneck width of the adapters (Houlsby, AdaptFormer use 64 at
    # D = 768; 8 keeps the same ratio at D = 192).
    rank: int = 8
    # LoRA scaling numerator: updates are multiplied by alpha / rank (alpha = 2r is common).
    alpha: float = 16.0
    # Dropout on LoRA's low-rank path.
    dropout: float = 0.0
    # Where LoRA goes: "qv", the paper's W_q and W_v; "all", every Linear of every block (fused
    # qkv, attention output, both MLP layers; QLoRA's recipe). On ViT-tiny "all" at rank 2
    # trains exactly as many parameters as "qv" at rank 8.
    lora_targets: Literal["qv", "all"] = "qv"
    # AdaptFormer's scale s of the parallel branch (0.1 in the paper).
    scale: float = 0.1
    # Prompt tokens per layer (VPT) and deep (every block) or shallow (input only).
    prompts: int = 10
    deep: bool = True


def adapt(encoder: nn.Module, cfg: AdaptConfig) -> nn.Module:
    """A copy of ``encoder`` with ``cfg.strategy`` applied; only its parameters train."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{cfg.strategy}' (known: {', '.join(STRATEGIES)})")
    if cfg.strategy in VIT_ONLY and not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"strategy {cfg.strategy} adapts transformer blocks and needs a ViT encoder "
                          f"(vit-tiny, vit-small or external ViT weights), not {type(encoder).__name__}")
    model = copy.deepcopy(encoder)
    model.requires_grad_(cfg.strategy == "finetune")
    if cfg.strategy == "bias":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
    if cfg.strategy == "lora":
        if cfg.lora_targets not in ("qv", "all"):
            raise ConfigError(f"unknown lora_targets '{cfg.lora_targets}' (known: qv, all)")
        for block in model.blocks:
            if cfg.lora_targets == "qv":
                block.attn.qkv = LoRAQKV(block.attn.qkv, cfg.rank, cfg.alpha, cfg.dropout)
                continue
            for parent, name in ((block.attn, "qkv"), (block.attn, "out_proj"), (block.mlp, "linear1"),
                                 (block.mlp, "linear2")):
                setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
    if cfg.strategy == "adapter":
        for block in model.blocks:
            block.attn = SerialAdapter(block.attn, Bottleneck(model.out_dim, cfg.rank))
            block.mlp = SerialAdapter(block.mlp, Bottleneck(model.out_dim, cfg.rank))
    if cfg.strategy == "adaptformer":
        for block in model.blocks:
            block.mlp = AdaptFormerMLP(block.norm2, block.mlp, Bottleneck(model.out_dim, cfg.rank, nn.ReLU), cfg.scale)
            block.norm2 = nn.Identity()
    if cfg.strategy == "prompt":
        model = PromptedViT(model, cfg.prompts, cfg.deep)
    if isinstance(model, ViTEncoder) or isinstance(model, PromptedViT):
        for block in (model.vit if isinstance(model, PromptedViT) else model).blocks:
            block.norm_cross_attn.requires_grad_(False)  # MONAI's unused norm never trains
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
