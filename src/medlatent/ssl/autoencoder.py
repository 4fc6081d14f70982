"""Autoencoder pretexts: a bottleneck autoencoder and a denoising autoencoder (Vincent et al.,
ICML 2008) whose encoder is the representation, optionally pretrained greedily layer by layer.

encoder f (the backbone) -> linear bottleneck -> convolutional decoder (MONAI blocks, 2-D or
3-D) -> image. Loss: mean squared error to the clean view; the denoising variant corrupts its
input with Gaussian noise first. The decoder is reused for anomaly detection and denoising.

Greedy layer-wise pretraining (``layerwise=True``; Hinton & Salakhutdinov, Science 2006;
Bengio, Lamblin, Popovici & Larochelle, "Greedy layer-wise training of deep networks", NeurIPS
2006; the course notes' "incremental unsupervised construction of the deep AE"): the ResNet's
four stages (:func:`~medlatent.nets.backbones.encoder_stages`) are trained one at a time, each
with a one-convolution decoder of its own that reconstructs the stage's input, the stages below
it frozen; then the whole autoencoder is fine-tuned end to end (the loss above). In one run this
is a schedule over its steps (:func:`layerwise_stage`), so checkpoints, resume and time budgets
work as for any method.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from medlatent import dist
from medlatent.augment.views import geometric_only
from medlatent.config import ViewConfig, bounded
from medlatent.errors import ConfigError
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.nets.backbones import ResNetEncoder, encoder_stages


@dataclass
class AutoencoderConfig:
    latent_dim: int = 64  # the bottleneck
    decoder_channels: int = 64  # channels of the decoder's smallest feature map
    # Gaussian noise on the input, in standardised units (0: plain autoencoder).
    noise_std: float = 0.0
    # Greedy layer-wise pretraining of the ResNet's four stages before end-to-end training
    # (Bengio et al. 2007). Off by default: the autoencoder as published, trained end to end
    # from the first step (layer-wise pretraining was devised for deep sigmoid networks; with
    # ReLUs, batch norm and residual connections end-to-end training needs no such start).
    layerwise: bool = False
    # Share of the steps spent in the greedy phases, split evenly across the four stages; the
    # rest trains the whole autoencoder end to end. One half gives each stage 1/8 of the run and
    # leaves the bottleneck and the image decoder, which only the end-to-end phase trains, as
    # many steps as all greedy phases together. Below 1: some end-to-end training must remain.
    layerwise_fraction: float = bounded(0.5, gt=0, lt=1)


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


class StageDecoder(nn.Module):
    """A greedy stage's decoder: (B, C_out, *S') -> (B, C_in, *S), nearest-neighbour resizing to
    the stage input's side, then one 3x3 convolution (linear, as the one-layer decoders of
    stacked autoencoders). Resize-then-convolve rather than a transposed convolution: it fits any
    ratio of sides (28 px become 14, 7, then 4, not 3.5) and leaves no checkerboard artefacts
    (Odena, Dumoulin & Olah, Distill 2016).

    Args:
        in_channels: channels of the stage's output C_out.
        out_channels: channels of the stage's input C_in.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, conv_only=True)

    def forward(self, h: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B, C_out, *S'), the side S of the stage's input -> (B, C_in, *S)."""
        return self.conv(F.interpolate(h, size=tuple(size), mode="nearest"))


def layerwise_stage(step: int, total_steps: int, fraction: float, n_stages: int = 4) -> int:
    """The phase that step ``step`` (0-based) of a ``total_steps`` run trains: stage k, 1 to
    ``n_stages``, of the greedy phase, or ``n_stages + 1``, the whole stack end to end.

    The first G = max(1, round(fraction * total_steps)) steps are greedy: step s < G trains
    stage floor(s * n_stages / G) + 1 (G / n_stages steps each when n_stages divides G); the
    others are end to end. A pure function of (step, total_steps), so a resumed run trains what
    an uninterrupted one would; step 0 is stage 1 in every run.
    """
    greedy = max(1, round(fraction * total_steps))
    if step >= greedy:
        return n_stages + 1
    return step * n_stages // greedy + 1


def run_stages(stages: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``stages`` in order (none: ``x`` itself)."""
    for stage in stages:
        x = stage(x)
    return x


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``modules`` as fixed functions: without gradient (so the optimiser, which skips
    parameters whose gradient is None, leaves them as they are), and with batch norm on its
    running statistics, which stay as they are too (in training mode it would update them).
    Each submodule's training flag is put back afterwards."""
    inner = [sub for m in modules for sub in m.modules()]
    modes = [sub.training for sub in inner]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for sub, mode in zip(inner, modes):
            sub.training = mode


class Autoencoder(nn.Module):
    """Bottleneck autoencoder on an encoder; with ``layerwise``, greedy stage-wise pretraining first.

    Args:
        encoder: the backbone, (B, C, *S) -> (B, out_dim); a :class:`ResNetEncoder` for ``layerwise``.
        image_size: side of the images in pixels (a multiple of 4).
        latent_dim: the bottleneck's size.
        decoder_channels: channels of the image decoder's smallest feature map.
        noise_std: Gaussian noise on the input in standardised units (0: no corruption).
        layerwise: train the encoder's stages greedily before the end-to-end phase.
        layerwise_fraction: share of the steps in the greedy phases (see :func:`layerwise_stage`).
    """

    def __init__(self, encoder: nn.Module, image_size: int, latent_dim: int = 64, decoder_channels: int = 64,
                 noise_std: float = 0.0, layerwise: bool = False, layerwise_fraction: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        self.bottleneck = nn.Linear(encoder.out_dim, latent_dim)
        self.decoder = ConvDecoder(latent_dim, encoder.in_channels, image_size, encoder.spatial_dims, decoder_channels)
        self.noise_std = noise_std
        self.layerwise_fraction = layerwise_fraction
        # The encoder's own stage modules, in a plain list (not registered: their parameters are
        # the encoder's, saved once under encoder.*). Empty: no greedy phase.
        self.stages: list[nn.Module] = []
        if layerwise:
            stages = encoder_stages(encoder)
            self.stages = [s.module for s in stages]
            self.stage_decoders = nn.ModuleList(StageDecoder(s.out_channels, s.in_channels, encoder.spatial_dims)
                                                for s in stages)
            # (next step, total steps), saved in checkpoints: a resumed run knows its phase.
            self.register_buffer("progress", torch.zeros(2, dtype=torch.long))
            self._progress = (0, 0)  # its host copy: the phase is read without a device sync
            self.register_load_state_dict_post_hook(_read_progress)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        return self.decoder(self.bottleneck(self.encoder(x)))

    def current_stage(self) -> int:
        """The phase of the coming step: 1-4 a greedy stage, 5 end to end (:func:`layerwise_stage`).
        Before the first step the total is not known yet (0); step 0 is stage 1 in every run."""
        step, total = self._progress
        return layerwise_stage(step, max(total, 1), self.layerwise_fraction, len(self.stages))

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        """One step's loss on ``views[0]`` (B, C, *S): the reconstruction loss, or with ``layerwise``
        the loss of the current phase, logged as ``stage`` (1-4 greedy, 5 end to end)."""
        x = views[0]  # (B, C, *S)
        noisy = x + self.noise_std * torch.randn_like(x) if self.noise_std else x
        if not self.stages:
            return StepOutput(self.reconstruction_loss(noisy, x))
        stage = self.current_stage()
        if stage > len(self.stages):
            loss = self.reconstruction_loss(noisy, x)
        else:
            loss = self.stage_loss(stage, noisy, x)
        return StepOutput(loss, dict(stage=float(stage)))

    def reconstruction_loss(self, noisy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """End to end: MSE between the reconstruction of ``noisy`` and the clean ``x``, both (B, C, *S)."""
        return F.mse_loss(self.reconstruct(noisy).float(), x.float())

    def stage_loss(self, k: int, noisy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Greedy phase k: stage k's output, decoded by its own decoder, against the stage's input,
        the clean image through the frozen stages below k (Bengio et al. 2007, Sec. 2). With noise
        it is the stacked denoising autoencoder's target, the clean input (Vincent et al., JMLR
        2010), the corruption being the image's: one noise scale, in image units, for all stages.

        Args:
            k: the stage being trained, 1 to 4.
            noisy: (B, C, *S) the encoder's input (the corrupted image for the denoising variant).
            x: (B, C, *S) the clean image.
        """
        below = self.stages[:k - 1]
        with frozen(below):  # no gradient reaches stages 1..k-1; stages above k are not run
            target = run_stages(below, x)  # (B, C_k, *S_k) stage k's clean input
            inputs = run_stages(below, noisy) if noisy is not x else target  # (B, C_k, *S_k)
        h = self.stages[k - 1](inputs)  # (B, C_k', *S_k')
        recon = self.stage_decoders[k - 1](h, target.shape[2:])  # (B, C_k, *S_k)
        return F.mse_loss(recon.float(), target.float())

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Record the progress the next step's phase follows from (nothing to do without ``layerwise``)."""
        if self.stages:
            self._progress = (step + 1, total_steps)
            self.progress[0].fill_(step + 1)  # fill_ with host numbers: no device sync
            self.progress[1].fill_(total_steps)


def _read_progress(module: Autoencoder, incompatible_keys: Any) -> None:
    """After ``load_state_dict`` (a resume): the host copy of the loaded ``progress`` buffer."""
    step, total = module.progress.tolist()
    module._progress = (int(step), int(total))


def _build(encoder: nn.Module, o: AutoencoderConfig, context: BuildContext) -> Autoencoder:
    if o.layerwise and not isinstance(encoder, ResNetEncoder):
        raise ConfigError(f"method_options.layerwise: greedy layer-wise pretraining trains a ResNet's four stages "
                          f"one at a time; a {type(encoder).__name__} has none (choose a resnet backbone)")
    if o.layerwise and dist.world_size() > 1:
        raise ConfigError("method_options.layerwise: greedy layer-wise pretraining runs in one process (each phase "
                          "leaves most parameters without gradients, which DistributedDataParallel refuses)")
    if not o.layerwise and o.layerwise_fraction != AutoencoderConfig().layerwise_fraction:
        raise ConfigError(f"method_options.layerwise_fraction: {o.layerwise_fraction} has no effect without "
                          "method_options.layerwise=true")
    return Autoencoder(encoder, context.image_size, o.latent_dim, o.decoder_channels, o.noise_std,
                       o.layerwise, o.layerwise_fraction)


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
