"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import dist


class NTXentLoss(nn.Module):
    """NT-Xent loss (Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, Eq. 1).

    For 2N projections of N images (two views each), with sim(u, v) the cosine similarity, the
    loss of the positive pair (i, j) is::

        l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    and the loss is the mean of l over all 2N anchors. It is computed as a cross-entropy on
    logits (each anchor's row of similarities, itself masked out), never as a ratio of
    exponentials. With ``gather_distributed``, the candidates of every anchor come from all
    processes (the paper's global batch), with gradients flowing back to their owners.

    Args:
        temperature: t > 0. Lower is sharper; SimCLR's best values lie in 0.1-0.5.
        gather_distributed: use the projections of every process as negatives.
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z_a: (N, D) projections of the first view of N images.
            z_b: (N, D) projections of the second view of the same images, in the same order.

        Returns:
            Scalar loss (float32, whatever the input precision).
        """
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        n = z_a.shape[0]
        z_a = F.normalize(z_a.float(), dim=1)
        z_b = F.normalize(z_b.float(), dim=1)
        offset = 0
        all_a, all_b = z_a, z_b
        if self.gather_distributed and dist.is_distributed():
            all_a, all_b = dist.gather_with_grad(z_a), dist.gather_with_grad(z_b)  # (W*N, D)
            offset = dist.rank() * n
        total = all_a.shape[0]
        anchors = torch.cat([z_a, z_b])  # (2N, D): this process's anchors
        candidates = torch.cat([all_a, all_b])  # (2W*N, D): every view in the global batch
        logits = anchors @ candidates.T / self.temperature  # (2N, 2W*N)
        own = torch.arange(n, device=z_a.device) + offset  # index of each image in the global batch
        self_index = torch.cat([own, own + total])  # where each anchor meets itself
        positive = torch.cat([own + total, own])  # where each anchor meets its other view
        rows = torch.arange(2 * n, device=z_a.device)
        logits[rows, self_index] = float("-inf")
        return F.cross_entropy(logits, positive)
