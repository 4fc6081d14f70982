"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Mask 75 % of the patches at random; the ViT encoder sees only the visible ones; a light
decoder gets the encoded visible tokens plus a shared mask token at every masked position and
predicts the pixels of the masked patches; the loss is the MSE on masked patches against
per-patch normalised pixels. Named steps follow the reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.augment.views import geometric_only
from medlatent.config import ViewConfig, bounded
from medlatent.losses import MaskedPatchLoss
from medlatent.nets.backbones import ViTEncoder, transformer_block
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput
from medlatent.methods.mechanics import gather_tokens, patchify, random_masking, sincos_positions, unpatchify


@dataclass
class MAEConfig:
    mask_ratio: float = bounded(0.75, gt=0, lt=1)  # the paper's
    decoder_dim: int = 128  # paper 512 for ViT-L; a narrow decoder suits a tiny encoder
    decoder_depth: int = 2  # paper 8; "even a single block works" (Table 1a)
    decoder_heads: int = 4
    norm_pix: bool = True  # per-patch normalised targets (Table 1d)


class MAE(nn.Module):
    """ViT encoder on visible patches, transformer decoder, loss on masked patches."""

    def __init__(self, encoder: ViTEncoder, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        p, d, c = encoder.patch_size, encoder.spatial_dims, encoder.in_channels
        grid = round(encoder.num_patches ** (1 / d))
        self.decoder_embed = nn.Linear(encoder.out_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_positions(grid, decoder_dim, d)])
        self.register_buffer("decoder_pos", pos.unsqueeze(0), persistent=False)  # (1, 1 + L, Dd), fixed
        self.decoder_blocks = nn.ModuleList(
            transformer_block(decoder_dim, 4 * decoder_dim, decoder_heads)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p**d * c)  # pixels of one patch
        self.criterion = MaskedPatchLoss(norm_pix)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, *S) -> latent (B, 1 + L_keep, D), mask (B, L), restore (B, L)."""
        keep, mask, restore = random_masking(len(x), self.encoder.num_patches, self.mask_ratio, x.device)
        latent = self.encoder.tokens(x, keep=keep)  # only the visible patches are encoded
        return latent, mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L_keep, D) -> predicted patches (B, L, p^d C)."""
        t = self.decoder_embed(latent)  # (B, 1 + L_keep, Dd)
        b, length = restore.shape
        masks = self.mask_token.expand(b, length - (t.shape[1] - 1), -1)  # (B, L - L_keep, Dd)
        patches = gather_tokens(torch.cat([t[:, 1:], masks], dim=1), restore)  # (B, L, Dd), original order
        t = torch.cat([t[:, :1], patches], dim=1) + self.decoder_pos  # (B, 1 + L, Dd)
        for block in self.decoder_blocks:
            t = block(t)
        return self.decoder_pred(self.decoder_norm(t))[:, 1:]  # (B, L, p^d C)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(x, self.encoder.patch_size)  # (B, L, p^d C)
        return self.criterion(pred, target, mask)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x = views[0]
        latent, mask, restore = self.forward_encoder(x)
        pred = self.forward_decoder(latent, restore)
        return StepOutput(self.forward_loss(x, pred, mask))

    def on_step_end(self, step: int, total_steps: int) -> None:
        """MAE keeps no state between steps."""

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: (masked input, reconstruction with visible patches pasted back), both
        (B, C, *S) in the input's units. Predictions of normalised targets are de-normalised
        with each patch's true mean and variance, as the MAE paper's figures do."""
        latent, mask, restore = self.forward_encoder(x)
        pred = self.forward_decoder(latent, restore)  # (B, L, P)
        p = self.encoder.patch_size
        target = patchify(x, p)
        if self.criterion.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + self.criterion.eps) ** 0.5 + mean
        m = mask.unsqueeze(-1)  # (B, L, 1)
        spatial = tuple(x.shape[2:])
        masked = unpatchify(target * (1 - m), p, x.shape[1], spatial)
        recon = unpatchify(target * (1 - m) + pred * m, p, x.shape[1], spatial)
        return masked, recon


def _build(encoder: nn.Module, o: MAEConfig, context: BuildContext) -> MAE:
    return MAE(encoder, o.mask_ratio, o.decoder_dim, o.decoder_depth, o.decoder_heads, o.norm_pix)  # type: ignore[arg-type]


def _views(base: ViewConfig, size: int, o: MAEConfig) -> list[tuple[ViewConfig, int]]:
    """MAE uses only random resized crops and flips (Sec. 4, "masking is the augmentation")."""
    return [(geometric_only(base, (0.2, 1.0)), size)]


SPEC = MethodSpec("mae", MAEConfig, _build, _views,
                  "MAE: ViT encoder on 25 % of patches, light decoder, loss on masked normalised patches",
                  needs_vit=True)
