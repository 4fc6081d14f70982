"""Contrastive losses with explicit negatives: InfoNCE with a queue (MoCo v2), the symmetric
in-batch contrast of MoCo v3, and the triplet margin loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import dist


class InfoNCELoss(nn.Module):
    """InfoNCE with a queue of negatives (MoCo, He et al. CVPR 2020, Eq. 1; MoCo v2, Chen et al. 2020).

    For a query q, its positive key k+ and K queued negatives k_i (all L2-normalised)::

        L_q = -log( exp(q . k+ / t) / (exp(q . k+ / t) + sum_i exp(q . k_i / t)) )

    computed as cross-entropy on the logits [q . k+, q . k_1, ..., q . k_K] / t with target 0.

    Args:
        temperature: t > 0 (0.2 in MoCo v2).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """
        Args:
            q: (N, D) queries. k: (N, D) positive keys. queue: (K, D) negative keys.
        """
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        queue = F.normalize(queue.float(), dim=1)
        positive = (q * k).sum(1, keepdim=True)  # (N, 1)
        negative = q @ queue.T  # (N, K)
        logits = torch.cat([positive, negative], dim=1) / self.temperature  # (N, 1 + K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class BatchContrastLoss(nn.Module):
    """MoCo v3's contrastive loss (Chen, Xie, He, ICCV 2021, Algorithm 1)::

        ctr(q, k) = CE(q k^T / t, labels = [0, ..., N-1]) * 2t

    The keys of every process are gathered (no gradient flows to keys: they come from the
    momentum encoder), and each query's positive is its own image's key.

    Args:
        temperature: t > 0 (0.2 for ViTs in the paper).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: (N, D) queries; k: (N, D) keys of the same images from the other view."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        k_all = dist.gather_no_grad(k)  # (W * N, D)
        logits = q @ k_all.T / self.temperature  # (N, W * N)
        labels = torch.arange(len(q), device=q.device) + dist.rank() * len(q)
        return F.cross_entropy(logits, labels) * 2 * self.temperature


class TripletLoss(nn.Module):
    """Triplet margin loss with batch-hard negatives (Schroff et al. 2015; Hermans et al. 2017).

    For anchor a, positive p (another view of the same image) and negative n (the most
    similar view of another image), with cosine distance d(u, v) = 1 - cos(u, v)::

        L = mean over anchors of max(0, d(a, p) - d(a, n) + margin)

    Args:
        margin: required gap between positive and negative distances (cosine units).
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            z_a: (N, D) anchors (one view). z_b: (N, D) positives (the other view, same order).
            negatives: (K, D) extra negatives (a MoCo queue); by default the other images' views.
        """
        z_a, z_b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
        d_pos = 1 - (z_a * z_b).sum(1)  # (N,)
        if negatives is None:
            cand = torch.cat([z_a, z_b])  # (2N, D)
            sim = z_a @ cand.T  # (N, 2N)
            n = len(z_a)
            own = torch.arange(n, device=z_a.device)
            sim[own, own] = float("-inf")  # itself
            sim[own, own + n] = float("-inf")  # its positive
        else:
            sim = z_a @ F.normalize(negatives.float(), dim=1).T  # (N, K)
        d_neg = 1 - sim.max(dim=1).values  # hardest negative
        return F.relu(d_pos - d_neg + self.margin).mean()
