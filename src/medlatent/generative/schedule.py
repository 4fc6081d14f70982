"""The forward (noising) process of a diffusion model: pure math over buffers.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020. With
beta_1..beta_T the noise variances, alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s,

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)          (Eq. 4)

so a noisy sample at any step is one line (:meth:`NoiseSchedule.add_noise`). Salimans and Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022, Sec. 4: with
a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t), the velocity v = a eps - s x_0 gives
eps = s x_t + a v and x_0 = a x_t - s v, both well conditioned at every t (eps-prediction's
x_0 = (x_t - s eps) / a is not, where a -> 0). Nothing here is
mutated after construction; samplers read the buffers. Steps are indexed 0..T-1 as in MONAI
and diffusers (t = 0 is the least noisy step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from medlatent.errors import ConfigError


@dataclass
class ScheduleConfig:
    """The beta schedule."""

    # linear: Ho et al. (1e-4 .. 0.02 over 1000 steps); scaled_linear: linear in sqrt(beta), as
    # latent diffusion uses; cosine: Nichol & Dhariwal 2021, less noise early, better at 28 px
    # where the linear schedule destroys small images within the first few hundred steps.
    kind: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 betas."""
    t = cfg.steps
    if cfg.kind == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, t, dtype=torch.float64)
    if cfg.kind == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, t, dtype=torch.float64) ** 2
    if cfg.kind == "cosine":
        # alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008;
        # beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at 0.999 (Nichol & Dhariwal, Eq. 17).
        s = 0.008
        x = torch.arange(t + 1, dtype=torch.float64) / t
        f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ConfigError(f"schedule.kind: unknown schedule {cfg.kind!r} (linear, scaled_linear, cosine)")


class NoiseSchedule(nn.Module):
    """Betas and their products as buffers (float32 copies of float64 math)."""

    def __init__(self, cfg: ScheduleConfig) -> None:
        super().__init__()
        betas = make_betas(cfg)
        alphas_bar = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_bar", alphas_bar.float(), persistent=False)
        self.steps = cfg.steps

    def alpha_bar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar at steps t (B,), shaped (B, 1, ...) to broadcast over ``ndim``-d images;
        t = -1 means "no noise" (alpha_bar = 1), for the last sampler step."""
        ab = torch.where(t >= 0, self.alphas_bar[t.clamp(min=0)], torch.ones_like(self.alphas_bar[0]))
        return ab.view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4). x0, noise: (B, C, *S); t: (B,)."""
        ab = self.alpha_bar(t, x0.dim())
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the v-prediction target. Shapes as add_noise."""
        ab = self.alpha_bar(t, x0.dim())
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def eps_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v (invert :meth:`velocity` given x_t)."""
        ab = self.alpha_bar(t, x_t.dim())
        return (1 - ab).sqrt() * x_t + ab.sqrt() * v
