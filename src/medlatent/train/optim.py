"""Optimisers (AdamW, SGD, LARS) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from medlatent.config import OptimConfig
from medlatent.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/normalisation parameters (neither),
    as in SimCLR and BYOL."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, lars=True),
            dict(params=no_decay, weight_decay=0.0, lars=False)]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017), SGD with momentum where
    each weight tensor's step is scaled by the trust ratio eta * ||w|| / ||g + wd * w||.

    Groups with ``lars=False`` (biases, norms) take plain SGD steps without decay. PyTorch
    ships no LARS; this is the 20-line version SimCLR and BYOL describe.
    """

    def __init__(self, params: list[dict], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["lars"]:
                    if group["weight_decay"]:
                        d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = p.norm(), d_p.norm()
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    d_p = d_p * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d_p.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over ``model``'s trainable parameters, at peak ``lr``."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    raise ConfigError(f"optim.name: unknown optimiser {cfg.name!r}")


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Linear scaling rule: lr is given for batch 256 (Goyal et al. 2017)."""
    return cfg.lr * batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_fraction: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then half-cosine decay to
    ``final_fraction * peak`` at ``total_steps`` (SGDR without restarts, Loshchilov & Hutter 2017)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    final = peak * final_fraction
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
