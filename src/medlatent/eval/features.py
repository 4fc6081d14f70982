"""Frozen features: run an encoder over stored images once, cache the (N, D) result."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from medlatent import progress
from medlatent.augment import ops
from medlatent.data.store import to_float


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, mean: list[float], std: list[float],
                     device: torch.device, autocast_dtype: torch.dtype | None = None,
                     batch_size: int = 512, channels_last: bool = False) -> torch.Tensor:
    """Encoder outputs for every image, in order.

    Args:
        encoder: maps (B, C, *S) to (B, D).
        images: (N, C, *S) uint8 or float in [0, 1].
        mean, std: per-channel input standardisation used in pretraining.

    Returns:
        (N, D) float32 on the CPU.
    """
    was_training = encoder.training
    encoder.eval().to(device)
    m = torch.tensor(mean, device=device)
    s = torch.tensor(std, device=device)
    out = []
    for start in range(0, len(images), batch_size):
        x = ops.normalize(to_float(images[start:start + batch_size].to(device)), m, s)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out.append(encoder(x).float().cpu())
        progress.report("features", min(start + batch_size, len(images)), len(images))
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float], device: torch.device,
                   multi_label: bool, autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                   batch_size: int = 512) -> np.ndarray:
    """Class probabilities of a classifier (softmax, or sigmoid per label): (N, K) numpy."""
    model.eval()
    logits = extract_features(model, images, mean, std, device, autocast_dtype, batch_size, channels_last)
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)).numpy()
