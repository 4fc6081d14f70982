"""Anomaly scores per image and per pixel.

A reconstruction-based detector (autoencoder, VAE, diffusion) reconstructs an image from what it
learned of normal images; anomalies reconstruct badly. The per-pixel error is the heatmap and
its mean the image score: L2, L1, or 1 - SSIM (Wang et al., IEEE TIP 2004; Bergmann et al.
2019 use the SSIM map for anomaly segmentation). A feature-based detector scores an image by
the mean distance of its embedding to the k nearest normal training embeddings (the image-level
form of SPADE / PatchCore, Cohen and Hoshen 2020; Roth et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int, sigma: float, spatial_dims: int, channels: int) -> torch.Tensor:
    """(C, 1, size, size[, size]) normalised Gaussian kernel for a depthwise convolution."""
    g = torch.exp(-((torch.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = g
    for _ in range(spatial_dims - 1):
        k = k[..., None] * g
    return k.expand(channels, 1, *k.shape).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5, data_range: float = 1.0
             ) -> torch.Tensor:
    """Local SSIM (B, C, *S) of two images in [0, data_range], Gaussian-weighted (Wang et al. 2004):
    ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)).

    The images are reflect-padded by window // 2 before MONAI's SSIM (valid windows), so the map
    keeps the image size for heatmaps and a window at the border sees reflected image, not zeros
    (zero padding made a 3-px frame look half as anomalous as the interior). Away from the border,
    ``[..., p:-p, p:-p]`` with p = window // 2 is exactly MONAI's valid-window SSIM map.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    d, p = x.dim() - 2, window // 2
    if min(x.shape[2:]) <= p:
        raise ValueError(f"SSIM needs images larger than {p} px per side, got {tuple(x.shape[2:])}")
    pad = (p,) * (2 * d)
    xp, yp = F.pad(x.float(), pad, mode="reflect"), F.pad(y.float(), pad, mode="reflect")
    ssim, _ = compute_ssim_and_cs(yp, xp, d, kernel_size=[window] * d, kernel_sigma=[sigma] * d,
                                  data_range=data_range)
    return ssim


def valid_region(t: torch.Tensor, window: int = 7) -> torch.Tensor:
    """The part (B, C, *(S - 2 p)) of a same-size SSIM map whose windows lie inside the image."""
    p = window // 2
    return t[(..., *[slice(p, s - p) for s in t.shape[2:]])]


def pixel_scores(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Images and reconstructions (B, C, *S) in [0, 1] -> (image scores (B,), heatmaps (B, *S)).

    kind: ``l2`` squared error, ``l1`` absolute error, ``ssim`` 1 - local SSIM; heatmaps are
    averaged over channels, image scores over pixels. For ``ssim`` the heatmap is the
    reflect-padded map (image size) and the image score is 1 - the mean SSIM over the valid
    windows only, i.e. 1 - MONAI's ``SSIMMetric`` (7-px window, sigma 1.5, data range 1).
    """
    if kind == "l2":
        err = (x - recon) ** 2
    elif kind == "l1":
        err = (x - recon).abs()
    elif kind == "ssim":
        err = 1 - ssim_map(x, recon)
        return valid_region(err).flatten(1).mean(1), err.mean(1)
    else:
        raise ValueError(f"unknown score {kind!r} (l2, l1, ssim)")
    heat = err.mean(1)  # (B, *S)
    return heat.flatten(1).mean(1), heat


def knn_distance(normal: torch.Tensor, query: torch.Tensor, k: int = 5, batch: int = 1024) -> torch.Tensor:
    """Mean cosine distance of each query embedding (M, D) to its k nearest normal ones (N, D): (M,)."""
    a = F.normalize(normal.float(), dim=1)
    out = []
    for i in range(0, len(query), batch):
        q = F.normalize(query[i:i + batch].float(), dim=1)
        d = 1 - q @ a.T  # (b, N)
        out.append(d.topk(min(k, len(a)), dim=1, largest=False).values.mean(1))
    return torch.cat(out)
