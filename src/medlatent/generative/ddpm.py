"""DDPM: a UNet that predicts the noise added to an image (or its velocity), optionally
class-conditional with label dropout for classifier-free guidance.

Ho et al. 2020, Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), loss = || eps - eps_theta(x_t, t) ||^2
with x_t from Eq. 4. With ``prediction="v"`` (Salimans and Ho 2022) the UNet predicts
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 instead and the loss is || v - v_theta ||^2; either
way :meth:`DDPM.denoise` returns eps, so samplers, guidance, anomaly scoring and restoration
see one interface. Ho and Salimans 2022 (classifier-free guidance): during training the class
is replaced by a "null" class with probability p_uncond, so one network learns both the
conditional and the unconditional model; the same null class lets images without a label (a
user's unlabelled ones, ``data.label_fraction``) train the unconditional half, so a generator
needs only the labels a user has. The denoiser is MONAI's ``DiffusionModelUNet``
(2-D or 3-D; its ``num_class_embeds`` gives the class embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from medlatent.errors import ConfigError
from medlatent.generative.common import condition_classes, whole_image_views
from medlatent.generative.samplers import sample
from medlatent.generative.schedule import NoiseSchedule, ScheduleConfig
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import ema_update, make_teacher


@dataclass
class DDPMConfig:
    """Denoiser size and training choices, sized for 28-64 px images on a small machine."""

    # UNet widths per resolution level (28 -> 14 -> 7 px), attention at the 7x7 level only.
    # Sized for a CPU (1.1 M parameters, ~27 img/s training per core at 28 px); on a GPU use
    # e.g. channels=[64,128,256], attention_levels=[false,true,true].
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # What the UNet predicts. "v" (velocity, Salimans & Ho 2022) keeps the x0 estimate well
    # conditioned at the noisiest steps; "epsilon" (Ho et al.) divides the network's error by
    # sqrt(alpha_bar) there (5e-5 at t = T-1 under the cosine schedule), and with a small,
    # briefly trained UNet that error decided each sample's colour (README, generative models).
    prediction: Literal["epsilon", "v"] = "v"
    # Probability of training a sample as "no class" (classifier-free guidance; 0.1 in the paper).
    p_uncond: float = 0.1
    # Condition on the class labels (needs labelled single-label data).
    conditional: bool = False
    # EMA of the weights, used for sampling (0.9999 in Ho et al. for long runs; 0.999 suits the
    # few thousand steps of a small machine), with warm-up min(ema, (1 + step) / (10 + step)).
    ema: float = 0.999


class DDPM(nn.Module):
    """Noise-prediction diffusion model. Images enter and leave in [-1, 1].

    Args:
        spatial_dims: 2 or 3.
        channels: image channels.
        n_classes: classes for conditioning (0: unconditional). Index n_classes is the null class.
        cond_channels: channels of a conditioning image concatenated to x_t (Palette-style
            image-to-image diffusion, Saharia et al. 2022); 0: none.
    """

    def __init__(self, spatial_dims: int, channels: int, n_classes: int, cfg: DDPMConfig,
                 cond_channels: int = 0) -> None:
        super().__init__()
        if len(cfg.channels) != len(cfg.attention_levels):
            raise ConfigError(f"ddpm: channels {list(cfg.channels)} and attention_levels {list(cfg.attention_levels)} "
                              f"need one entry per resolution level each")
        self.n_classes = n_classes
        self.p_uncond = cfg.p_uncond
        self.prediction = cfg.prediction
        self.unet = DiffusionModelUNet(spatial_dims, channels + cond_channels, channels, num_res_blocks=cfg.num_res_blocks,
                                       channels=cfg.channels, attention_levels=cfg.attention_levels,
                                       num_head_channels=cfg.num_head_channels,
                                       norm_num_groups=min(32, cfg.channels[0]),
                                       num_class_embeds=n_classes + 1 if n_classes else None,
                                       use_flash_attention=True)
        self.schedule = NoiseSchedule(cfg.schedule)
        self.ema_unet = make_teacher(self.unet)
        self.ema = cfg.ema

    @property
    def encoder(self) -> nn.Module:
        """What ``train.compile`` compiles (the denoiser); a generative run exports no encoder."""
        return self.unet

    @property
    def null_label(self) -> int | None:
        return self.n_classes if self.n_classes else None

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                ema: bool = False, cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, c[, y]): (B, C, *S), (B,), (B,) or None[, (B, C', *S)] -> (B, C, *S),
        converted from v where the UNet predicts v."""
        out = self._unet_output(x_t, t, labels, ema, cond)
        return out if self.prediction == "epsilon" else self.schedule.eps_from_velocity(x_t, out, t)

    def _unet_output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, ema: bool,
                     cond: torch.Tensor | None) -> torch.Tensor:
        unet = self.ema_unet if ema else self.unet
        x = x_t if cond is None else torch.cat([x_t, cond], dim=1)
        return unet(x, t, class_labels=labels if self.n_classes else None)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 1 on x0 (B, C, *S) in [-1, 1], labels (B,) or None, conditioning image or None."""
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.steps, (b,), device=x0.device)  # t ~ U{0..T-1}
        noise = torch.randn_like(x0)  # eps ~ N(0, I)
        x_t = self.schedule.add_noise(x0, noise, t)  # Eq. 4
        if self.n_classes:
            if labels is None:
                raise ValueError("a class-conditional DDPM needs labels")
            drop = torch.rand(b, device=x0.device) < self.p_uncond
            # label dropout; unlabelled images arrive as the null class n_classes and stay it
            labels = torch.where(drop, torch.full_like(labels, self.n_classes), labels)
        target = noise if self.prediction == "epsilon" else self.schedule.velocity(x0, noise, t)
        return F.mse_loss(self._unet_output(x_t, t, labels, False, cond).float(), target.float())

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        """Algorithm 1 on a batch x0 = views[0] (B, C, *S) in [-1, 1] with labels (B,)."""
        return StepOutput(self.loss(views[0], labels))

    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.ema_unet, self.unet, min(self.ema, (1 + step) / (10 + step)))

    @torch.no_grad()
    def generate(self, n: int, shape: tuple[int, ...], labels: torch.Tensor | None = None, steps: int = 50,
                 sampler: str = "ddim", eta: float = 0.0, guidance: float = 1.0,
                 generator: torch.Generator | None = None, clip: float | None = 1.0) -> torch.Tensor:
        """n samples of ``shape`` (C, *S), in [-1, 1] (``clip`` None: unbounded, for latents)."""
        device = next(self.parameters()).device

        def eps(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return self.denoise(x, t, c, ema=True)

        x = sample(eps, self.schedule, (n, *shape), steps, sampler, eta,
                   labels.to(device) if labels is not None else None, self.null_label, guidance, generator,
                   device, clip)
        return x.clamp(-clip, clip) if clip is not None else x


def saved_with_epsilon(options: dict[str, Any]) -> dict[str, Any]:
    """Method options of a saved run, with ``prediction: epsilon`` filled in for every diffusion
    config that predates the option (those runs predicted eps; the default is now v). Walks
    nested configs (latent diffusion and paired restoration keep theirs under ``diffusion``)."""
    out = {k: saved_with_epsilon(v) if isinstance(v, dict) else v for k, v in options.items()}
    if "schedule" in out and "p_uncond" in out:  # a DDPMConfig
        out.setdefault("prediction", "epsilon")
    return out


def _build(encoder: nn.Module, o: DDPMConfig, context: BuildContext) -> DDPM:
    return DDPM(context.spatial_dims, context.channels, condition_classes(o.conditional, context, "DDPM"), o)


# Training defaults of the diffusion models (DDPM, latent diffusion, Palette restoration): no
# weight decay, a learning rate of 4e-4 for batch 256 with one warm-up epoch, gradient norm
# clipped at 1 (Ho et al. 2020 clip at 1), batch 128.
DIFFUSION_TRAINING = {"optim": {"lr": 4e-4, "weight_decay": 0.0, "warmup_epochs": 1.0, "clip_grad_norm": 1.0},
                      "train": {"batch_size": 128}}

SPEC = MethodSpec("ddpm", DDPMConfig, _build, whole_image_views,
                  "DDPM (Ho et al. 2020): v- or noise prediction, DDPM/DDIM sampling, classifier-free guidance",
                  uses_labels=True, trains_unlabelled=True, pixel_range="symmetric", exports_encoder=False,
                  upgrade_saved=saved_with_epsilon,
                  defaults=DIFFUSION_TRAINING)
