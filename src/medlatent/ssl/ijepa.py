"""I-JEPA (Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", CVPR 2023).

From one context block of patches, a narrow predictor predicts the representations that an
EMA target encoder gives to several target blocks of the same image. Targets are sampled
first and removed from the context, so the prediction is never trivial. Loss: mean squared
error between predicted and (layer-normalised) target patch representations, averaged over
the target blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent.augment.views import geometric_only
from medlatent.config import ViewConfig, bounded
from medlatent.nets.backbones import ViTEncoder, transformer_block
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import cosine_schedule, ema_update, gather_tokens, make_teacher, sincos_positions


@dataclass
class IJEPAConfig:
    n_targets: int = 4  # the paper's M = 4
    target_scale: tuple[float, float] = (0.15, 0.2)  # the paper's
    target_aspect: tuple[float, float] = (0.75, 1.5)  # the paper's
    context_scale: tuple[float, float] = (0.85, 1.0)  # the paper's
    predictor_dim: int = 96  # narrow, as the paper's (384 for ViT-H)
    predictor_depth: int = 3  # paper 6-12; the encoder here is tiny
    predictor_heads: int = 3
    momentum: float = bounded(0.99, ge=0, le=1)  # start of the cosine to 1 (paper 0.996)


def sample_block(grid: int, d: int, scale: tuple[float, float], aspect: tuple[float, float],
                 g: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices of one random block of patches on a grid of side ``grid`` (d = 2 or 3)."""
    area = float(torch.empty(1).uniform_(*scale, generator=g)) * grid**d
    if d == 2:
        r = math.exp(float(torch.empty(1).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=g)))
        sides = [round(math.sqrt(area * r)), round(math.sqrt(area / r))]
    else:
        sides = [round(area ** (1 / 3))] * 3
    sides = [min(grid, max(1, s)) for s in sides]
    starts = [int(torch.randint(0, grid - s + 1, (1,), generator=g)) for s in sides]
    ranges = [torch.arange(st, st + s) for st, s in zip(starts, sides)]
    coords = torch.meshgrid(*ranges, indexing="ij")  # axis 0 slowest, as patchify's order
    flat = torch.zeros_like(coords[0])
    for c in coords:
        flat = flat * grid + c
    return flat.reshape(-1)


def sample_masks(b: int, grid: int, d: int, cfg: IJEPAConfig,
                 g: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Context indices (B, Lc) and n_targets target index tensors (B, Lt_i), per sample, with the
    targets removed from the context. Lengths are truncated to the batch minimum (I-JEPA's
    collator does the same), so each is one tensor."""
    contexts, targets = [], [[] for _ in range(cfg.n_targets)]
    for _ in range(b):
        blocks = [sample_block(grid, d, cfg.target_scale, cfg.target_aspect, g) for _ in range(cfg.n_targets)]
        context = sample_block(grid, d, cfg.context_scale, (1.0, 1.0), g)
        taken = torch.cat(blocks)
        context = context[~torch.isin(context, taken)]
        if len(context) == 0:  # degenerate draw: keep one patch outside the targets
            free = torch.arange(grid**d)[~torch.isin(torch.arange(grid**d), taken)]
            context = free[:1] if len(free) else torch.arange(1)
        contexts.append(context)
        for i, blk in enumerate(blocks):
            targets[i].append(blk)
    n_ctx = min(len(c) for c in contexts)
    ctx = torch.stack([c[torch.randperm(len(c), generator=g)[:n_ctx]].sort().values for c in contexts])
    tgt = [torch.stack([t[:min(len(x) for x in ts)] for t in ts]) for ts in targets]
    return ctx, tgt


class Predictor(nn.Module):
    """Narrow ViT predictor: context tokens + mask tokens at target positions -> target representations."""

    def __init__(self, dim: int, predictor_dim: int, depth: int, heads: int, grid: int, spatial_dims: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.register_buffer("pos", sincos_positions(grid, predictor_dim, spatial_dims).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            transformer_block(predictor_dim, 4 * predictor_dim, heads)
            for _ in range(depth))
        self.norm = nn.LayerNorm(predictor_dim)
        self.out = nn.Linear(predictor_dim, dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """context (B, Lc, D), ctx_idx (B, Lc), tgt_idx (B, Lt) -> predictions (B, Lt, D)."""
        b = len(context)
        pos = self.pos.expand(b, -1, -1)  # (B, L, Dp)
        z = self.embed(context) + gather_tokens(pos, ctx_idx)  # (B, Lc, Dp)
        m = self.mask_token.expand(b, tgt_idx.shape[1], -1) + gather_tokens(pos, tgt_idx)  # (B, Lt, Dp)
        t = torch.cat([z, m], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.out(self.norm(t[:, z.shape[1]:]))  # (B, Lt, D): the mask tokens' outputs


class IJEPA(nn.Module):
    """Context encoder (trained), EMA target encoder, predictor."""

    def __init__(self, encoder: ViTEncoder, cfg: IJEPAConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.target_encoder = make_teacher(encoder)
        d = encoder.spatial_dims
        self.grid = round(encoder.num_patches ** (1 / d))
        self.predictor = Predictor(encoder.out_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
                                   self.grid, d)
        self.cfg = cfg

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = views[0]
        ctx_idx, tgt_idx = sample_masks(len(x), self.grid, self.encoder.spatial_dims, self.cfg)
        ctx_idx = ctx_idx.to(x.device)
        with torch.no_grad():
            h = self.target_encoder.tokens(x)[:, 1:]  # (B, L, D): every patch, CLS dropped
            h = F.layer_norm(h.float(), h.shape[-1:])  # targets, normalised as in the paper
        z = self.encoder.tokens(x, keep=ctx_idx)[:, 1:]  # (B, Lc, D): the context block only
        loss = 0.0
        for idx in tgt_idx:
            idx = idx.to(x.device)
            pred = self.predictor(z, ctx_idx, idx)  # (B, Lt, D)
            loss = loss + F.mse_loss(pred.float(), gather_tokens(h, idx))
        return StepOutput(loss / len(tgt_idx))

    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.target_encoder, self.encoder, cosine_schedule(step, total_steps, self.cfg.momentum, 1.0))


def _build(encoder: nn.Module, o: IJEPAConfig, context: BuildContext) -> IJEPA:
    return IJEPA(encoder, o)  # type: ignore[arg-type]


def _views(base: ViewConfig, size: int, o: IJEPAConfig) -> list[tuple[ViewConfig, int]]:
    """I-JEPA uses no hand-crafted view augmentations beyond a crop and flip (Sec. 1)."""
    return [(geometric_only(base, (0.3, 1.0)), size)]


SPEC = MethodSpec("ijepa", IJEPAConfig, _build, _views,
                  "I-JEPA: predict an EMA target encoder's block representations from a context block",
                  needs_vit=True)
