"""Mechanics several methods share, as plain functions and two tiny modules.

EMA teachers (BYOL, MoCo, DINO, I-JEPA), momentum and temperature schedules, the MoCo queue,
MAE's random masking, patchify for 2-D and 3-D, fixed sin-cos positions, and multi-crop
grouping. Methods call these; nothing here is inherited.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from medlatent import dist


# ----------------------------------------------------------------------------- teachers / EMA


def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to be updated by :func:`ema_update` only."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter;
    buffers (batch-norm statistics) are copied (BYOL, Grill et al. 2020, Sec. 3.1)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps``.

    BYOL's momentum tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 is
    ``cosine_schedule(k, K, tau_base, 1.0)``."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / max(1, warmup_steps)


# ----------------------------------------------------------------------------- MoCo queue


class FIFOQueue(nn.Module):
    """A first-in first-out queue of (size, dim) keys with wrap-around (MoCo, He et al. 2020).

    The keys live in a buffer, so they are saved in checkpoints and a resumed run continues
    with the same negatives. Under DDP every process enqueues the keys of all processes, in
    rank order, so the queue does not depend on the number of processes.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue (n, dim) keys (this process's; gathered from all), overwriting the oldest."""
        keys = dist.gather_no_grad(keys.detach().to(self.keys.dtype))
        size = self.keys.shape[0]
        n = min(len(keys), size)
        keys = keys[-n:]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % size
        self.keys[idx] = keys
        self.ptr.copy_((self.ptr + n) % size)


# ----------------------------------------------------------------------------- patches / masks


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, *S) -> (B, L, p^d * C): non-overlapping patches in row-major order (MAE's layout,
    matching the order of a strided-conv patch embedding)."""
    b, c, *spatial = x.shape
    d = len(spatial)
    grid = [s // p for s in spatial]
    shape = [b, c] + [v for g in grid for v in (g, p)]
    x = x.reshape(shape)
    # (B, C, g1, p, g2, p[, g3, p]) -> (B, g1, g2[, g3], p, p[, p], C)
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.permute(perm).reshape(b, math.prod(grid), p**d * c)


def unpatchify(patches: torch.Tensor, p: int, channels: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p^d * C) -> (B, C, *spatial)."""
    b = patches.shape[0]
    d = len(spatial)
    grid = [s // p for s in spatial]
    x = patches.reshape([b] + grid + [p] * d + [channels])
    perm = [0, 2 * d + 1] + [v for i in range(d) for v in (1 + i, 1 + d + i)]
    return x.permute(perm).reshape(b, channels, *spatial)


def random_masking(b: int, length: int, mask_ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise (He et al., CVPR 2022).

    Returns:
        keep: (B, L_keep) indices of visible patches, L_keep = round(L * (1 - mask_ratio)).
        mask: (B, L) with 1 for masked (removed) patches, 0 for visible, in original order.
        restore: (B, L) permutation that puts [visible, masked] back in original order.
    """
    n_keep = int(round(length * (1 - mask_ratio)))
    noise = torch.rand(b, length, device=device, generator=generator)  # (B, L)
    shuffle = noise.argsort(dim=1)  # ascending: small noise is kept
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :n_keep]
    mask = torch.ones(b, length, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, restore)
    return keep, mask, restore


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, K) indices -> (B, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_positions(grid: int, dim: int, spatial_dims: int = 2) -> torch.Tensor:
    """Fixed sin-cos position embeddings (L, dim) for a grid of side ``grid`` (MAE, I-JEPA).

    Each spatial axis takes dim / spatial_dims channels: half sines, half cosines of the
    coordinate at geometrically spaced frequencies (Vaswani et al. 2017)."""
    per_axis = dim // spatial_dims // 2 * 2
    coords = torch.meshgrid(*([torch.arange(grid, dtype=torch.float32)] * spatial_dims), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / max(1, per_axis // 2))
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * omega  # (L, per_axis / 2)
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)
    return nn.functional.pad(emb, (0, dim - emb.shape[1]))  # (L, dim)


# ----------------------------------------------------------------------------- multi-crop


def group_by_size(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Consecutive runs of views with the same spatial size: [(start, end), ...].

    DINO's multi-crop forwards each run as one concatenated batch (Caron et al., ICCV 2021),
    e.g. 2 global 28 px crops and 6 local 12 px crops -> [(0, 2), (2, 8)]."""
    groups, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[2:] != views[start].shape[2:]:
            groups.append((start, i))
            start = i
    return groups


def forward_multicrop(module: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Run ``module`` on every view, one forward per size group: -> (V * B, ...) in view order."""
    outs = [module(torch.cat(views[s:e])) for s, e in group_by_size(views)]
    return torch.cat(outs)
