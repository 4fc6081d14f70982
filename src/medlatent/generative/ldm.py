"""Latent diffusion: a KL autoencoder to a small latent grid, then DDPM on the latents.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022.
Stage 1 is MONAI's ``AutoencoderKL`` trained with L1 reconstruction plus a small KL weight;
stage 2 is our DDPM (``generative/ddpm.py``) on the latents, scaled by 1 / std so they have
unit variance (the paper's scale factor, measured on the first stage-2 batch). Both stages are
one run: the first ``ae_fraction`` of the steps trains the autoencoder, the rest the diffusion
model with the autoencoder frozen. (MONAI's ``LatentDiffusionInferer`` expects the two models
trained separately; one run keeps checkpoints, resume and budgets in one place.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from medlatent.errors import ConfigError
from medlatent.generative.common import condition_classes, whole_image_views
from medlatent.generative.ddpm import DDPM, DIFFUSION_TRAINING, DDPMConfig, saved_with_epsilon
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class LDMConfig:
    """Autoencoder and latent diffusion sizes for 28-64 px images."""

    # Autoencoder widths: two levels = one 2x downsampling (28 px -> 14x14 latents).
    ae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 3
    kl_weight: float = 1e-6
    # Share of the run's steps spent on the autoencoder before diffusion starts.
    ae_fraction: float = 0.3
    # Diffusion UNet on the 14x14 latents: 14 -> 7, attention at 7x7 (~160 img/s per CPU core).
    diffusion: DDPMConfig = field(default_factory=lambda: DDPMConfig(channels=(32, 64), attention_levels=(False, True)))
    conditional: bool = False


class LDM(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, n_classes: int, cfg: LDMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.autoencoder = AutoencoderKL(spatial_dims, channels, channels, num_res_blocks=1,
                                         channels=cfg.ae_channels, attention_levels=(False,) * len(cfg.ae_channels),
                                         latent_channels=cfg.latent_channels,
                                         norm_num_groups=min(32, cfg.ae_channels[0]),
                                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
        self.diffusion = DDPM(spatial_dims, cfg.latent_channels, n_classes, cfg.diffusion)
        self.register_buffer("scale", torch.zeros(()))  # 1 / std of the latents; 0 until stage 2
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # to know the stage on resume
        self.register_buffer("total", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self) -> nn.Module:
        return self.autoencoder

    @property
    def in_stage_2(self) -> bool:
        return bool(self.total > 0 and self.step >= int(self.cfg.ae_fraction * int(self.total)))

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        x = views[0]
        if not self.in_stage_2:
            recon, mu, sigma = self.autoencoder(x)
            rec = F.l1_loss(recon.float(), x.float())
            kl = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2 + 1e-12) - 1)
            kl = kl.flatten(1).sum(1).mean()
            return StepOutput(rec + self.cfg.kl_weight * kl, {"recon_l1": rec.detach(), "kl": kl.detach()})
        with torch.no_grad():
            self.autoencoder.eval()
            z = self.autoencoder.encode_stage_2_inputs(x)  # (B, latent, *S/2), a posterior sample
            if self.scale == 0:
                self.scale.fill_(1.0 / z.float().std().clamp(min=1e-6))
        out = self.diffusion([z * self.scale], labels)
        return StepOutput(out.loss, {"diffusion": out.loss.detach()})

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.total.fill_(total_steps)
        if self.in_stage_2:  # the diffusion's EMA warm-up counts from the stage switch
            start = int(self.cfg.ae_fraction * total_steps)
            self.diffusion.on_step_end(step - start, total_steps - start)
        self.step.fill_(step + 1)

    @torch.no_grad()
    def generate(self, n: int, shape: tuple[int, ...], labels: torch.Tensor | None = None, steps: int = 50,
                 sampler: str = "ddim", eta: float = 0.0, guidance: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample latents by diffusion, decode them: n images in [-1, 1]."""
        if self.scale == 0:
            raise ConfigError("ldm: the diffusion stage has not started yet; train longer before sampling")
        spatial = [s // 2 ** (len(self.cfg.ae_channels) - 1) for s in shape[1:]]
        z = self.diffusion.generate(n, (self.cfg.latent_channels, *spatial), labels, steps, sampler, eta, guidance,
                                    generator, clip=None)  # latents are not bounded to [-1, 1]
        return self.autoencoder.decode_stage_2_outputs(z / self.scale).clamp(-1, 1)


def _build(encoder: nn.Module, o: LDMConfig, context: BuildContext) -> LDM:
    return LDM(context.spatial_dims, context.channels, condition_classes(o.conditional, context, "LDM"), o)


SPEC = MethodSpec("ldm", LDMConfig, _build, whole_image_views,
                  "latent diffusion (Rombach et al. 2022): MONAI AutoencoderKL + DDPM on its latents",
                  uses_labels=True, trains_unlabelled=True, pixel_range="symmetric", exports_encoder=False,
                  upgrade_saved=saved_with_epsilon,
                  defaults=DIFFUSION_TRAINING)
