"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020).

An online network (encoder, projector g, predictor q) regresses the projection of the other
view computed by a target network, an EMA of the online one. No negatives. Symmetric loss
||q(g(f(v))) / ||.|| - g'(f'(v')) / ||.|| ||^2 over both view orders (Eq. 2); the target momentum
follows tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.augment.views import blur_sigma
from medlatent.config import ViewConfig, bounded
from medlatent.losses import BYOLLoss
from medlatent.nets.heads import byol_projection_head
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import cosine_schedule, ema_update, make_teacher


@dataclass
class BYOLConfig:
    # tau_base: the paper's 0.996 assumes ~100k+ steps; a few thousand steps need a faster target.
    momentum: float = bounded(0.99, ge=0, le=1)
    hidden_dim: int = 1024  # paper 4096
    out_dim: int = 256  # the paper's


class BYOL(nn.Module):
    """Online f, g, q; target f', g' (EMA)."""

    def __init__(self, encoder: nn.Module, momentum: float = 0.99, hidden_dim: int = 1024, out_dim: int = 256) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = byol_projection_head(encoder.out_dim, hidden_dim, out_dim)
        self.predictor = byol_projection_head(out_dim, hidden_dim, out_dim)
        self.target_encoder = make_teacher(encoder)
        self.target_projection = make_teacher(self.projection)
        self.base_momentum = momentum
        self.criterion = BYOLLoss()

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        v1, v2 = views
        b = len(v1)
        p = self.predictor(self.projection(self.encoder(torch.cat([v1, v2]))))  # (2B, P) online predictions
        with torch.no_grad():
            z = self.target_projection(self.target_encoder(torch.cat([v1, v2])))  # (2B, P) targets
        loss = self.criterion(p[:b], z[b:]) + self.criterion(p[b:], z[:b])  # symmetrised
        return StepOutput(loss)

    def on_step_end(self, step: int, total_steps: int) -> None:
        tau = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        ema_update(self.target_encoder, self.encoder, tau)
        ema_update(self.target_projection, self.projection, tau)


def _build(encoder: nn.Module, o: BYOLConfig, context: BuildContext) -> BYOL:
    return BYOL(encoder, o.momentum, o.hidden_dim, o.out_dim)


def _views(base: ViewConfig, size: int, o: BYOLConfig) -> list[tuple[ViewConfig, int]]:
    """BYOL's asymmetric pair (Table 6): blur always in view 1, rarely in view 2, solarisation
    only in view 2. Sigma is scaled to the image (the paper's 0.1-2.0 px at 224 px)."""
    sigma = blur_sigma(size)  # SimCLR's 0.1-2.0 px at 224 px, scaled with the side
    return [(dataclasses.replace(base, blur=1.0, blur_sigma=sigma, solarize=0.0), size),
            (dataclasses.replace(base, blur=0.1, blur_sigma=sigma, solarize=0.2), size)]


SPEC = MethodSpec("byol", BYOLConfig, _build, _views,
                  "BYOL: online predictor regresses an EMA target's projection, no negatives")
