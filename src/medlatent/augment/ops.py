"""Augmentation ops on whole batches.

Every op takes a float batch ``x`` of shape ``(B, C, *spatial)`` in [0, 1] on any device and a
``torch.Generator`` on the same device, draws one random parameter per sample, and returns a
batch of the same shape (crops: the requested size). Geometric ops work for ``spatial_dims``
2 and 3 (affine grids are N-D); colour ops need RGB; intensity ops work for any channel count.

Why our own code: per-image PIL transforms in DataLoader workers starve the model (and need
torchvision); kornia is slower than plain batched tensor ops on small images (DESIGN.md). Each
op here is a handful of tensor operations over the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# random parameters


def uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    """(n,) uniform samples in [lo, hi) on the generator's device."""
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def coin(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    """(n,) booleans, each True with probability p."""
    return torch.rand(n, generator=g, device=g.device) < p


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask, a), a, b)


# --------------------------------------------------------------------------------------------
# geometry


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Crop a random region of random area and aspect ratio, resized to ``size`` (Inception crop).

    Args:
        x: (B, C, *S) batch.
        size: output side; output is (B, C, size, ..., size).
        scale: range of the crop's area (volume) as a fraction of the image.
        ratio: range of width/height aspect ratios (sampled log-uniformly; 2-D only, volumes
            are cropped isotropically).
    """
    b, c, *spatial = x.shape
    d = len(spatial)
    area = uniform(g, b, *scale)
    if d == 2:
        log_r = uniform(g, b, math.log(ratio[0]), math.log(ratio[1]))
        r = log_r.exp()
        sides = torch.stack([(area * r).sqrt(), (area / r).sqrt()], 1)  # (B, 2) as (w, h) fractions
    else:
        sides = area.pow(1 / d)[:, None].expand(b, d)  # (B, d)
    sides = sides.clamp(max=1.0)
    centre = (torch.rand(b, d, generator=g, device=g.device) * 2 - 1) * (1 - sides)  # (B, d) in [-1, 1]
    theta = torch.zeros(b, d, d + 1, device=x.device)
    theta[:, range(d), range(d)] = sides
    theta[:, :, d] = centre
    grid = F.affine_grid(theta, [b, c] + [size] * d, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def center_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, *S) to side ``size`` without randomness (evaluation views)."""
    if x.shape[-1] == size:
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=[size] * (x.dim() - 2), mode=mode, align_corners=False,
                         antialias=x.dim() == 4 and x.shape[-1] > size)


def random_flip(x: torch.Tensor, p: float, dim: int, g: torch.Generator) -> torch.Tensor:
    """Flip each sample along spatial ``dim`` (e.g. -1: left-right) with probability p."""
    return _select(coin(g, x.shape[0], p), x.flip(dim), x)


def random_rot90(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability p, rotate each sample by 90, 180 or 270 degrees in the last two dims."""
    b = x.shape[0]
    k = torch.randint(1, 4, (b,), generator=g, device=g.device) * coin(g, b, p)
    out = x
    for turns in (1, 2, 3):
        out = _select(k == turns, torch.rot90(x, turns, dims=(-2, -1)), out)
    return out


def random_rotation(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each sample by an angle uniform in [-degrees, degrees] (last two dims; reflect padding)."""
    b, c, *spatial = x.shape
    d = len(spatial)
    angle = uniform(g, b, -degrees, degrees) * math.pi / 180
    theta = torch.zeros(b, d, d + 1, device=x.device)
    theta[:, range(d), range(d)] = 1.0
    cos, sin = angle.cos(), angle.sin()
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --------------------------------------------------------------------------------------------
# colour (RGB) and intensity (any channels)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, *S) RGB -> (B, 1, *S) luma."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, *([1] * (x.dim() - 2)))
    return (x * w).sum(1, keepdim=True)


def _hue_rotation(h: torch.Tensor) -> torch.Tensor:
    """(B,) hue shifts in turns -> (B, 3, 3) RGB matrices rotating chroma in YIQ space."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       device=h.device)
    rot = torch.zeros(h.shape[0], 3, 3, device=h.device)
    a = h * 2 * math.pi
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x: torch.Tensor, p: float, brightness: float, contrast: float, saturation: float,
                 hue: float, g: torch.Generator) -> torch.Tensor:
    """SimCLR colour distortion on RGB batches, each sample with probability p.

    Brightness, contrast and saturation factors are uniform in [1 - s, 1 + s]; the hue shift is
    uniform in [-hue, hue] turns, applied as a chroma rotation in YIQ space (a linear stand-in
    for HSV hue that needs no per-pixel branching). Applied in that fixed order, clamped after
    each, as torchvision's ColorJitter does per image.
    """
    b = x.shape[0]
    mask = coin(g, b, p)
    fb = _per_sample(uniform(g, b, 1 - brightness, 1 + brightness), x)
    fc = _per_sample(uniform(g, b, 1 - contrast, 1 + contrast), x)
    fs = _per_sample(uniform(g, b, 1 - saturation, 1 + saturation), x)
    h = uniform(g, b, -hue, hue)
    y = (x * fb).clamp(0, 1)
    mean = luminance(y).mean(dim=list(range(2, x.dim())), keepdim=True)  # (B, 1, 1, 1)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    gray = luminance(y)
    y = ((y - gray) * fs + gray).clamp(0, 1)
    m = _hue_rotation(h)  # (B, 3, 3)
    y = torch.einsum("bij,bj...->bi...", m, y).clamp(0, 1)
    return _select(mask, y, x)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability p, replace an RGB sample by its luma in all three channels."""
    return _select(coin(g, x.shape[0], p), luminance(x).expand_as(x), x)


def intensity_jitter(x: torch.Tensor, p: float, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma jitter for grayscale (or any-channel) images.

    With probability p per sample: gamma x -> x^gamma, log-uniform gamma in
    [1/(1+s), 1+s]; contrast around the image mean by a factor in [1-s, 1+s]; brightness
    shift in [-s/2, s/2]. These are the distortions of exposure and windowing that X-ray,
    ultrasound and CT intensities undergo, used in place of RGB colour jitter.
    """
    b = x.shape[0]
    mask = coin(g, b, p)
    gamma = _per_sample(uniform(g, b, -math.log1p(strength), math.log1p(strength)).exp(), x)
    fc = _per_sample(uniform(g, b, 1 - strength, 1 + strength), x)
    shift = _per_sample(uniform(g, b, -strength / 2, strength / 2), x)
    y = x.clamp_min(1e-6).pow(gamma)
    mean = y.mean(dim=list(range(1, x.dim())), keepdim=True)
    y = ((y - mean) * fc + mean + shift).clamp(0, 1)
    return _select(mask, y, x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """With probability p, blur each sample with a Gaussian of sigma uniform in ``sigma`` (pixels).

    Separable: one grouped convolution per spatial axis with a per-sample kernel, reflect padding.
    """
    b, c, *spatial = x.shape
    d = len(spatial)
    mask = coin(g, b, p)
    s = uniform(g, b, *sigma)
    radius = max(1, math.ceil(3 * sigma[1]))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / s[:, None].to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    weight = k.repeat_interleave(c, 0)  # (B*C, K)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    y = x.reshape(1, b * c, *spatial)
    for axis in range(d):
        shape = [b * c, 1] + [1] * d
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        y = conv(F.pad(y, pad, mode="reflect"), weight.view(shape), groups=b * c)
    return _select(mask, y.view_as(x), x)


def random_solarize(x: torch.Tensor, p: float, g: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    """With probability p, invert the pixels above ``threshold`` (BYOL's solarisation)."""
    return _select(coin(g, x.shape[0], p), torch.where(x >= threshold, 1 - x, x), x)


def gaussian_noise(x: torch.Tensor, p: float, std: float, g: torch.Generator) -> torch.Tensor:
    """With probability p, add zero-mean Gaussian noise of standard deviation ``std``."""
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype) * std
    return _select(coin(g, x.shape[0], p), (x + noise).clamp(0, 1), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation; mean and std are (C,)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / std.view(shape)
