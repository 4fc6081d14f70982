"""Losses without negatives: BYOL's normalised regression, DINO's self-distillation, and what
DINOv2 adds to it (Sinkhorn-Knopp teacher targets, iBOT's masked-patch loss, KoLeo)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import dist

CENTRINGS = ("ema", "sinkhorn")


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

    With ``centring="sinkhorn"`` (DINOv2, Oquab et al. 2023, Sec. 4 "Sinkhorn-Knopp centering")
    P_t is :func:`sinkhorn_knopp` of the teacher's outputs instead, and there is no centre.

    Args:
        out_dim: K, the head's output dimension.
        n_global: number of global crops (the teacher sees only these; they come first).
        student_temp: t_s (0.1).
        center_momentum: EMA rate of the centre (0.9).
        centring: "ema" (DINO's centre) or "sinkhorn" (DINOv2's Sinkhorn-Knopp).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2 and SwAV: 3).
    """

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centring: str = "ema", sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if centring not in CENTRINGS:
            raise ValueError(f"centring must be one of {', '.join(CENTRINGS)}, got {centring!r}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centring = centring
        self.sinkhorn_iterations = sinkhorn_iterations
        if centring == "ema":
            self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """
        Args:
            student: (V * B, K) student outputs for V crops, crop-major.
            teacher: (G * B, K) teacher outputs for the G global crops, crop-major.
            teacher_temp: t_t for this step (warmed up by the method).
        """
        if self.centring == "sinkhorn":
            p_t = sinkhorn_knopp(teacher, teacher_temp, self.sinkhorn_iterations)  # (G * B, K)
        else:
            p_t = F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)  # (G * B, K)
        s = (student.float() / self.student_temp).chunk(len(student) // (len(teacher) // self.n_global))
        t = p_t.detach().chunk(self.n_global)
        total, pairs = 0.0, 0
        for i, t_i in enumerate(t):
            for j, s_j in enumerate(s):
                if i == j:
                    continue  # never the same crop
                total = total + torch.sum(-t_i * F.log_softmax(s_j, dim=-1), dim=-1).mean()
                pairs += 1
        if self.centring == "ema":
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


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` summed (or maximised) over processes, in place; identity in one process."""
    if dist.is_distributed():
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(x, op=reduce_op)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV, Caron et al., NeurIPS 2020, Sec. 3.1 and
    Algorithm 1 of its appendix; DINOv2, Oquab et al. 2023, Sec. 4, in place of DINO's centre).

    Q = exp(g_t / t_t), seen as a K x N matrix (prototypes x samples), is scaled to total mass 1,
    then ``n_iterations`` times every prototype's row to mass 1/K and every sample's column to
    mass 1/N: an equipartition of the N samples over the K prototypes. The result is returned
    times N, so each sample's distribution sums to 1 (and each prototype receives ~N/K).

    Under torch.distributed N counts every process's samples and the total and row sums are
    all-reduced (a column is one sample and lives on one process), so two processes with half
    the rows each get exactly the rows the one-process call gives.

    Args:
        logits: (N, K) this process's teacher logits (N may be 0).
        temperature: t_t.
        n_iterations: alternations of row and column scaling (3 in SwAV and DINOv2).

    Returns:
        (N, K) float32 target distributions, rows summing to 1.
    """
    q = logits.float() / temperature  # (N, K)
    top = q.max() if q.numel() else q.new_tensor(float("-inf"))
    q = torch.exp(q - _all_reduce(top, "max")).t()  # (K, N); the global maximum cancels below
    k = q.shape[0]
    n = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))  # N over every process
    q /= _all_reduce(q.sum())  # total mass 1
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: mass 1/K ...
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # ... each sample: mass 1/N
        q /= n
    return (q * n).t()  # (N, K)


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-image-modelling loss (Zhou et al., "iBOT: Image BERT Pre-Training with
    Online Tokenizer", ICLR 2022, Eq. 2; DINOv2, Oquab et al. 2023, Sec. 4 "Patch-level objective").

    The student sees a global crop with some patches replaced by a mask token; the teacher sees
    it whole. At every masked patch i of image b the student's distribution
    log P_s = log_softmax(g_s / t_s) matches the teacher's P_t (Sinkhorn-Knopp over all masked
    patches of the batch, as DINOv2)::

        L = -1/B sum_b 1/|M_b| sum_{i in M_b} sum_k P_t[b, i, k] log P_s[b, i, k]

    averaged per image over its masked patches, then over all B images; an image without masked
    patches adds zero but counts in B (DINOv2's normalisation). Unmasked patches never count.

    Args:
        student_temp: t_s (0.1).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for the teacher (3).
    """

    def __init__(self, student_temp: float = 0.1, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        self.student_temp = student_temp
        self.sinkhorn_iterations = sinkhorn_iterations

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """
        Args:
            student: (B, L, K) student logits for every patch, or (M, K) at the masked patches
                only, in ``x[mask]`` order (what the method passes: its head runs on those only).
            teacher: (B, L, K) or (M, K) teacher logits, likewise.
            mask: (B, L), True (or 1) where the student's patch was masked; M = mask.sum().
            teacher_temp: t_t for this step.
        """
        mask = mask.bool()
        s = student[mask] if student.dim() == 3 else student  # (M, K)
        t = teacher[mask] if teacher.dim() == 3 else teacher  # (M, K)
        if len(s) != int(mask.sum()) or len(t) != len(s):
            raise ValueError(f"expected {int(mask.sum())} masked patches, got student {len(s)}, teacher {len(t)}")
        p_t = sinkhorn_knopp(t, teacher_temp, self.sinkhorn_iterations)  # (M, K)
        per_patch = torch.sum(-p_t * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)  # (M,)
        weight = (1.0 / mask.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(mask)[mask]  # (M,): 1 / |M_b|
        return (per_patch * weight).sum() / len(mask)


class KoLeoLoss(nn.Module):
    """The KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search",
    ICLR 2019, Eq. 5; DINOv2, Oquab et al. 2023, Sec. 4), from the Kozachenko-Leonenko
    differential entropy estimator: on L2-normalised features x_1..x_n of one batch::

        L = -1/n sum_i log(d_i + eps),   d_i = min_{j != i} || x_i - x_j ||

    which pushes every feature away from its nearest neighbour, spreading the batch uniformly.
    Computed on this process's batch only (as DINOv2).

    Args:
        eps: added to each distance (1e-8, DINOv2's).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, D) features, n >= 2 (normalised here)."""
        if x.dim() != 2 or len(x) < 2:
            raise ValueError(f"KoLeo needs (n, D) features with n >= 2, got shape {tuple(x.shape)}")
        x = F.normalize(x.float(), dim=-1, eps=self.eps)  # (n, D)
        with torch.no_grad():
            similarity = x @ x.t()  # (n, n); for unit vectors the nearest is the most similar
            similarity.fill_diagonal_(-3.0)  # never itself
            nearest = similarity.argmax(dim=1)  # (n,)
        distance = (x - x[nearest]).norm(dim=-1)  # (n,), with gradients
        return -torch.log(distance + self.eps).mean()
