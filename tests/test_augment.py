from __future__ import annotations

import math

import pytest
import torch

from medlatent.augment import ops
from medlatent.augment.views import ViewRecipe, augment, resolve
from medlatent.config import ViewConfig


def batch(b: int = 8, c: int = 3, s: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_views_and_different_seed_different_views():
    x = (batch() * 255).to(torch.uint8)
    cfg = resolve(ViewConfig(blur=0.5, solarize=0.2, noise=0.2, rotation_degrees=10), "bloodmnist")
    recipe = ViewRecipe([(cfg, 28), (cfg, 20)], mean=[0.5] * 3, std=[0.25] * 3)
    a, b = recipe(x, gen(1)), recipe(x, gen(1))
    c = recipe(x, gen(2))
    assert a[0].shape == (8, 3, 28, 28) and a[1].shape == (8, 3, 20, 20)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    assert not torch.allclose(a[0], a[1][:, :, :1, :1].expand(-1, -1, 28, 28))


def test_full_crop_is_identity():
    x = batch()
    y = ops.random_resized_crop(x, 28, (1.0, 1.0), (1.0, 1.0), gen())
    assert torch.allclose(x, y, atol=1e-5)


def test_crop_area_follows_scale():
    # a crop of 1/4 of the area of a linear ramp spans half the range along each axis
    ramp = torch.linspace(0, 1, 64).expand(64, 64)[None, None].repeat(16, 1, 1, 1)
    y = ops.random_resized_crop(ramp, 64, (0.25, 0.25), (1.0, 1.0), gen())
    span = y[..., 0, -1] - y[..., 0, 0]
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.03)


def test_flips_and_rot90_are_exact_permutations():
    x = batch()
    assert torch.equal(ops.random_flip(x, 1.0, -1, gen()), x.flip(-1))
    assert torch.equal(ops.random_flip(x, 0.0, -1, gen()), x)
    y = ops.random_rot90(x, 1.0, gen())
    for i in range(len(x)):
        assert any(torch.equal(y[i], torch.rot90(x[i], k, (-2, -1))) for k in (1, 2, 3))


def test_rotation_by_zero_degrees_is_identity():
    x = batch()
    assert torch.allclose(ops.random_rotation(x, 0.0, gen()), x, atol=1e-5)


def test_color_jitter_off_and_grayscale_on():
    x = batch()
    assert torch.equal(ops.color_jitter(x, 0.0, 0.4, 0.4, 0.4, 0.1, gen()), x)
    g = ops.random_grayscale(x, 1.0, gen())
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)


def test_hue_rotation_keeps_gray_and_luma():
    gray = torch.full((4, 3, 8, 8), 0.4)
    out = ops.color_jitter(gray, 1.0, 0.0, 0.0, 0.0, 0.5, gen())
    assert torch.allclose(out, gray, atol=1e-5)  # hue does not touch gray pixels
    x = batch(4) * 0.5 + 0.25  # stay clear of the clamp
    out = ops.color_jitter(x, 1.0, 0.0, 0.0, 0.0, 0.1, gen())
    assert torch.allclose(ops.luminance(out), ops.luminance(x), atol=1e-4)  # rotation in the chroma plane


def test_intensity_jitter_keeps_range():
    x = batch(c=1)
    y = ops.intensity_jitter(x, 1.0, 0.4, gen())
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.equal(x, y)


def test_blur_keeps_constant_images_and_smooths_noise():
    const = torch.full((2, 1, 28, 28), 0.3)
    assert torch.allclose(ops.gaussian_blur(const, 1.0, (1.0, 2.0), gen()), const, atol=1e-6)
    noise = batch(c=1)
    assert ops.gaussian_blur(noise, 1.0, (1.5, 2.0), gen()).std() < 0.5 * noise.std()


def test_blur_kernel_matches_a_naive_convolution():
    x = batch(1, 1, 16)
    y = ops.gaussian_blur(x, 1.0, (1.0, 1.0), gen())
    r = 3
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * t**2)
    k = k / k.sum()
    k2 = k[:, None] * k[None, :]
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    ref = torch.nn.functional.conv2d(padded, k2[None, None])
    assert torch.allclose(y, ref, atol=1e-5)


def test_solarize_and_noise():
    x = batch()
    s = ops.random_solarize(x, 1.0, gen())
    assert torch.allclose(s, torch.where(x >= 0.5, 1 - x, x))
    n = ops.gaussian_noise(x, 1.0, 0.1, gen())
    assert 0.05 < float((n - x).std()) < 0.1


def test_three_d_views():
    vol = torch.rand(2, 1, 16, 16, 16)
    cfg = ViewConfig(blur=1.0, blur_sigma=(0.5, 1.0))
    v = augment(vol, cfg, 12, gen())
    assert v.shape == (2, 1, 12, 12, 12) and torch.isfinite(v).all()


def test_orientation_defaults_depend_on_the_data():
    assert resolve(ViewConfig(), "bloodmnist").rot90 == 0.5
    assert resolve(ViewConfig(), "pneumoniamnist").rot90 == 0.0
    assert resolve(ViewConfig(vflip=0.3), "pneumoniamnist").vflip == 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_views_on_gpu_match_shapes():
    x = (batch() * 255).to(torch.uint8).cuda()
    recipe = ViewRecipe([(ViewConfig(), 28)] * 2, [0.5] * 3, [0.25] * 3)
    g = torch.Generator(device="cuda").manual_seed(0)
    v = recipe(x, g)
    assert v[0].is_cuda and v[0].shape == (8, 3, 28, 28) and math.isfinite(float(v[0].sum()))
