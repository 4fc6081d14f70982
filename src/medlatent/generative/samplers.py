"""Reverse-process steps (DDPM, DDIM) and the sampling loop, with classifier-free guidance.

* DDPM (Ho et al. 2020, Eq. 11 with sigma_t^2 = beta_t):
  x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z.
* DDIM (Song, Meng and Ermon, ICLR 2021, Eq. 12): with x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),
  x_{t'} = sqrt(ab_t') x0_hat + sqrt(1 - ab_t' - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - ab_t') / (1 - ab_t)) sqrt(1 - ab_t / ab_t') (Eq. 16); eta = 0 is deterministic.
* Classifier-free guidance (Ho and Salimans 2022): eps = eps(x, null) + w (eps(x, c) - eps(x, null)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medlatent import progress
from medlatent.generative.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x_t, t, labels) -> eps


@dataclass
class StepResult:
    """One reverse step: the next (less noisy) sample and the model's estimate of x_0."""

    prev: torch.Tensor
    x0: torch.Tensor


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)  (invert Eq. 4)."""
    ab = schedule.alpha_bar(t, x_t.dim())
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, eps: torch.Tensor,
              generator: torch.Generator | None) -> StepResult:
    """x_t -> x_{t-1} (ancestral sampling, sigma_t^2 = beta_t; no noise at t = 0)."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    beta, ab = schedule.betas[t], schedule.alphas_bar[t]
    mean = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()  # Eq. 11
    if t > 0:
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        mean = mean + beta.sqrt() * z
    return StepResult(mean, predict_x0(schedule, x_t, tt, eps))


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, eta: float,
              generator: torch.Generator | None) -> StepResult:
    """x_t -> x_{t_prev} (t_prev < t; -1 means the clean image)."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    ab = schedule.alphas_bar[t]
    ab_prev = schedule.alphas_bar[t_prev] if t_prev >= 0 else torch.ones_like(ab)
    x0 = predict_x0(schedule, x_t, tt, eps)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()  # Eq. 16
    prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps  # Eq. 12
    if eta > 0 and t_prev >= 0:
        prev = prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return StepResult(prev, x0)


def guided_eps(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               null_label: int | None, guidance: float) -> torch.Tensor:
    """eps with classifier-free guidance (one batched call for the conditional and null halves)."""
    if labels is None or null_label is None or guidance == 1.0:
        return denoiser(x, t, labels)
    null = torch.full_like(labels, null_label)
    eps_c, eps_u = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(denoiser: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], steps: int | None = None,
           sampler: str = "ddim", eta: float = 0.0, labels: torch.Tensor | None = None, null_label: int | None = None,
           guidance: float = 1.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           clip: float | None = 1.0, x_start: torch.Tensor | None = None, t_start: int | None = None,
           x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Draw samples x_0 of ``shape`` (B, C, *S) starting from pure noise x_T ~ N(0, I).

    Args:
        steps: reverse steps; DDPM always uses all T, DDIM an evenly spaced subset (default 50).
        labels: (B,) class indices for a class-conditional denoiser.
        null_label: the "no class" index the denoiser was trained with (label dropout).
        guidance: w; 1 is plain conditional sampling, > 1 trades diversity for class fidelity.
        clip: clamp x0_hat to [-clip, clip] at each step (data live in [-1, 1]); None: no clamp.
        x_start, t_start: start from this noisy x_{t_start} instead of pure noise at T - 1
            (SDEdit-style reconstruction, used by diffusion anomaly scoring); DDIM then spaces
            its ``steps`` over t_start..0.
        x0_transform: applied to each step's x0 estimate (after the clamp), e.g. data
            consistency with measured k-space or known pixels; eps is re-derived from it.
    """
    top = schedule.steps - 1 if t_start is None else t_start
    x = torch.randn(shape, generator=generator, device=device) if x_start is None else x_start  # x_T or x_{t_start}
    if sampler == "ddpm":  # every step, Eq. 11 of Ho et al. 2020
        times = list(range(top, -1, -1))

        def step(x: torch.Tensor, i: int, t: int, eps: torch.Tensor) -> torch.Tensor:
            return ddpm_step(schedule, x, t, eps, generator).prev
    elif sampler == "ddim":  # an evenly spaced subset, Eq. 12 of Song et al. 2021
        n = min(steps or 50, top + 1)
        times = torch.linspace(top, 0, n).round().long().unique_consecutive().tolist()

        def step(x: torch.Tensor, i: int, t: int, eps: torch.Tensor) -> torch.Tensor:
            t_prev = times[i + 1] if i + 1 < len(times) else -1
            return ddim_step(schedule, x, t, t_prev, eps, eta, generator).prev
    else:
        raise ValueError(f"unknown sampler {sampler!r} (ddpm, ddim)")
    for i, t in enumerate(times):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = guided_eps(denoiser, x, tt, labels, null_label, guidance)
        if clip is not None or x0_transform is not None:  # change x0, re-derive eps from it
            x0 = predict_x0(schedule, x, tt, eps)
            x0 = x0.clamp(-clip, clip) if clip is not None else x0
            x0 = x0_transform(x0) if x0_transform is not None else x0
            ab = schedule.alpha_bar(tt, x.dim())
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = step(x, i, t, eps)
        progress.report("sampling", i + 1, len(times))
    return x
