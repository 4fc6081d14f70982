"""SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020).

Two random views of each image go through the encoder f and the projection head g; NT-Xent
pulls each pair together and pushes it away from the other 2(N - 1) views in the batch.
Loss: mean over the 2N views of -log softmax_j(sim(z_i, z_j) / t) (Eq. 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from medlatent.config import ViewConfig, bounded
from medlatent.losses import NTXentLoss, TripletLoss
from medlatent.nets.heads import simclr_head
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class SimCLRConfig:
    # 0.1-0.5 is the paper's range (Table 5); 0.2 suits batches of a few hundred.
    temperature: float = bounded(0.2, gt=0)
    # Hidden width of g. The paper uses the encoder width (2048 for ResNet-50); 512 keeps the
    # head small next to a 256-d half-width ResNet.
    hidden_dim: int = 512
    # 128-d projections, as in the paper.
    out_dim: int = 128
    # Negatives from every process under torchrun (the paper's global batch).
    gather_distributed: bool = True
    # "triplet" swaps NT-Xent for a triplet margin loss on the same projections (anchor = one
    # view, positive = the other, negative = the hardest other image in the batch).
    objective: Literal["ntxent", "triplet"] = "ntxent"
    margin: float = bounded(0.2, ge=0)


class SimCLR(nn.Module):
    """Encoder f, projection head g, NT-Xent loss."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, hidden_dim: int = 512,
                 out_dim: int = 128, gather_distributed: bool = True, objective: str = "ntxent",
                 margin: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = simclr_head(encoder.out_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature, gather_distributed) if objective == "ntxent" else TripletLoss(margin)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x_i, x_j = views  # two (B, C, H, W) views of the same images
        h = self.encoder(torch.cat([x_i, x_j]))  # (2B, D): representations, one forward pass
        z = self.projection(h)  # (2B, P): projections
        z_i, z_j = z.chunk(2)  # (B, P) each
        return StepOutput(self.criterion(z_i, z_j))

    def on_step_end(self, step: int, total_steps: int) -> None:
        """SimCLR keeps no state between steps."""


def _build(encoder: nn.Module, o: SimCLRConfig, context: BuildContext) -> SimCLR:
    return SimCLR(encoder, o.temperature, o.hidden_dim, o.out_dim, o.gather_distributed, o.objective, o.margin)


def _views(base: ViewConfig, size: int, o: SimCLRConfig) -> list[tuple[ViewConfig, int]]:
    return [(base, size), (base, size)]  # two views from the same distribution


SPEC = MethodSpec("simclr", SimCLRConfig, _build, _views,
                  "SimCLR: two views, NT-Xent against the other images in the batch")
