"""FixMatch's consistency loss on unlabelled images (Sohn et al., "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pseudo_labels(weak_logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels of a weak view and where they are confident enough to use.

    ``q_b = softmax(weak_logits)``, label ``argmax(q_b)``, kept where ``max(q_b) >= tau``. The
    probabilities are computed without gradient: a pseudo-label is a target, not a prediction.

    Args:
        weak_logits: (N, K) logits of the weakly augmented unlabelled images.
        tau: confidence threshold in (0, 1].

    Returns:
        (N,) int64 labels and (N,) float mask (1 where kept).
    """
    with torch.no_grad():
        q = torch.softmax(weak_logits.detach().float(), dim=1)  # (N, K)
        confidence, labels = q.max(dim=1)  # (N,), (N,)
    return labels, (confidence >= tau).float()


class FixMatchLoss(nn.Module):
    """The unlabelled loss of FixMatch (Sohn et al. 2020, Eq. 4)::

        l_u = 1 / (mu B) * sum_b 1(max(q_b) >= tau) * H(argmax(q_b), p_m(y | A(u_b)))

    with ``q_b = p_m(y | alpha(u_b))`` the model's (gradient-free) prediction on a weak view
    alpha, ``A`` the strong augmentation, H the cross-entropy, and the mean taken over *all*
    ``mu B`` unlabelled images of the batch, masked ones counting as zero (as in the paper, so
    the loss grows as more pseudo-labels pass the threshold). The total loss is
    ``l_s + lambda_u * l_u`` (Eq. 5).

    Args:
        tau: confidence threshold in (0, 1] (the paper's 0.95).
    """

    def __init__(self, tau: float = 0.95) -> None:
        super().__init__()
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.tau = tau

    def forward(self, weak_logits: torch.Tensor, strong_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: weak_logits, strong_logits: (N, K) logits of two views of the same N images.

        Returns:
            (scalar loss, (N,) mask of the pseudo-labels used).
        """
        if weak_logits.shape != strong_logits.shape or weak_logits.dim() != 2:
            raise ValueError(f"weak and strong logits must both be (N, K), got {tuple(weak_logits.shape)} "
                             f"and {tuple(strong_logits.shape)}")
        labels, mask = pseudo_labels(weak_logits, self.tau)  # (N,), (N,)
        ce = F.cross_entropy(strong_logits.float(), labels, reduction="none")  # (N,)
        return (ce * mask).mean(), mask
