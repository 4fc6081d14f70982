from __future__ import annotations

import math
import threading

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
    assert torch.allclose(ops.random_geometry(x, 28, gen()), x, atol=1e-5)


def test_crop_area_follows_scale():
    # a crop of 1/4 of the area of a linear ramp spans half the range along each axis
    ramp = torch.linspace(0, 1, 64).expand(64, 64)[None, None].repeat(16, 1, 1, 1)
    y = ops.random_geometry(ramp, 64, gen(), scale=(0.25, 0.25))
    span = y[..., 0, -1] - y[..., 0, 0]
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.03)


def test_flips_and_rot90_through_the_affine_are_exact():
    x = batch()
    assert torch.allclose(ops.random_geometry(x, 28, gen(), hflip=1.0), x.flip(-1), atol=1e-5)
    assert torch.allclose(ops.random_geometry(x, 28, gen(), vflip=1.0), x.flip(-2), atol=1e-5)
    assert torch.allclose(ops.random_geometry(x, 28, gen(), hflip=0.0), x, atol=1e-5)
    x = batch(32)
    y = ops.random_geometry(x, 28, gen(), rot90=1.0)
    turns = set()
    for i in range(len(x)):
        match = [k for k in (1, 2, 3) if torch.allclose(y[i], torch.rot90(x[i], k, (-2, -1)), atol=1e-5)]
        assert len(match) == 1
        turns.add(match[0])
    assert turns == {1, 2, 3}


def test_rotation_by_zero_degrees_is_identity():
    x = batch()
    assert torch.allclose(ops.random_geometry(x, 28, gen(), degrees=1e-9), x, atol=1e-5)


def test_color_jitter_off_and_grayscale_on():
    x = batch()
    assert torch.allclose(ops.color_jitter(x, 0.0, 0.4, 0.4, 0.4, 0.1, gen()), x, atol=1e-6)
    g = ops.color_jitter(x, 0.0, 0.4, 0.4, 0.4, 0.1, gen(), grayscale=1.0)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)


def naive_jitter(x: torch.Tensor, b: float, k: float, s: float) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation for one image, without intermediate clamps."""
    luma = lambda t: 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]  # noqa: E731
    y = x * b
    y = k * y + (1 - k) * luma(y).mean()
    return s * y + (1 - s) * luma(y)[None]


def test_composed_color_matrix_matches_the_ops_one_by_one():
    x = batch(6) * 0.4 + 0.3  # away from 0 and 1, where the single clamp cannot differ
    g1 = gen(7)
    a, c = ops.color_transform(x, g1, 1.0, 0.3, 0.3, 0.3, 0.0, 0.0)
    g2 = gen(7)  # replay the same draws
    fb, fk, fs = (ops.uniform(g2, 6, 0.7, 1.3) for _ in range(3))
    out = ops.apply_color(x, a, c)
    for i in range(6):
        ref = naive_jitter(x[i], float(fb[i]), float(fk[i]), float(fs[i])).clamp(0, 1)
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_hue_rotation_keeps_gray_and_luma():
    gray = torch.full((4, 3, 8, 8), 0.4)
    out = ops.color_jitter(gray, 1.0, 0.0, 0.0, 0.0, 0.5, gen())
    assert torch.allclose(out, gray, atol=1e-5)  # hue does not touch gray pixels
    x = batch(4) * 0.2 + 0.4  # near gray: a 36-degree chroma rotation stays inside [0, 1]
    out = ops.color_jitter(x, 1.0, 0.0, 0.0, 0.0, 0.1, gen())
    assert torch.allclose(ops.luminance(out), ops.luminance(x), atol=1e-4)  # rotation in the chroma plane
    assert not torch.allclose(out, x, atol=1e-3)


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


def test_blood_smear_views_keep_their_stain_colour():
    # A flat-coloured image: geometry cannot change its pixels, only colour distortion can.
    x = torch.tensor([0.8, 0.3, 0.5]).view(1, 3, 1, 1).expand(16, 3, 28, 28).contiguous()
    blood = augment(x, resolve(ViewConfig(), "bloodmnist"), 28, gen())
    assert torch.allclose(blood, x, atol=1e-5)
    path = augment(x, resolve(ViewConfig(), "pathmnist"), 28, gen())
    assert (path - x).abs().amax(dim=(1, 2, 3)).gt(0.01).sum() >= 8  # most of 16 jittered (p = 0.8)
    # an explicit setting wins over the data set's default
    cfg = resolve(ViewConfig(color_jitter=0.8, grayscale=0.2), "bloodmnist")
    assert (cfg.color_jitter, cfg.grayscale) == (0.8, 0.2)
    assert not torch.allclose(augment(x, cfg, 28, gen()), x, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_views_on_gpu_match_shapes():
    x = (batch() * 255).to(torch.uint8).cuda()
    recipe = ViewRecipe([(ViewConfig(), 28)] * 2, [0.5] * 3, [0.25] * 3)
    g = torch.Generator(device="cuda").manual_seed(0)
    v = recipe(x, g)
    assert v[0].is_cuda and v[0].shape == (8, 3, 28, 28) and math.isfinite(float(v[0].sum()))


def test_warp_grid_equals_torch_affine_grid():
    import torch.nn.functional as F

    for shape, size in (((5, 3, 20, 20), 28), ((2, 1, 10, 10, 10), 12)):
        x = torch.rand(*shape, generator=gen())
        d = len(shape) - 2
        theta = torch.randn(shape[0], d, d + 1, generator=gen(1))
        grid = F.affine_grid(theta, [shape[0], shape[1]] + [size] * d, align_corners=False)
        assert torch.allclose(ops.affine_grid(theta, size), grid, atol=1e-6)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        assert torch.allclose(ops.warp(x, theta, size, "reflection"), ref, atol=1e-5)


def test_cpu_blur_in_chunks_of_the_chosen_samples_equals_one_convolution_of_all() -> None:
    """The CPU path (only samples drawn for blurring, a few per call) gives the values of one
    grouped convolution over the whole batch followed by the per-sample choice."""
    import math

    x = torch.rand(160, 3, 96, 96)  # about 80 drawn: more than one chunk (37 at this size)
    sigma = (0.1, 2.0)
    got = ops.gaussian_blur(x, 0.5, sigma, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    mask, s = ops.coin(g, 160, 0.5), ops.uniform(g, 160, *sigma)
    radius = math.ceil(3 * sigma[1])
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    k = k * (t.abs()[None] <= (3 * s[:, None]).ceil())  # each sample's kernel ends at ceil(3 sigma)
    k = k / k.sum(1, keepdim=True)
    want = ops._select(mask, ops._separable_all(x, k, radius), x)
    assert 37 < int(mask.sum()) < 160 and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[~mask], x[~mask])
    assert len((3 * s[mask]).ceil().unique()) > 3  # several kernel widths were grouped


def test_small_sigma_blurs_with_its_own_three_taps():
    x = batch(1, 1, 16)
    y = ops.gaussian_blur(x, 1.0, (0.3, 0.3), gen())  # ceil(3 * 0.3) = 1: taps -1, 0, 1
    k = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / 0.3) ** 2)
    k = k / k.sum()
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    want = torch.nn.functional.conv2d(padded, (k[:, None] * k[None, :])[None, None])
    assert torch.allclose(y, want, atol=1e-6)


def _geometry_draws(b: int, seed: int, **kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop and orientation matrices random_geometry draws for ``seed`` (the same order)."""
    g = gen(seed)
    theta = ops.crop_matrix(g, b, 2, (0.25, 1.0), (3 / 4, 4 / 3))
    orient = ops.flip_matrix(g, b, 2, kw["hflip"], 0) @ ops.flip_matrix(g, b, 2, kw["vflip"], 1)
    return theta, ops.rot90_matrix(g, b, 2, kw["rot90"]) @ orient


def test_large_cpu_views_are_grid_sample_over_each_whole_pixel_crop():
    """At >= 96 px on a CPU each image is cropped to its box in whole pixels and resized on its
    own: the values of grid_sample over that crop, flips and quarter turns included."""
    b, kw = 24, dict(hflip=0.5, vflip=0.5, rot90=0.5)
    x = torch.rand(b, 3, 100, 130, generator=gen(1))  # not square: the axes cannot be swapped unseen
    y = ops.random_geometry(x, 96, gen(7), scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), **kw)
    theta, orient = _geometry_draws(b, 7, **kw)
    boxes = ops.crop_boxes(theta, 100, 130)
    assert y.shape == (b, 3, 96, 96)
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 100).all()
                and (boxes[:, 1] + boxes[:, 3] <= 130).all())
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = x[i:i + 1, :, top:top + h, left:left + w]
        identity_crop = torch.cat([orient[i:i + 1], torch.zeros(1, 2, 1)], 2)
        assert torch.allclose(y[i], ops.warp(crop, identity_crop, 96, "border")[0], atol=5e-5)
        area = h * w / (100 * 130)
        assert 0.23 < area < 1.01
    assert bool((orient[:, 0, 0] == 0).any() and (orient[:, 0, 0] != 0).any())  # turns and non-turns seen


def test_large_uint8_views_match_the_float_views_to_one_level():
    x8 = torch.randint(0, 256, (8, 3, 128, 128), dtype=torch.uint8, generator=gen(2))
    kw = dict(scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    a = ops.random_geometry(x8, 112, gen(3), **kw)
    b = ops.random_geometry(x8.float() / 255, 112, gen(3), **kw)
    assert a.dtype == torch.float32 and float((a - b).abs().max()) <= 1.01 / 255


def test_large_cpu_views_do_not_depend_on_the_thread_count():
    """Chunks of large views run on a pool of threads with their own generators: the same
    views on one thread and on two, and the caller keeps its own thread count."""
    x = torch.randint(0, 256, (30, 3, 224, 224), dtype=torch.uint8, generator=gen(4))  # 3 chunks of <= 13
    cfg = resolve(ViewConfig(blur=0.5), "pathmnist")
    recipe = ViewRecipe([(cfg, 224), (cfg, 96)], mean=[0.5] * 3, std=[0.25] * 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = recipe(x, gen(5))
        torch.set_num_threads(2)
        two = recipe(x, gen(5))
        assert torch.get_num_threads() == 2
        from medlatent.augment.views import _chunk_pool

        assert _chunk_pool(2).submit(torch.get_num_threads).result() == 1  # the workers: one thread each
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2]  # threads started later still take the caller's count
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert one[0].shape == (30, 3, 224, 224) and one[1].shape == (30, 3, 96, 96)
    assert not torch.allclose(one[0][:13], one[0][13:26])  # each chunk its own draws
    assert not torch.equal(recipe(x, gen(6))[0], one[0])
