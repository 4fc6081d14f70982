"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021).

Self-distillation with no labels: a student sees every crop (2 global, several small local
ones), an EMA teacher sees only the global crops; the student matches the teacher's centred
and sharpened distribution over K prototypes for every (global, other crop) pair. The
teacher temperature warms up linearly; the teacher momentum follows a cosine to 1. For a ViT
encoder the last layer's CLS attention gives the self-supervised segmentation maps
(``medlatent attention``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.augment.views import blur_sigma
from medlatent.config import ViewConfig, bounded
from medlatent.losses import DINOLoss
from medlatent.nets.heads import DINOHead
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import cosine_schedule, ema_update, forward_multicrop, linear_warmup, make_teacher


@dataclass
class DINOConfig:
    out_dim: int = 4096  # K prototypes; the paper's 65,536 is for ImageNet's 1.28 M images
    hidden_dim: int = 1024  # paper 2048
    bottleneck_dim: int = 256  # the paper's
    n_local_crops: int = 6  # the paper's 6-10
    # Local crop side; None: 3/7 of the image (the paper's 96/224), rounded to a multiple of 4.
    local_size: int | None = None
    global_scale: tuple[float, float] = (0.4, 1.0)  # the paper's
    local_scale: tuple[float, float] = (0.1, 0.4)  # the paper's (0.05, 0.4), floor raised for 28 px
    student_temp: float = bounded(0.1, gt=0)
    teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp: float = bounded(0.04, gt=0)
    # Fraction of training over which the teacher temperature warms up (30 of 100 epochs in the paper).
    warmup_teacher_temp_fraction: float = 0.3
    momentum: float = bounded(0.99, ge=0, le=1)  # start of the cosine to 1 (paper 0.996 over 300 epochs of ImageNet)
    center_momentum: float = bounded(0.9, ge=0, le=1)


class DINO(nn.Module):
    """Student (encoder + head) and EMA teacher, DINO loss with centring."""

    def __init__(self, encoder: nn.Module, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256,
                 n_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_fraction: float = 0.3, momentum: float = 0.99,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = DINOHead(encoder.out_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(self.head)
        self.criterion = DINOLoss(out_dim, n_global, student_temp, center_momentum)
        self.n_global = n_global
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_fraction = warmup_fraction
        self.base_momentum = momentum
        self.register_buffer("progress", torch.zeros(2))  # (step, total): schedules survive resume

    def current_teacher_temp(self) -> float:
        """The teacher temperature of the coming step (see :func:`teacher_temperature`)."""
        return teacher_temperature(self.progress, self.warmup_fraction, self.warmup_teacher_temp, self.teacher_temp)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        student = self.head(forward_multicrop(self.encoder, views))  # (V * B, K): every crop
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[: self.n_global])))  # (G * B, K)
        t_temp = self.current_teacher_temp()
        return StepOutput(self.criterion(student, teacher, t_temp), dict(teacher_temp=t_temp))

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.progress.copy_(torch.tensor([step + 1, total_steps], dtype=self.progress.dtype))
        m = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)


def teacher_temperature(progress: torch.Tensor, warmup_fraction: float, warmup_temp: float, temp: float) -> float:
    """The teacher temperature of the coming step: linear from ``warmup_temp`` to ``temp`` over
    the first ``warmup_fraction`` of training, then constant (Caron et al. 2021; the reference
    code's ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)`` starts at the warm-up
    value). ``progress`` is the method's (step, total) buffer, so a resumed run continues the
    schedule; before the first step it is (0, 0), which is step 0 of a warm-up."""
    step, total = (int(v) for v in progress.tolist())
    if total == 0:
        return warmup_temp if warmup_fraction > 0 else temp
    return linear_warmup(step, int(warmup_fraction * total), warmup_temp, temp)


def local_crop_size(size: int) -> int:
    """3/7 of the image side (DINO's 96 of 224), a multiple of 4, at least 8."""
    return max(8, int(round(size * 3 / 7 / 4)) * 4)


def _build(encoder: nn.Module, o: DINOConfig, context: BuildContext) -> DINO:
    return DINO(encoder, o.out_dim, o.hidden_dim, o.bottleneck_dim, 2, o.student_temp, o.teacher_temp,
                o.warmup_teacher_temp, o.warmup_teacher_temp_fraction, o.momentum, o.center_momentum)


def multicrop_views(base: ViewConfig, size: int, n_local_crops: int, global_scale: tuple[float, float],
                    local_scale: tuple[float, float], local_size: int | None) -> list[tuple[ViewConfig, int]]:
    """DINO's multi-crop: two global crops (blur 1.0 / 0.1 + solarisation 0.2 on the second) and
    ``n_local_crops`` small crops (blur 0.5) of side ``local_size`` (None: :func:`local_crop_size`),
    all from the same base distortions. DINOv2 keeps this recipe."""
    sigma = blur_sigma(size)  # SimCLR's 0.1-2.0 px at 224 px, scaled with the side
    g1 = dataclasses.replace(base, crop_scale=global_scale, blur=1.0, blur_sigma=sigma)
    g2 = dataclasses.replace(base, crop_scale=global_scale, blur=0.1, blur_sigma=sigma, solarize=0.2)
    local = dataclasses.replace(base, crop_scale=local_scale, blur=0.5, blur_sigma=sigma)
    small = local_size or local_crop_size(size)
    return [(g1, size), (g2, size)] + [(local, small)] * n_local_crops


def _views(base: ViewConfig, size: int, o: DINOConfig) -> list[tuple[ViewConfig, int]]:
    return multicrop_views(base, size, o.n_local_crops, o.global_scale, o.local_scale, o.local_size)


SPEC = MethodSpec("dino", DINOConfig, _build, _views,
                  "DINO: multi-crop self-distillation with centring and sharpening, EMA teacher")
