"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021).

No queue: the keys of the current batch are the negatives. A query encoder with projector and
predictor, a momentum encoder with projector; symmetric loss ctr(q1, k2) + ctr(q2, k1), each
ctr = CE(q k^T / t) * 2t; momentum from 0.99 to 1 on a cosine schedule. For ViTs and ResNets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.config import ViewConfig, bounded
from medlatent.losses import BatchContrastLoss
from medlatent.nets.heads import mocov3_prediction_head, mocov3_projection_head
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import cosine_schedule, ema_update, make_teacher


@dataclass
class MoCoV3Config:
    temperature: float = bounded(0.2, gt=0)  # the paper's value for ViTs (1.0 for ResNets at batch 4096)
    momentum: float = bounded(0.99, ge=0, le=1)  # start of the cosine schedule to 1 (the paper's 0.99)
    hidden_dim: int = 1024  # paper 4096; scaled down with the encoder
    out_dim: int = 256  # the paper's


class MoCoV3(nn.Module):
    """Encoder f_q + projector + predictor; momentum encoder f_k + projector."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, momentum: float = 0.99,
                 hidden_dim: int = 1024, out_dim: int = 256) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = mocov3_projection_head(encoder.out_dim, hidden_dim, out_dim)
        self.predictor = mocov3_prediction_head(out_dim, hidden_dim)
        self.momentum_encoder = make_teacher(encoder)
        self.momentum_projection = make_teacher(self.projection)
        self.base_momentum = momentum
        self.criterion = BatchContrastLoss(temperature)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x1, x2 = views
        b = len(x1)
        q = self.predictor(self.projection(self.encoder(torch.cat([x1, x2]))))  # (2B, P)
        with torch.no_grad():
            k = self.momentum_projection(self.momentum_encoder(torch.cat([x1, x2])))  # (2B, P)
        q1, q2 = q[:b], q[b:]
        k1, k2 = k[:b], k[b:]
        return StepOutput(self.criterion(q1, k2) + self.criterion(q2, k1))

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        ema_update(self.momentum_encoder, self.encoder, m)
        ema_update(self.momentum_projection, self.projection, m)


def _build(encoder: nn.Module, o: MoCoV3Config, context: BuildContext) -> MoCoV3:
    return MoCoV3(encoder, o.temperature, o.momentum, o.hidden_dim, o.out_dim)


def _views(base: ViewConfig, size: int, o: MoCoV3Config) -> list[tuple[ViewConfig, int]]:
    return [(base, size), (base, size)]


SPEC = MethodSpec("mocov3", MoCoV3Config, _build, _views,
                  "MoCo v3: predictor, momentum encoder, symmetric in-batch contrast, no queue")
