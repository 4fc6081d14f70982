"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
TMLR 2024; arXiv 2304.07193, 2023).

DINO's self-distillation (multi-crop, EMA teacher, teacher temperature warm-up) with what the
paper's Sec. 4 adds, at small scale:

* iBOT's masked image modelling (Zhou et al., ICLR 2022): on half of the student's global crops
  a random 10-50 % of the patch embeddings are replaced by a mask token; at those patches the
  student's patch tokens, through their own head ("untying head weights"), match the teacher's
  on the unmasked crop;
* Sinkhorn-Knopp centring of the teacher (SwAV, Caron et al. 2020) in place of DINO's EMA
  centre, for the image-level and the patch-level targets;
* the KoLeo regulariser (Sablayrolles et al. 2019) on the student's CLS features of each
  global crop.

Loss = DINO (CLS, cross pairs) + ibot_weight * iBOT (masked patches) + koleo_weight * KoLeo.
ViT encoders only, in 2-D and 3-D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.config import ViewConfig, bounded
from medlatent.errors import ConfigError
from medlatent.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from medlatent.nets.backbones import ViTEncoder
from medlatent.nets.heads import DINOHead
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import cosine_schedule, ema_update, group_by_size, make_teacher
from medlatent.ssl.dino import multicrop_views, teacher_temperature


@dataclass
class DINOv2Config:
    # Image-level prototypes K: DINO's size here; the paper's 65,536-131,072 are for 142 M images.
    out_dim: int = bounded(4096, ge=1)
    # Patch-level prototypes of the separate iBOT head; the paper uses the same K for both heads.
    patch_out_dim: int = bounded(4096, ge=1)
    hidden_dim: int = bounded(1024, ge=1)  # both heads; paper 2048
    bottleneck_dim: int = bounded(256, ge=1)  # the paper's
    # Paper 8 local crops; DINO's 6 here, so that a comparison with DINO changes only the objective.
    n_local_crops: int = bounded(6, ge=0)
    # Local crop side; None: 3/7 of the image (DINO's rule), rounded to a multiple of 4.
    local_size: int | None = None
    global_scale: tuple[float, float] = bounded((0.4, 1.0), gt=0, le=1, ordered=True)  # DINO's; paper (0.32, 1)
    local_scale: tuple[float, float] = bounded((0.1, 0.4), gt=0, le=1, ordered=True)  # DINO's; paper (0.05, 0.32)
    mask_ratio: tuple[float, float] = bounded((0.1, 0.5), ge=0, lt=1, ordered=True)  # the paper's, per masked crop
    mask_probability: float = bounded(0.5, ge=0, le=1)  # share of global crops masked, the paper's
    ibot_weight: float = bounded(1.0, ge=0)  # the paper's
    koleo_weight: float = bounded(0.1, ge=0)  # the paper's
    student_temp: float = bounded(0.1, gt=0)  # the paper's
    teacher_temp: float = bounded(0.07, gt=0)  # the paper's, after the warm-up
    warmup_teacher_temp: float = bounded(0.04, gt=0)  # the paper's
    # Fraction of training over which the teacher temperature warms up (30 of 100 epochs in the paper).
    warmup_teacher_temp_fraction: float = bounded(0.3, ge=0, le=1)
    # Start of the momentum's cosine to 1: DINO's here (paper 0.992-0.994 over 625 k steps); short runs
    # need a teacher that moves.
    momentum: float = bounded(0.99, ge=0, le=1)
    sinkhorn_iterations: int = bounded(3, ge=1)  # the paper's (and SwAV's)


def sample_masks(n: int, length: int, ratio: tuple[float, float], probability: float, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Which patches of ``n`` global crops the student sees as mask tokens: (n, L) bool.

    As DINOv2's collate: int(n * probability) of the crops, chosen at random, are masked; their
    ratios are stratified over ``ratio`` (one uniform draw in each of as many equal bins), and a
    crop with ratio r gets int(L r) masked patches. The patches are chosen uniformly at random
    (MAE's argsort of uniform noise) where DINOv2 masks blocks (BEiT's generator): at 7 x 7
    patches a block of 4+ patches is a large share of the image, and the same rule covers 3-D.
    """
    n_masked = int(n * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked + 1, device=device)  # (n_masked + 1,)
    u = torch.rand(n_masked, device=device, generator=generator)
    ratios = torch.zeros(n, device=device)
    ratios[:n_masked] = edges[:-1] + u * (edges[1:] - edges[:-1])  # one draw in each bin
    ratios = ratios[torch.randperm(n, device=device, generator=generator)]  # (n,): which crops, shuffled
    counts = (ratios * length).long()  # (n,) masked patches per crop
    order = torch.rand(n, length, device=device, generator=generator).argsort(dim=1).argsort(dim=1)  # (n, L) ranks
    return order < counts.unsqueeze(1)  # (n, L): crop i's counts[i] first-ranked patches are masked


class DINOv2(nn.Module):
    """Student (ViT, image head, patch head, mask token) and EMA teacher (ViT and both heads).

    Args:
        encoder: the ViT being trained.
        out_dim, patch_out_dim: prototypes of the image-level and patch-level heads.
        hidden_dim, bottleneck_dim: both heads' MLP width and bottleneck.
        mask_ratio: (low, high) share of patches masked in a masked global crop.
        mask_probability: share of global crops masked.
        ibot_weight, koleo_weight: weights of the patch loss and of KoLeo (the DINO loss has 1).
        student_temp, teacher_temp, warmup_teacher_temp, warmup_fraction: temperatures and the
            teacher's linear warm-up (DINO's schedule).
        momentum: start of the teacher momentum's cosine to 1.
        sinkhorn_iterations: Sinkhorn-Knopp iterations for the teacher targets.
    """

    n_global = 2

    def __init__(self, encoder: ViTEncoder, out_dim: int = 4096, patch_out_dim: int = 4096, hidden_dim: int = 1024,
                 bottleneck_dim: int = 256, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, ibot_weight: float = 1.0, koleo_weight: float = 0.1,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_fraction: float = 0.3, momentum: float = 0.99, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if not isinstance(encoder, ViTEncoder):
            raise ConfigError(f"method dinov2 works on patch tokens and needs a ViT backbone "
                              f"(vit-tiny, vit-small or vit-base), not {type(encoder).__name__}")
        self.encoder = encoder
        self.head = DINOHead(encoder.out_dim, out_dim, hidden_dim, bottleneck_dim)  # image level (CLS)
        self.patch_head = DINOHead(encoder.out_dim, patch_out_dim, hidden_dim, bottleneck_dim)  # patch level, untied
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.out_dim))  # zeros, as iBOT and DINOv2
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(self.head)
        self.teacher_patch_head = make_teacher(self.patch_head)
        self.dino_loss = DINOLoss(out_dim, self.n_global, student_temp, centring="sinkhorn",
                                  sinkhorn_iterations=sinkhorn_iterations)
        self.ibot_loss = IBOTPatchLoss(student_temp, sinkhorn_iterations)
        self.koleo_loss = KoLeoLoss()
        self.mask_ratio, self.mask_probability = mask_ratio, mask_probability
        self.ibot_weight, self.koleo_weight = ibot_weight, koleo_weight
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_fraction = warmup_fraction
        self.base_momentum = momentum
        self.register_buffer("progress", torch.zeros(2))  # (step, total): schedules survive resume

    def current_teacher_temp(self) -> float:
        """The teacher temperature of the coming step (DINO's warm-up, :func:`teacher_temperature`)."""
        return teacher_temperature(self.progress, self.warmup_fraction, self.warmup_teacher_temp, self.teacher_temp)

    def forward_student_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Global crops (B, C, *S), mask (B, L) -> student tokens (B, 1 + L, D).

        "We randomly mask some of the input patches given to the student, but not to the
        teacher" (DINOv2, Sec. 4): a masked patch's embedding is replaced by the mask token,
        which then gets that patch's position embedding (iBOT; DINOv2's ``prepare_tokens_with_masks``)."""
        return self.encoder.tokens(x, mask=mask, mask_token=self.mask_token)

    def forward_student_local(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Local crops, one forward per size group (DINO's multi-crop) -> CLS tokens (V_local * B, D)."""
        if not views:
            return torch.empty(0, self.encoder.out_dim, device=self.mask_token.device)
        return torch.cat([self.encoder.tokens(torch.cat(views[s:e]))[:, 0] for s, e in group_by_size(views)])

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = torch.cat(views[: self.n_global])  # (G * B, C, *S): the global crops, crop-major
        # 1. masks for the student's global crops
        length = math.prod(side // self.encoder.patch_size for side in x.shape[2:])  # L patches per crop
        mask = sample_masks(len(x), length, self.mask_ratio, self.mask_probability, x.device)  # (G * B, L)
        # 2. student: masked global crops (CLS + patches), unmasked local crops (CLS)
        s_global = self.forward_student_masked(x, mask)  # (G * B, 1 + L, D)
        s_cls = torch.cat([s_global[:, 0], self.forward_student_local(views[self.n_global:])])  # (V * B, D)
        s_patch = s_global[:, 1:][mask]  # (M, D): the masked patches only
        # 3. teacher: the unmasked global crops
        with torch.no_grad():
            t_tokens = self.teacher_encoder.tokens(x)  # (G * B, 1 + L, D)
            t_cls = self.teacher_head(t_tokens[:, 0])  # (G * B, K)
            t_patch = self.teacher_patch_head(t_tokens[:, 1:][mask])  # (M, K_patch)
        # 4. losses: image level (cross pairs), patch level (masked patches), KoLeo per global crop
        t_temp = self.current_teacher_temp()
        dino = self.dino_loss(self.head(s_cls), t_cls, t_temp)
        ibot = self.ibot_loss(self.patch_head(s_patch), t_patch, mask, t_temp)
        koleo = sum(self.koleo_loss(c) for c in s_global[:, 0].chunk(self.n_global))  # not across crops of one image
        loss = dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        return StepOutput(loss, dict(dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach(),
                                     teacher_temp=t_temp))

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.progress.copy_(torch.tensor([step + 1, total_steps], dtype=self.progress.dtype))
        m = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        ema_update(self.teacher_patch_head, self.patch_head, m)


def _build(encoder: nn.Module, o: DINOv2Config, context: BuildContext) -> DINOv2:
    return DINOv2(encoder, o.out_dim, o.patch_out_dim, o.hidden_dim, o.bottleneck_dim,  # type: ignore[arg-type]
                  o.mask_ratio, o.mask_probability, o.ibot_weight, o.koleo_weight, o.student_temp, o.teacher_temp,
                  o.warmup_teacher_temp, o.warmup_teacher_temp_fraction, o.momentum, o.sinkhorn_iterations)


def _views(base: ViewConfig, size: int, o: DINOv2Config) -> list[tuple[ViewConfig, int]]:
    """DINO's multi-crop, as the paper keeps it (2 global crops, ``n_local_crops`` local ones)."""
    return multicrop_views(base, size, o.n_local_crops, o.global_scale, o.local_scale, o.local_size)


SPEC = MethodSpec("dinov2", DINOv2Config, _build, _views,
                  "DINOv2: DINO + iBOT masked-patch distillation, KoLeo, Sinkhorn-Knopp centring (ViT only)",
                  needs_vit=True)
