"""Augmentation ops on whole batches.

Every op takes a float batch ``x`` of shape ``(B, C, *spatial)`` in [0, 1] (the geometry also
takes the stored uint8 batch) on any device and a
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
# geometry: every geometric op is a per-sample matrix; one grid_sample applies their product
#
# Matrices act on normalised output coordinates (x, y[, z]) = (W, H[, D]) axes in [-1, 1] and
# return input coordinates (F.affine_grid's convention). Composing crop, flips and rotations
# into one (B, d, d+1) matrix resamples the batch once instead of once per op.


def crop_matrix(g: torch.Generator, b: int, d: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> torch.Tensor:
    """Random resized crop (Inception crop) as (B, d, d+1): area fraction uniform in ``scale``,
    aspect ratio log-uniform in ``ratio`` (2-D; volumes are cropped isotropically), position
    uniform inside the image."""
    area = uniform(g, b, *scale)
    if d == 2:
        r = uniform(g, b, math.log(ratio[0]), math.log(ratio[1])).exp()
        sides = torch.stack([(area * r).sqrt(), (area / r).sqrt()], 1)  # (B, 2) as (w, h) fractions
    else:
        sides = area.pow(1 / d)[:, None].expand(b, d)  # (B, d)
    sides = sides.clamp(max=1.0)
    centre = (torch.rand(b, d, generator=g, device=g.device) * 2 - 1) * (1 - sides)  # (B, d)
    theta = torch.zeros(b, d, d + 1, device=g.device)
    theta[:, range(d), range(d)] = sides
    theta[:, :, d] = centre
    return theta


def flip_matrix(g: torch.Generator, b: int, d: int, p: float, axis: int) -> torch.Tensor:
    """(B, d, d): with probability p, mirror coordinate ``axis`` (0: left-right, 1: up-down)."""
    m = torch.eye(d, device=g.device).repeat(b, 1, 1)
    m[:, axis, axis] = 1 - 2 * coin(g, b, p).float()
    return m


def rot90_matrix(g: torch.Generator, b: int, d: int, p: float) -> torch.Tensor:
    """(B, d, d): with probability p, a rotation by 90, 180 or 270 degrees in the (x, y) plane.
    Exact on square grids: pixel centres land on pixel centres."""
    k = torch.randint(1, 4, (b,), generator=g, device=g.device) * coin(g, b, p)
    return _plane_rotation(k.float() * (math.pi / 2), d).round()


def rotation_matrix(g: torch.Generator, b: int, d: int, degrees: float) -> torch.Tensor:
    """(B, d, d): rotation by an angle uniform in [-degrees, degrees] in the (x, y) plane."""
    return _plane_rotation(uniform(g, b, -degrees, degrees) * (math.pi / 180), d)


def _plane_rotation(angle: torch.Tensor, d: int) -> torch.Tensor:
    m = torch.eye(d, device=angle.device).repeat(len(angle), 1, 1)
    cos, sin = angle.cos(), angle.sin()
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    return m


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """The sampling grid of ``F.affine_grid(theta, ..., align_corners=False)`` for a square
    (cubic) output of side ``size``: (B, d, d+1) -> (B, *[size] * d, d).

    Each output coordinate is sum_j theta_ij c_j + t_i, where c_j varies along one axis only,
    so the grid is an outer sum of small per-axis vectors: one pass over the output instead of
    a batched matrix product against a (size^d, d+1) base grid (3x faster on a CPU at 64 px)."""
    b, d = theta.shape[0], theta.shape[1]
    c = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    grid = torch.empty(b, *([size] * d), d, device=theta.device, dtype=theta.dtype)
    ones = [1] * d
    for i in range(d):  # output coordinate i: x, y(, z)
        acc = theta[:, i, d].view(b, *ones)
        for j in range(d):  # coordinate j varies along grid dim d - j (x fastest)
            shape = [1] * (d + 1)
            shape[d - j] = size
            acc = acc + theta[:, i, j].view(b, *ones) * c.view(shape)
        grid[..., i] = acc
    return grid


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, padding: str = "border") -> torch.Tensor:
    """Resample (B, C, *S) through per-sample affine maps (B, d, d+1) to side ``size`` (bilinear).

    ``border`` padding is exact for crops, flips and 90-degree turns, which never leave the
    image; free rotations, whose corners do, use ``reflection``."""
    grid = affine_grid(theta.to(torch.float32), size).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_geometry(x: torch.Tensor, size: int, g: torch.Generator, scale: tuple[float, float] = (1.0, 1.0),
                    ratio: tuple[float, float] = (1.0, 1.0), hflip: float = 0.0, vflip: float = 0.0,
                    rot90: float = 0.0, degrees: float = 0.0) -> torch.Tensor:
    """Crop, flips and rotations in one resampling: (B, C, *S) uint8 or float -> float (B, C,
    size, ...) in [0, 1].

    The output is first rotated and flipped, then read from the crop: theta = crop o (R F).
    Large 2-D views on a CPU without free rotation take :func:`resized_crops` (the crop box
    rounded to whole pixels, each image resized on its own, then flipped or turned), the same
    random draws: 1.4x faster than the batched ``grid_sample`` at 224 px on one core, reading
    the stored uint8 pixels directly. Elsewhere one batched ``grid_sample``.
    """
    b, d = x.shape[0], x.dim() - 2
    theta = crop_matrix(g, b, d, scale, ratio)  # (B, d, d+1)
    orient = flip_matrix(g, b, d, hflip, 0) @ flip_matrix(g, b, d, vflip, 1)  # (B, d, d)
    if rot90:
        orient = rot90_matrix(g, b, d, rot90) @ orient
    if degrees:
        orient = rotation_matrix(g, b, d, degrees) @ orient
    if x.device.type == "cpu" and d == 2 and not degrees and size >= LARGE_SIDE:
        return resized_crops(x, crop_boxes(theta, x.shape[-2], x.shape[-1]), size, orient)
    theta = torch.cat([theta[:, :, :d] @ orient, theta[:, :, d:]], dim=2)
    return warp(_unit_float(x), theta, size, "reflection" if degrees else "border")


# Views of at least this side (px) are cropped image by image on a CPU and blurred with each
# sample's own kernel width. Below it the loop's ~40 us per image outweighs the gain (one core,
# per image, batched grid_sample against the per-image resize: 28 px 20 us against 66, 64 px
# 160 against 128, measured beside other jobs; 224 px on a quiet core, with the uint8 -> float
# conversion: 600 against 430), and 28-px views stay bit-identical to the ones every published
# 28-px result was measured with (tests/test_resolution.py).
LARGE_SIDE = 96


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def crop_boxes(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The crops of :func:`crop_matrix` (B, 2, 3) in whole pixels of an image of (height, width):
    (B, 4) as (top, left, crop height, crop width), each side at least one pixel, inside the image."""
    def axis(side: torch.Tensor, centre: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = (side * n).round().clamp(1, n)
        start = ((centre - side + 1) / 2 * n).round().clamp(min=0)
        return torch.minimum(start, n - length), length

    top, h = axis(theta[:, 1, 1], theta[:, 1, 2], height)
    left, w = axis(theta[:, 0, 0], theta[:, 0, 2], width)
    return torch.stack([top, left, h, w], 1).long()


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int, orient: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image of (B, C, H, W) to its box (B, 4) (top, left, height, width), resize it to
    (size, size) (bilinear, pixel centres aligned, as ``grid_sample`` with border padding over
    the crop), then flip or turn it by its (B, 2, 2) orientation matrix (entries 0 or +-1; see
    :func:`random_geometry`): float (B, C, size, size) in [0, 1]. uint8 input is resized as
    uint8 (rounded to whole levels, as torchvision resizes uint8 tensors) and converted once."""
    out = torch.empty(len(x), x.shape[1], size, size, dtype=x.dtype)
    signs = orient.round().int().tolist() if orient is not None else [[[1, 0], [0, 1]]] * len(x)
    for i, ((top, left, h, w), m) in enumerate(zip(boxes.tolist(), signs)):
        v = x[i:i + 1, :, top:top + h, left:left + w]
        if (h, w) != (size, size):
            v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)
        out[i] = _oriented(v[0], m)
    return _unit_float(out)


def _oriented(v: torch.Tensor, m: list[list[int]]) -> torch.Tensor:
    """(C, H, W) read through the orientation m (output coordinates (x, y) -> crop coordinates,
    m @ (x, y)): out[y, x] = v[m10 x + m11 y, m00 x + m01 y], signs meaning mirrored indices."""
    if m[0][0] == 0:  # a quarter turn: crop x follows output y and crop y follows output x
        v, fx, fy = v.transpose(-1, -2), m[1][0], m[0][1]
    else:
        fx, fy = m[0][0], m[1][1]
    dims = [axis for axis, f in ((-1, fx), (-2, fy)) if f < 0]
    return v.flip(dims) if dims else v


def center_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, *S) to side ``size`` without randomness (evaluation views)."""
    if x.shape[-1] == size:
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=[size] * (x.dim() - 2), mode=mode, align_corners=False,
                         antialias=x.dim() == 4 and x.shape[-1] > size)


# --------------------------------------------------------------------------------------------
# colour (RGB): brightness, contrast, saturation, hue and grayscale are all affine in RGB, so
# they compose into one 3x3 matrix and bias per sample, applied with one batched matmul.

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, *S) RGB -> (B, 1, *S) luma."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, *([1] * (x.dim() - 2)))
    return (x * w).sum(1, keepdim=True)


def color_transform(x: torch.Tensor, g: torch.Generator, p_jitter: float, brightness: float, contrast: float,
                    saturation: float, hue: float, p_gray: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample colour map y = A x + c for SimCLR's colour distortion and random grayscale.

    With probability ``p_jitter``: brightness b, contrast k, saturation s uniform in
    [1 - f, 1 + f] for their strengths f, hue shift h uniform in [-hue, hue] turns, in that
    order (as torchvision's ColorJitter, with one clamp at the end instead of one per factor):

        brightness  y = b x
        contrast    y = k y + (1 - k) mean(luma(y))          (a scalar per image)
        saturation  y = s y + (1 - s) luma(y)                 S = s I + (1 - s) 1 w^T
        hue         y = H y, H = YIQ^-1 R(2 pi h) YIQ         rotates chroma, keeps luma

    then with probability ``p_gray``: y = 1 w^T y. S and H fix gray (1), so the bias is
    (1 - k) b mean(luma(x)) for every channel.

    Returns:
        A (B, 3, 3) and c (B, 3).
    """
    b, dev = x.shape[0], g.device
    eye = torch.eye(3, device=dev)
    w = torch.tensor(_LUMA, device=dev)
    fb = uniform(g, b, 1 - brightness, 1 + brightness)
    fk = uniform(g, b, 1 - contrast, 1 + contrast)
    fs = uniform(g, b, 1 - saturation, 1 + saturation)
    angle = uniform(g, b, -hue, hue) * (2 * math.pi)
    jitter, gray = coin(g, b, p_jitter), coin(g, b, p_gray)
    sat = fs.view(b, 1, 1) * eye + (1 - fs).view(b, 1, 1) * torch.outer(torch.ones(3, device=dev), w)
    yiq = torch.tensor(_YIQ, device=dev)
    rot = torch.zeros(b, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    hue_m = torch.linalg.inv(yiq) @ rot @ yiq  # (B, 3, 3)
    a = (fk * fb).view(b, 1, 1) * (hue_m @ sat)  # (B, 3, 3)
    mean_luma = x.mean(dim=list(range(2, x.dim()))) @ w  # (B,): luma is linear, so mean of luma
    c = ((1 - fk) * fb * mean_luma).view(b, 1).expand(b, 3)  # (B, 3)
    a = torch.where(jitter.view(b, 1, 1), a, eye)
    c = torch.where(jitter.view(b, 1), c, torch.zeros_like(c))
    to_gray = torch.outer(torch.ones(3, device=dev), w)  # (3, 3): every channel <- luma
    a = torch.where(gray.view(b, 1, 1), to_gray @ a, a)
    c = torch.where(gray.view(b, 1), c @ to_gray.T, c)
    return a, c


def apply_color(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y = clamp(A x + c, 0, 1) per sample: (B, 3, *S) with A (B, 3, 3), c (B, 3)."""
    b, ch, *spatial = x.shape
    y = torch.baddbmm(c.to(x.dtype).unsqueeze(2), a.to(x.dtype), x.reshape(b, ch, -1))  # (B, 3, N)
    return y.clamp_(0, 1).view_as(x)


def color_jitter(x: torch.Tensor, p: float, brightness: float, contrast: float, saturation: float,
                 hue: float, g: torch.Generator, grayscale: float = 0.0) -> torch.Tensor:
    """SimCLR colour distortion (and random grayscale) of an RGB batch; see :func:`color_transform`."""
    return apply_color(x, *color_transform(x, g, p, brightness, contrast, saturation, hue, grayscale))


def intensity_jitter(x: torch.Tensor, p: float, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma jitter for grayscale (or any-channel) images.

    With probability p per sample: gamma x -> x^gamma, log-uniform gamma in
    [1/(1+s), 1+s]; contrast around the image mean by a factor in [1-s, 1+s]; brightness
    shift in [-s/2, s/2]. These are the distortions of exposure and windowing that X-ray,
    ultrasound and CT intensities undergo, used in place of RGB colour jitter.
    """
    b = x.shape[0]
    mask = coin(g, b, p)
    gamma = _per_sample(torch.where(mask, uniform(g, b, -math.log1p(strength), math.log1p(strength)).exp(),
                                    torch.ones(b, device=g.device)), x)
    fc = _per_sample(torch.where(mask, uniform(g, b, 1 - strength, 1 + strength), torch.ones(b, device=g.device)), x)
    shift = _per_sample(uniform(g, b, -strength / 2, strength / 2) * mask, x)
    y = x.clamp_min(1e-6).pow(gamma)
    mean = y.mean(dim=list(range(1, x.dim())), keepdim=True)
    return ((y - mean) * fc + mean + shift).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """With probability p, blur each sample with a Gaussian of sigma uniform in ``sigma`` (pixels).

    Separable: one pass per spatial axis with a per-sample kernel, reflect padding. The kernel
    spans +-ceil(3 sigma) of the largest sigma; from ``LARGE_SIDE`` px each sample's spans
    +-ceil(3 sigma) of its own sigma (at least one tap each side; >= 99.7 % of the weight,
    renormalised), so a small sigma costs few taps.
    On the CPU only the samples drawn for blurring are convolved, grouped by kernel width, the
    others are returned as they are (the same values, 1/p times less work: at 224 px, SimCLR's
    p = 0.5 made this op the pipeline's slowest; per-sample widths take 13 taps down to 8 on
    average for sigma in (0.1, 2)), a few samples per call; on a GPU every sample in one call
    at the widest kernel (the other samples' outer taps are zero: the same values), which
    avoids a host sync.
    """
    b, c, *spatial = x.shape
    mask = coin(g, b, p)
    s = uniform(g, b, *sigma)
    radius = max(1, math.ceil(3 * sigma[1]))
    radii = (3 * s).ceil().clamp(1, radius) if spatial[-1] >= LARGE_SIDE else torch.full_like(s, radius)  # (B,)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / s[:, None].to(x.dtype)) ** 2) * (t.abs()[None] <= radii[:, None])
    k = k / k.sum(1, keepdim=True)  # (B, 2 radius + 1), zero beyond each sample's half-width
    if x.device.type != "cpu":
        return _select(mask, _separable(x, k, radius), x)
    chosen = mask.nonzero()[:, 0]
    if len(chosen) == 0:
        return x
    out = x.clone()
    for r in radii[chosen].unique().long().tolist():
        group = chosen[radii[chosen] == r]
        out[group] = _separable(x[group], k[group, radius - r:radius + r + 1], r)
    return out


_CPU_BLUR_VALUES = 2 ** 20  # values per call on a CPU (4 MB: about a core's cache)


def _separable(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, *S) convolved along each spatial axis with its sample's kernel k (B, 2r + 1).

    On a CPU the batch is convolved a few samples at a time (at least 4, about 2^20 values
    each), so each pass stays in cache; on a GPU in one call."""
    if x.device.type == "cpu":
        chunk = max(4, _CPU_BLUR_VALUES // max(1, x[0].numel()))
        if len(x) > chunk:
            return torch.cat([_separable_all(x[a:a + chunk], k[a:a + chunk], radius)
                              for a in range(0, len(x), chunk)])
    return _separable_all(x, k, radius)


def _separable_all(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """Along each spatial axis, y = sum_j k[b, j] * x_pad[..., i + j] (reflect padding): the
    2r + 1 shifted copies of the padded batch, each multiplied by its sample's tap and added.

    Why not a grouped convolution (one group per plane): PyTorch's depthwise CPU kernel ran
    2.3x slower than these 2r + 1 multiply-adds (13 taps, 224-px RGB, one core)."""
    b, d = x.shape[0], x.dim() - 2
    taps = k.to(x.dtype).view(b, -1, *([1] * (d + 1)))  # (B, K, 1, 1, ...): tap j per sample
    y = x
    for axis in range(2, 2 + d):
        pad = [0, 0] * d
        pad[2 * (d + 1 - axis)] = pad[2 * (d + 1 - axis) + 1] = radius  # F.pad counts from the last axis
        padded = F.pad(y, pad, mode="reflect")
        n = y.shape[axis]
        y = padded.narrow(axis, 0, n) * taps[:, 0]
        for j in range(1, 2 * radius + 1):
            y.addcmul_(padded.narrow(axis, j, n), taps[:, j])
    return y


def random_solarize(x: torch.Tensor, p: float, g: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    """With probability p, invert the pixels above ``threshold`` (BYOL's solarisation)."""
    return _select(coin(g, x.shape[0], p), torch.where(x >= threshold, 1 - x, x), x)


def gaussian_noise(x: torch.Tensor, p: float, std: float, g: torch.Generator) -> torch.Tensor:
    """With probability p, add zero-mean Gaussian noise of standard deviation ``std``."""
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype) * std
    return _select(coin(g, x.shape[0], p), (x + noise).clamp(0, 1), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel standardisation (x - mean) / std; mean and std are (C,). ``out``: written
    there (a slice of a preallocated batch) instead of into a new tensor."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.mul(x, std.reciprocal().view(shape), out=out).sub_((mean / std).view(shape))
