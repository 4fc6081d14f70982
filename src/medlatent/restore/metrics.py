"""Image-quality metrics of restorations, from MONAI."""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM (7-px Gaussian window, as scikit-image) over images (N, C, *S) in [0, 1]."""
    pred = pred.clamp(0, 1).float()
    d = pred.dim() - 2
    return dict(psnr=float(PSNRMetric(max_val=1.0)(pred, target).mean()),
                ssim=float(SSIMMetric(spatial_dims=d, data_range=1.0, win_size=7)(pred, target).mean()))
