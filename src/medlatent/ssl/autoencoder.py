"""Autoencoder pretexts: a bottleneck autoencoder and a denoising autoencoder (Vincent et al.,
ICML 2008) whose encoder is the representation.

encoder f (the backbone) -> linear bottleneck -> convolutional decoder (MONAI blocks, 2-D or
3-D) -> image. Loss: mean squared error to the clean view; the denoising variant corrupts its
input with Gaussian noise first. The decoder is reused for anomaly detection and denoising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from medlatent.augment.views import geometric_only
from medlatent.config import ViewConfig
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class AutoencoderConfig:
    latent_dim: int = 64  # the bottleneck
    decoder_channels: int = 64  # channels of the decoder's smallest feature map
    # Gaussian noise on the input, in standardised units (0: plain autoencoder).
    noise_std: float = 0.0


class ConvDecoder(nn.Module):
    """(B, latent) -> (B, C, *S): linear to a (size / 4)^d map, two x2 transposed convolutions
    (MONAI ``Convolution`` blocks with batch norm and ReLU), a final convolution."""

    def __init__(self, latent_dim: int, out_channels: int, size: int, spatial_dims: int = 2,
                 channels: int = 64) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"the decoder needs an image side divisible by 4, got {size}")
        self.start = (channels, *([size // 4] * spatial_dims))
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        self.up = nn.Sequential(
            Convolution(spatial_dims, channels, channels // 2, strides=2, kernel_size=3, is_transposed=True,
                        norm="batch", act="relu"),
            Convolution(spatial_dims, channels // 2, channels // 4, strides=2, kernel_size=3, is_transposed=True,
                        norm="batch", act="relu"),
            Convolution(spatial_dims, channels // 4, out_channels, kernel_size=3, conv_only=True))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(z).view(len(z), *self.start))


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, image_size: int, latent_dim: int = 64, decoder_channels: int = 64,
                 noise_std: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.bottleneck = nn.Linear(encoder.out_dim, latent_dim)
        self.decoder = ConvDecoder(latent_dim, encoder.in_channels, image_size, encoder.spatial_dims, decoder_channels)
        self.noise_std = noise_std

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        return self.decoder(self.bottleneck(self.encoder(x)))

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = views[0]
        noisy = x + self.noise_std * torch.randn_like(x) if self.noise_std else x
        return StepOutput(F.mse_loss(self.reconstruct(noisy).float(), x.float()))

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Nothing to update."""


def _build(encoder: nn.Module, o: AutoencoderConfig, context: BuildContext) -> Autoencoder:
    return Autoencoder(encoder, context.image_size, o.latent_dim, o.decoder_channels, o.noise_std)


def _views(base: ViewConfig, size: int, o: AutoencoderConfig) -> list[tuple[ViewConfig, int]]:
    """Mild geometric augmentation only: the target is the view itself."""
    return [(geometric_only(base, (0.6, 1.0)), size)]


@dataclass
class DenoisingAutoencoderConfig(AutoencoderConfig):
    noise_std: float = 0.5  # in standardised units: about 0.1-0.15 of the [0, 1] intensity range


SPEC = MethodSpec("autoencoder", AutoencoderConfig, _build, _views,
                  "Bottleneck autoencoder: reconstruct the view through a 64-d code")
DENOISING_SPEC = MethodSpec("denoising-autoencoder", DenoisingAutoencoderConfig, _build, _views,
                            "Denoising autoencoder: reconstruct the clean view from a noisy one")
