"""The small contract every self-supervised method meets (see DESIGN.md, "The method contract").

A method is an ``nn.Module`` holding an ``encoder`` (what evaluation and export use), its heads
and its loss. ``forward(views)`` returns a :class:`StepOutput`; ``on_step_end`` runs after the
optimiser step (EMA teachers, queues, centres). Nothing else is inherited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.nn as nn

from medlatent.config import ViewConfig


@dataclass
class StepOutput:
    """What one training step produced: the loss to minimise and scalars to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # averaged per logged window


class Method(Protocol):
    encoder: nn.Module

    def forward(self, views: list[torch.Tensor]) -> StepOutput: ...

    def on_step_end(self, step: int, total_steps: int) -> None: ...


@dataclass(frozen=True)
class BuildContext:
    """What a method may need to know about the data when it is built.

    Attributes:
        n_images: size of the pretraining split (MoCo scales its queue to it).
        batch_size: global batch size.
        image_size: side of the stored images in pixels.
        channels: image channels.
        spatial_dims: 2 or 3.
        n_classes: classes of the labels, for class-conditional generative models (0: none).
    """

    n_images: int
    batch_size: int
    image_size: int
    channels: int
    spatial_dims: int
    n_classes: int = 0


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to build a method and which views it consumes.

    Attributes:
        name: the name used by ``--method``.
        options: the method's config dataclass (unknown keys are rejected).
        build: (encoder, options, context) -> method module.
        views: (base view config, image size, options) -> [(view config, size), ...].
        summary: one line for ``--help`` and the README.
        needs_vit: the method works on patch tokens (MAE, I-JEPA) and needs a ViT encoder.
        uses_labels: forward takes (views, labels (B,)) - class-conditional generative models.
        trains_unlabelled: a class-conditional model that also learns the unconditional one
            (classifier-free guidance, Ho & Salimans 2022): an image without a label trains as
            the null class, index ``n_classes`` (``data.label_fraction``).
        pixel_range: "standardised" (per-channel mean/std), "symmetric" ([-1, 1], what
            generative models produce and are trained on) or "unit" ([0, 1], restoration).
        exports_encoder: the run's result is an encoder (written as encoder.safetensors).
        upgrade_saved: method options of a saved run -> the same meaning under today's
            defaults (an option added later gets the value old runs used).
        defaults: the method's own training defaults, as config sections
            (``{"optim": {"lr": 4e-4}, "train": {"batch_size": 128}}``): applied under whatever
            the user gives, by :func:`medlatent.methods.registry.resolve_config`, so the API and
            every CLI command build the same run.
    """

    name: str
    options: type
    build: Callable[[nn.Module, Any, BuildContext], nn.Module]
    views: Callable[[ViewConfig, int, Any], list[tuple[ViewConfig, int]]]
    summary: str
    needs_vit: bool = False
    uses_labels: bool = False
    trains_unlabelled: bool = False
    pixel_range: str = "standardised"
    exports_encoder: bool = True
    upgrade_saved: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
