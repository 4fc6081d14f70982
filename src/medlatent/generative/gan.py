"""A DCGAN-style GAN with the hinge loss, spectral normalisation, a projection discriminator
for classes, and an EMA generator for sampling.

* DCGAN: Radford et al., ICLR 2016 (strided (transposed) convolutions, no pooling).
* Hinge loss and spectral norm: Miyato et al., "Spectral Normalization for GANs", ICLR 2018:
  L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))],  L_G = -E[D(G(z))].
* Projection discriminator: Miyato and Koyama, ICLR 2018: D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.
* EMA generator: Karras et al. (ProGAN), ICLR 2018; Yaz et al., ICLR 2019.

One optimiser step updates both networks (simultaneous gradient descent): the discriminator's
loss sees detached fakes, and the generator's loss goes through a copy of the discriminator's
weights without gradient (``torch.func.functional_call``), so each network gets only its own
gradient and the run fits the shared training loop (one optimiser, checkpoints, resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from medlatent.errors import ConfigError
from medlatent.generative.common import condition_classes, whole_image_views
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import ema_update, make_teacher


@dataclass
class GANConfig:
    """Sizes for 28-px images (2-D)."""

    latent_dim: int = 128
    # Generator and discriminator width at the coarsest (7x7) level (64: ~540 img/s training
    # per CPU core at 28 px; 128 is 6x slower).
    width: int = 64
    conditional: bool = False
    # EMA of the generator weights used for sampling.
    ema: float = 0.999


class Generator(nn.Module):
    """z (B, latent) [+ class embedding] -> (B, C, S, S) in [-1, 1] (tanh); S = 4 * base."""

    def __init__(self, channels: int, image_size: int, latent_dim: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.base = image_size // 4
        self.embed = nn.Embedding(n_classes, latent_dim) if n_classes else None
        self.fc = nn.Linear(latent_dim, width * self.base ** 2)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.ConvTranspose2d(width // 2, width // 4, 4, 2, 1), nn.BatchNorm2d(width // 4), nn.ReLU(),
            nn.Conv2d(width // 4, channels, 3, 1, 1), nn.Tanh())
        self.width = width

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            z = z * self.embed(labels)  # multiplicative class conditioning
        return self.net(self.fc(z).view(len(z), self.width, self.base, self.base))


class Discriminator(nn.Module):
    """(B, C, S, S) [+ labels] -> (B,) realness scores; spectral norm on every layer."""

    def __init__(self, channels: int, width: int, n_classes: int) -> None:
        super().__init__()
        sn = spectral_norm
        self.features = nn.Sequential(
            sn(nn.Conv2d(channels, width // 4, 3, 1, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width // 4, width // 2, 4, 2, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width // 2, width, 4, 2, 1)), nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, width)
        self.psi = sn(nn.Linear(width, 1))
        self.embed = sn(nn.Embedding(n_classes, width)) if n_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.features(x)  # (B, width)
        out = self.psi(h)[:, 0]
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(1)  # projection term
        return out


class GAN(nn.Module):
    def __init__(self, channels: int, image_size: int, n_classes: int, cfg: GANConfig) -> None:
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"gan: image size {image_size} must be a multiple of 4")
        self.cfg, self.n_classes = cfg, n_classes
        self.generator = Generator(channels, image_size, cfg.latent_dim, cfg.width, n_classes)
        self.discriminator = Discriminator(channels, cfg.width, n_classes)
        self.ema_generator = make_teacher(self.generator)

    @property
    def encoder(self) -> nn.Module:
        return self.discriminator

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        real = views[0]
        b = real.shape[0]
        y = labels if self.n_classes else None
        z = torch.randn(b, self.cfg.latent_dim, device=real.device)
        fake = self.generator(z, y)  # fakes share the real batch's labels (class-balanced as the data)
        # Discriminator: hinge on real and (detached) fake.
        d_real = self.discriminator(real, y)
        d_fake = self.discriminator(fake.detach(), y)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        # Generator: through the discriminator with frozen weights (no gradient into D).
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        frozen.update(dict(self.discriminator.named_buffers()))
        loss_g = -functional_call(self.discriminator, frozen, (fake, y)).mean()
        return StepOutput(loss_d + loss_g, {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
                                            "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()})

    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.ema_generator, self.generator, min(self.cfg.ema, (1 + step) / (10 + step)))

    @torch.no_grad()
    def generate(self, n: int, shape: tuple[int, ...], labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)
        g = self.ema_generator.eval()
        return g(z, labels.to(device) if labels is not None and self.n_classes else None).clamp(-1, 1)


def _build(encoder: nn.Module, o: GANConfig, context: BuildContext) -> GAN:
    if context.spatial_dims != 2:
        raise ConfigError("gan: the DCGAN here is 2-D; use ddpm or ldm for 3-D volumes")
    return GAN(context.channels, context.image_size, condition_classes(o.conditional, context, "GAN"), o)


SPEC = MethodSpec("gan", GANConfig, _build, whole_image_views,
                  "GAN (DCGAN, hinge loss, spectral norm, projection discriminator, EMA generator)",
                  uses_labels=True, pixel_range="symmetric", exports_encoder=False,
                  # Adam beta1 = 0.5 (Radford et al. 2016), constant learning rate, no clipping
                  defaults={"optim": {"lr": 4e-4, "weight_decay": 0.0, "warmup_epochs": 0.0, "clip_grad_norm": None,
                                      "betas": [0.5, 0.999], "final_lr_fraction": 1.0},
                            "train": {"batch_size": 128}})
