"""Degradations that simulate acquisitions, and the data-consistency step that undoes the
guesswork of a reconstruction where measurements exist. Images are (B, C, *S) in [0, 1].

* Gaussian noise of standard deviation sigma (in [0, 1] intensity units).
* Poisson noise (low-dose imaging): counts ~ Poisson(peak * x), image = counts / peak; fewer
  photons (smaller peak) means more noise.
* Cartesian k-space undersampling (fastMRI, Zbontar et al. 2018): of the phase-encoding lines
  (columns), a fully sampled centre of ``center_fraction`` plus random others in conjugate pairs,
  so that exactly round(W / acceleration) lines are kept. The zero-filled reconstruction is the inverse FFT with
  the missing lines set to zero.
* Data consistency: replace the k-space of an estimate by the measurements where they exist
  (a hard projection onto the set of images that agree with what was measured).
* Inpainting: a random rectangle hidden per image; consistency keeps the known pixels.
"""

from __future__ import annotations

import torch


def gaussian_noise(x: torch.Tensor, sigma: float, g: torch.Generator | None = None) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def poisson_noise(x: torch.Tensor, peak: float, g: torch.Generator | None = None) -> torch.Tensor:
    """counts ~ Poisson(peak * x); returns counts / peak (mean x, variance x / peak)."""
    return torch.poisson(x.clamp(min=0) * peak, generator=g) / peak


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two axes."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def cartesian_mask(width: int, acceleration: float, center_fraction: float, g: torch.Generator | None = None
                   ) -> torch.Tensor:
    """(W,) boolean column mask with exactly ``round(W / acceleration)`` columns: a fully sampled
    centre of about ``W * center_fraction`` columns, then random others.

    Columns are chosen in conjugate pairs (frequency f with -f). The k-space of a real image is
    Hermitian, so with a symmetric mask the zero-filled image and every data-consistent image
    stay real, and consistency is exact (a random asymmetric mask would make the real part, and
    so the image, disagree with the measurements again). For an odd width and an even count one
    extra column is kept (only the zero frequency pairs with itself there).
    """
    keep = max(1, round(width / acceleration))
    dc = width // 2  # zero frequency in the centred layout

    def partner(j: int) -> int:
        return (2 * dc - j) % width

    half = max(0, (min(keep, max(1, round(width * center_fraction))) - 1) // 2)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[dc - half:dc + half + 1] = True  # symmetric centre: 2 * half + 1 columns
    singles = [j for j in range(width) if partner(j) == j and not mask[j]]  # the Nyquist column (even W)
    pairs = [j for j in range(width) if j < partner(j) and not mask[j]]
    order = torch.randperm(len(pairs), generator=g).tolist()
    need = keep - int(mask.sum())
    if need % 2 and singles:
        mask[singles[0]] = True
        need -= 1
    for i in order[:max(0, (need + 1) // 2)]:
        mask[pairs[i]] = mask[partner(pairs[i])] = True
    return mask


def undersample(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(measured k-space (B, C, H, W) complex, zero-filled magnitude image (B, C, H, W)).
    ``mask``: (W,) or (B, 1, 1, W) columns kept."""
    k = fft2c(x.to(torch.complex64)) * mask
    return k, ifft2c(k).abs()


def kspace_consistency(estimate: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The estimate with its k-space replaced by the measurements on the sampled columns."""
    k = fft2c(estimate.to(torch.complex64))
    k = torch.where(mask.bool(), measured, k)
    return ifft2c(k).real.to(estimate.dtype)


def box_masks(shape: tuple[int, ...], fraction: float = 0.25, g: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1, H, W) float masks, 1 = known pixel, with one hidden square of ``fraction`` of the area."""
    b, h, w = shape[0], shape[-2], shape[-1]
    side = max(1, round((fraction * h * w) ** 0.5))
    masks = torch.ones(b, 1, h, w)
    top = torch.randint(0, h - side + 1, (b,), generator=g)
    left = torch.randint(0, w - side + 1, (b,), generator=g)
    for i in range(b):
        masks[i, :, top[i]:top[i] + side, left[i]:left[i] + side] = 0
    return masks


def pixel_consistency(estimate: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Known pixels (mask 1) from the observation, the rest from the estimate."""
    return mask * observed + (1 - mask) * estimate
