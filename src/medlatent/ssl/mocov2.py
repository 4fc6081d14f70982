"""MoCo v2 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020; Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020).

A query encoder and a momentum (EMA) key encoder; negatives are the keys of earlier batches,
kept in a FIFO queue. Loss: InfoNCE over [positive key, queue] (Eq. 1), or a triplet loss
against the hardest queued key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent.config import ViewConfig, bounded
from medlatent.losses import InfoNCELoss, TripletLoss
from medlatent.nets.heads import mocov2_head
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import FIFOQueue, ema_update, make_teacher


@dataclass
class MoCoV2Config:
    temperature: float = bounded(0.2, gt=0)  # MoCo v2's value
    # The paper's 0.999 suits ~5k steps per epoch on ImageNet; with tens of steps per epoch on
    # MedMNIST the key encoder must follow faster.
    momentum: float = bounded(0.99, ge=0, le=1)
    # Queue length K. None: the paper's ratio (65,536 keys for 1.28 M images, ~5 %) applied to
    # the training set, at least 4 batches.
    queue_size: int | None = None
    hidden_dim: int = 512
    out_dim: int = 128
    objective: Literal["infonce", "triplet"] = "infonce"
    margin: float = bounded(0.2, ge=0)


def default_queue_size(n_images: int, batch_size: int) -> int:
    """5 % of the training set (MoCo's 65,536 / 1.28 M), at least 4 batches, at most 65,536."""
    return int(min(65536, max(4 * batch_size, round(0.05 * n_images))))


class MoCoV2(nn.Module):
    """Query encoder f_q + head, momentum key encoder f_k + head, a queue of keys."""

    def __init__(self, encoder: nn.Module, queue_size: int, temperature: float = 0.2, momentum: float = 0.99,
                 hidden_dim: int = 512, out_dim: int = 128, objective: str = "infonce", margin: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = mocov2_head(encoder.out_dim, hidden_dim, out_dim)
        self.key_encoder = make_teacher(encoder)
        self.key_projection = make_teacher(self.projection)
        self.queue = FIFOQueue(queue_size, out_dim)
        self.momentum = momentum
        self.objective = objective
        self.criterion = InfoNCELoss(temperature) if objective == "infonce" else TripletLoss(margin)
        self._keys: torch.Tensor | None = None

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x_q, x_k = views  # (B, C, H, W) each
        q = self.projection(self.encoder(x_q))  # (B, P) queries
        with torch.no_grad():
            k = F.normalize(self.key_projection(self.key_encoder(x_k)).float(), dim=1)  # (B, P) keys
        if self.objective == "infonce":
            loss = self.criterion(q, k, self.queue.keys)
        else:
            loss = self.criterion(q, k, negatives=self.queue.keys)
        self._keys = k
        return StepOutput(loss)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Momentum update of the key encoder, then enqueue this step's keys (Algorithm 1)."""
        ema_update(self.key_encoder, self.encoder, self.momentum)
        ema_update(self.key_projection, self.projection, self.momentum)
        if self._keys is not None:
            self.queue.push(self._keys)
            self._keys = None


def _build(encoder: nn.Module, o: MoCoV2Config, context: BuildContext) -> MoCoV2:
    size = o.queue_size or default_queue_size(context.n_images, context.batch_size)
    return MoCoV2(encoder, size, o.temperature, o.momentum, o.hidden_dim, o.out_dim, o.objective, o.margin)


def _views(base: ViewConfig, size: int, o: MoCoV2Config) -> list[tuple[ViewConfig, int]]:
    return [(base, size), (base, size)]


SPEC = MethodSpec("mocov2", MoCoV2Config, _build, _views,
                  "MoCo v2: momentum key encoder, queue of negatives, InfoNCE")
