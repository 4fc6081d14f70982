"""Losses without negatives: BYOL's normalised regression and DINO's self-distillation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import dist


class BYOLLoss(nn.Module):
    """BYOL's loss (Grill et al., NeurIPS 2020, Eq. 2): the mean squared error between the
    L2-normalised prediction p and target projection z::

        L = || p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)

    averaged over the batch. The target gets no gradient (it comes from the EMA network).
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """p: (N, D) online predictions; z: (N, D) target projections."""
        return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class DINOLoss(nn.Module):
    """DINO's self-distillation loss (Caron et al., ICCV 2021, Eq. 1 and Algorithm 1).

    The teacher's outputs on the global crops are centred and sharpened,
    P_t = softmax((g_t - c) / t_t); the student's on every crop give log P_s = log_softmax(g_s / t_s);
    the loss is the mean over pairs of (teacher global crop i, student crop j), j != i, of
    H(P_t, P_s) = -sum P_t log P_s. The centre c is an EMA of the teacher's batch mean,
    averaged over processes.

    Args:
        out_dim: K, the head's output dimension.
        n_global: number of global crops (the teacher sees only these; they come first).
        student_temp: t_s (0.1).
        center_momentum: EMA rate of the centre (0.9).
    """

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """
        Args:
            student: (V * B, K) student outputs for V crops, crop-major.
            teacher: (G * B, K) teacher outputs for the G global crops, crop-major.
            teacher_temp: t_t for this step (warmed up by the method).
        """
        s = (student.float() / self.student_temp).chunk(len(student) // (len(teacher) // self.n_global))
        t = F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1).detach().chunk(self.n_global)
        total, pairs = 0.0, 0
        for i, t_i in enumerate(t):
            for j, s_j in enumerate(s):
                if i == j:
                    continue  # never the same crop
                total = total + torch.sum(-t_i * F.log_softmax(s_j, dim=-1), dim=-1).mean()
                pairs += 1
        self.update_center(teacher)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher outputs over the global batch)."""
        batch_sum = teacher.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher)), device=teacher.device)
        if dist.is_distributed():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
