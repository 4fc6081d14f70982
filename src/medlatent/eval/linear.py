"""Linear probe on cached frozen features: a logistic regression fitted by full-batch L-BFGS.

Features are standardised with the training statistics; the L2 penalty is chosen on the
validation split from a small grid (the protocol of SimCLR's and DINO's linear evaluation,
reduced to what cached features allow). Multi-class, binary and ordinal tasks use a softmax
over classes (as MedMNIST's ResNets do); multi-label uses one sigmoid per label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medlatent.data.catalogue import MULTI_LABEL
from medlatent.eval.metrics import medmnist_acc, medmnist_auc

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class LinearProbe:
    """A fitted probe: scores = softmax/sigmoid(((x - mean) / std) @ W.T + b)."""

    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    multi_label: bool
    weight_decay: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return torch.sigmoid(z) if self.multi_label else torch.softmax(z, dim=1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_outputs: int, multi_label: bool,
                 weight_decay: float, max_iter: int = 300) -> LinearProbe:
    """One logistic regression with L2 penalty ``weight_decay * ||W||^2``.

    Args:
        x: (N, D) features. y: (N,) class indices or (N, L) 0/1 labels.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(n_outputs, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_outputs, dtype=torch.float64, requires_grad=True)
    target = y.double() if multi_label else y.long().view(-1)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        data = (F.binary_cross_entropy_with_logits(logits, target) if multi_label
                else F.cross_entropy(logits, target))
        loss = data + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach().float(), b.detach().float(), mean.float(), std.float(),
                       multi_label, weight_decay)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 task: str, n_outputs: int,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> LinearProbe:
    """Fit one probe per weight decay on train; keep the best on val (ACC, then AUC)."""
    multi_label = task == MULTI_LABEL
    best, best_key = None, None
    yv = val_y.numpy()
    for wd in weight_decays:
        probe = fit_logistic(train_x, train_y, n_outputs, multi_label, wd)
        s = probe.scores(val_x.float()).numpy()
        key = (medmnist_acc(yv, s, task), np.nan_to_num(medmnist_auc(yv, s, task)))
        if best_key is None or key > best_key:
            best, best_key = probe, key
    assert best is not None
    return best
