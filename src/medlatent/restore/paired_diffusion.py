"""Conditional (paired) diffusion for image-to-image translation: the denoiser sees x_t and the
degraded image side by side and learns p(clean | degraded).

Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022: eps_theta([x_t, y], t)
trained with the DDPM loss on pairs (y = degraded, x = clean), sampled by DDIM from noise with y
fixed. With paired MRI and CT slices the same module translates one modality into the other;
here the pairs come from the restoration degradations (``restore/tasks.py``), so it is measured
against the UNet on exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from medlatent.generative.common import whole_image_views
from medlatent.generative.ddpm import DDPM, DIFFUSION_TRAINING, DDPMConfig, saved_with_epsilon
from medlatent.generative.samplers import sample
from medlatent.restore.tasks import RestoreConfig, degrade, make_consistent
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import ema_update


@dataclass
class PairedDiffusionConfig:
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    diffusion: DDPMConfig = field(default_factory=DDPMConfig)
    # DDIM steps when restoring.
    sample_steps: int = 25


class PairedDiffusion(nn.Module):
    """Same interface as the UNet restorer (``degrade``, ``restore``, ``cfg.task``)."""

    label = "conditional diffusion"

    def __init__(self, spatial_dims: int, channels: int, cfg: PairedDiffusionConfig) -> None:
        super().__init__()
        extra = 1 if cfg.restore.task == "inpaint" else 0
        self.ddpm = DDPM(spatial_dims, channels, 0, cfg.diffusion, cond_channels=channels + extra)
        self.options = cfg
        self.cfg = cfg.restore  # what the restoration benchmark reads

    @property
    def encoder(self) -> nn.Module:
        return self.ddpm.unet

    def degrade(self, x: torch.Tensor, g: torch.Generator | None = None, level: float | None = None
                ) -> dict[str, torch.Tensor]:
        return degrade(x, self.cfg, g, level)

    def _cond(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        y = d["input"] * 2 - 1  # [-1, 1] like x
        return torch.cat([y, d["mask"]], dim=1) if self.cfg.task == "inpaint" else y

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = views[0]  # (B, C, *S) in [0, 1]
        return StepOutput(self.ddpm.loss(x * 2 - 1, None, cond=self._cond(degrade(x, self.cfg))))

    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.ddpm.ema_unet, self.ddpm.unet, min(self.ddpm.ema, (1 + step) / (10 + step)))

    @torch.no_grad()
    def restore(self, d: dict[str, torch.Tensor], consistent: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        cond = self._cond(d)

        def eps(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return self.ddpm.denoise(x, t, None, ema=True, cond=cond)

        out = sample(eps, self.ddpm.schedule, tuple(d["input"].shape), self.options.sample_steps, "ddim",
                     generator=generator, device=d["input"].device)
        out = (out.clamp(-1, 1) + 1) / 2
        return make_consistent(out, d, self.cfg.task) if consistent else out


def _build(encoder: nn.Module, o: PairedDiffusionConfig, context: BuildContext) -> PairedDiffusion:
    return PairedDiffusion(context.spatial_dims, context.channels, o)


SPEC = MethodSpec("restore-diffusion", PairedDiffusionConfig, _build, whole_image_views,
                  "conditional diffusion on (degraded, clean) pairs (Palette)", pixel_range="unit",
                  exports_encoder=False, upgrade_saved=saved_with_epsilon,
                  defaults={"optim": DIFFUSION_TRAINING["optim"], "train": {"batch_size": 128, "epochs": 20}})
