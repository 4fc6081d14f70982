"""Small pieces the generative models share: dimension-generic layers, the identity view, and
class-conditioning helpers."""

from __future__ import annotations

import torch
import torch.nn as nn

from medlatent.augment.views import geometric_only
from medlatent.config import ViewConfig
from medlatent.errors import ConfigError
from medlatent.methods.contract import BuildContext


def conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def conv_transpose(spatial_dims: int) -> type[nn.Module]:
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def whole_image_views(base: ViewConfig, size: int, options: object) -> list[tuple[ViewConfig, int]]:
    """The image itself, flipped where the data allow it: generative models learn whole images,
    so no crops and no photometric changes."""
    return [(geometric_only(base, (1.0, 1.0)), size)]


def one_hot(labels: torch.Tensor | None, n_classes: int, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) class indices -> (B, K) one-hot; (B, 0) when unconditional."""
    if not n_classes:
        return torch.zeros(batch, 0, device=device)
    assert labels is not None, "a class-conditional model needs labels"
    return torch.nn.functional.one_hot(labels.long(), n_classes).float()


def condition_classes(conditional: bool, context: BuildContext, model: str) -> int:
    """Classes a model is conditioned on: the data's when ``conditional``, else 0.

    Raises:
        ConfigError: conditional generation asked for data without single-label classes.
    """
    if conditional and not context.n_classes:
        raise ConfigError(f"method_options.conditional: a class-conditional {model} needs labelled "
                          f"single-label data (these data have no usable class labels)")
    return context.n_classes if conditional else 0
