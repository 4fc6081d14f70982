"""Reconstruction losses: MAE's loss on masked patches."""

from __future__ import annotations

import torch
import torch.nn as nn


class MaskedPatchLoss(nn.Module):
    """MAE's loss (He et al., CVPR 2022, Sec. 3): mean squared error between predicted and
    target pixels, per patch, averaged over the masked patches only. With
    ``norm_pix`` the target of each patch is normalised by its own mean and variance (the
    paper's "normalized pixels" variant, which improves representations)::

        L = sum_l m_l * mean_j (pred_lj - t_lj)^2 / sum_l m_l

    Args:
        norm_pix: normalise each target patch (mean 0, variance 1).
        eps: added to the patch variance.
    """

    def __init__(self, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_pix = norm_pix
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: (B, L, P) predicted patches. target: (B, L, P) true patches.
            mask: (B, L), 1 where a patch was masked.
        """
        target = target.float()
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + self.eps) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)
