"""Variational autoencoder with a global latent vector, optionally class-conditional.

Kingma and Welling, "Auto-Encoding Variational Bayes", ICLR 2014; beta-VAE weighting from
Higgins et al., ICLR 2017; conditional VAE from Sohn et al., NeurIPS 2015 (the class is given
to both the encoder and the decoder). The loss is the negative ELBO per image,

    L = || x - dec(z) ||^2 / (2 sigma^2)  +  beta * KL(q(z|x) || N(0, I)),   z = mu + sigma_q * eps

with a Gaussian likelihood of fixed sigma, so the reconstruction term is a scaled sum of
squares over pixels. A global latent (not a latent grid, as MONAI's AutoencoderKL uses) gives
prior samples and straight-line interpolations between two images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.errors import ConfigError
from medlatent.generative.common import condition_classes, conv, conv_transpose, one_hot, whole_image_views
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class VAEConfig:
    """Sizes for 28-64 px images."""

    # Latent dimension: 32 keeps 28-px cells recognisable without blurring them into a mean.
    latent_dim: int = 32
    # Width of the first convolution; doubled at the second (two stride-2 stages).
    width: int = 32
    # beta of the KL term (1: the ELBO).
    beta: float = 1.0
    # Likelihood scale: sigma of the Gaussian decoder, in [-1, 1] pixel units.
    sigma: float = 0.1
    conditional: bool = False


class VAE(nn.Module):
    """(B, C, *S) in [-1, 1] -> ELBO; ``encode``, ``decode``, ``generate``, ``interpolate``."""

    def __init__(self, spatial_dims: int, channels: int, image_size: int, n_classes: int, cfg: VAEConfig) -> None:
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"vae: image size {image_size} must be a multiple of 4 (two stride-2 stages)")
        C, T, w = conv(spatial_dims), conv_transpose(spatial_dims), cfg.width
        self.grid = (image_size // 4,) * spatial_dims
        flat = 2 * w * (image_size // 4) ** spatial_dims
        self.n_classes, self.cfg, self.channels = n_classes, cfg, channels
        self.features = nn.Sequential(C(channels, w, 4, 2, 1), nn.SiLU(), C(w, 2 * w, 4, 2, 1), nn.SiLU(), nn.Flatten())
        self.to_stats = nn.Linear(flat + n_classes, 2 * cfg.latent_dim)  # (mu, log sigma^2)
        self.from_latent = nn.Linear(cfg.latent_dim + n_classes, flat)
        self.decoder = nn.Sequential(nn.SiLU(), T(2 * w, w, 4, 2, 1), nn.SiLU(), T(w, channels, 4, 2, 1))

    @property
    def encoder(self) -> nn.Module:
        return self.features

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, *S) -> (mu, logvar), each (B, latent_dim)."""
        h = torch.cat([self.features(x), one_hot(labels, self.n_classes, len(x), x.device)], dim=1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, *S) (unbounded; [-1, 1] after training)."""
        h = self.from_latent(torch.cat([z, one_hot(labels, self.n_classes, len(z), z.device)], dim=1))
        return self.decoder(h.view(len(z), -1, *self.grid))

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        x = views[0]
        mu, logvar = self.encode(x, labels)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterisation
        recon = self.decode(z, labels)
        rec = ((recon.float() - x.float()) ** 2).flatten(1).sum(1) / (2 * self.cfg.sigma ** 2)  # (B,)
        kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(1)  # (B,)
        loss = (rec + self.cfg.beta * kl).mean()
        return StepOutput(loss, {"recon": rec.mean().detach(), "kl": kl.mean().detach()})

    def on_step_end(self, step: int, total_steps: int) -> None:
        pass

    @torch.no_grad()
    def generate(self, n: int, shape: tuple[int, ...], labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
        """Decode z ~ N(0, I): n images in [-1, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)
        return self.decode(z, labels.to(device) if labels is not None else None).clamp(-1, 1)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded points on the line between the posterior means of images a and b (1, C, *S)."""
        mu_a, _ = self.encode(a, labels)
        mu_b, _ = self.encode(b, labels)
        w = torch.linspace(0, 1, steps, device=a.device)[:, None]
        z = (1 - w) * mu_a + w * mu_b  # (steps, latent_dim)
        return self.decode(z, labels.expand(steps) if labels is not None else None).clamp(-1, 1)


def _build(encoder: nn.Module, o: VAEConfig, context: BuildContext) -> VAE:
    return VAE(context.spatial_dims, context.channels, context.image_size,
               condition_classes(o.conditional, context, "VAE"), o)


SPEC = MethodSpec("vae", VAEConfig, _build, whole_image_views,
                  "VAE (Kingma & Welling 2014): ELBO with beta, prior samples, interpolation; conditional option",
                  uses_labels=True, pixel_range="symmetric", exports_encoder=False,
                  defaults={"optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_epochs": 1.0, "clip_grad_norm": 100.0},
                            "train": {"batch_size": 128}})
