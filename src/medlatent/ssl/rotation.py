"""Rotation prediction (Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018): every image is fed at 0, 90, 180 and 270 degrees in
the same batch and the encoder + a linear head classify the rotation (cross-entropy over 4).

Rotation carries signal only where images have an up (X-rays, CT, fundus); for cells and
tissue, which have no canonical orientation, the task is nearly unsolvable by design.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent.config import ViewConfig
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class RotationConfig:
    # 0: a linear classifier on the representation (the paper's probe-friendly choice).
    hidden_dim: int = 0


class RotationPrediction(nn.Module):
    def __init__(self, encoder: nn.Module, hidden_dim: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.out_dim
        self.head = nn.Linear(d, 4) if not hidden_dim else nn.Sequential(
            nn.Linear(d, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 4))

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = views[0]  # (B, C, *S), square
        rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])  # (4B, C, *S)
        labels = torch.arange(4, device=x.device).repeat_interleave(len(x))  # (4B,)
        logits = self.head(self.encoder(rotated)).float()  # (4B, 4)
        accuracy = (logits.argmax(1) == labels).float().mean().detach()
        return StepOutput(F.cross_entropy(logits, labels), dict(rotation_acc=accuracy))

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Nothing to update."""


def _build(encoder: nn.Module, o: RotationConfig, context: BuildContext) -> RotationPrediction:
    return RotationPrediction(encoder, o.hidden_dim)


def _views(base: ViewConfig, size: int, o: RotationConfig) -> list[tuple[ViewConfig, int]]:
    """No rotations or vertical flips in the views: they would make the label ambiguous."""
    return [(dataclasses.replace(base, rot90=0.0, vflip=0.0, rotation_degrees=0.0), size)]


SPEC = MethodSpec("rotation", RotationConfig, _build, _views,
                  "Rotation prediction: classify 0/90/180/270-degree rotations (4-way cross-entropy)")
