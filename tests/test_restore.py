"""Restoration: degradations, k-space masks and consistency, the UNet method, diffusion
restoration, and the restore commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medlatent.generative.schedule import NoiseSchedule, ScheduleConfig
from medlatent.restore.degrade import (box_masks, cartesian_mask, fft2c, kspace_consistency, pixel_consistency,
                                       poisson_noise, undersample)
from medlatent.restore.evaluate import matching_step, psnr_ssim
from medlatent.restore.tasks import Restorer, RestoreConfig

from conftest import write_stripes_npz
from test_cli import one_error_line, run_cli


@pytest.mark.parametrize("width,acc,center", [(28, 4, 0.08), (28, 8, 0.08), (64, 4, 0.08), (320, 8, 0.04)])
def test_cartesian_mask_keeps_the_fraction_and_the_centre(width: int, acc: float, center: float):
    m = cartesian_mask(width, acc, center, torch.Generator().manual_seed(0))
    assert m.sum() == round(width / acc)  # exactly the requested fraction of lines
    half = (max(1, round(width * center)) - 1) // 2
    assert m[width // 2 - half:width // 2 + half + 1].all()  # the fully sampled centre around frequency 0
    assert all(m[j] == m[(width - j) % width] for j in range(width))  # conjugate-symmetric
    assert torch.equal(m, cartesian_mask(width, acc, center, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, cartesian_mask(width, acc, center, torch.Generator().manual_seed(1)))


def test_data_consistency_leaves_sampled_kspace_unchanged():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g)
    mask = cartesian_mask(28, 4, 0.08, g)
    k, zero_filled = undersample(x, mask)
    assert torch.allclose(undersample(x, torch.ones(28, dtype=torch.bool))[1], x, atol=1e-5)  # full sampling
    estimate = torch.rand(2, 1, 28, 28, generator=g)
    dc = kspace_consistency(estimate, k, mask)
    k_dc = fft2c(dc.to(torch.complex64))
    # measured columns equal the measurements exactly (the symmetric mask keeps images real)
    assert torch.allclose(k_dc[..., mask], k[..., mask], atol=1e-4)
    assert not torch.allclose(k_dc[..., ~mask], k[..., ~mask], atol=1e-3)
    assert torch.allclose(kspace_consistency(x, k, mask), x, atol=1e-5)  # the truth is already consistent


def test_pixel_consistency_boxes_and_poisson():
    g = torch.Generator().manual_seed(0)
    masks = box_masks((3, 1, 28, 28), 0.25, g)
    assert masks.shape == (3, 1, 28, 28) and torch.allclose(1 - masks.mean((1, 2, 3)), torch.full((3,), 196 / 784))
    x, est = torch.rand(3, 1, 28, 28, generator=g), torch.rand(3, 1, 28, 28, generator=g)
    out = pixel_consistency(est, x * masks, masks)
    assert torch.equal(out[masks.bool()], x[masks.bool()]) and torch.equal(out[~masks.bool()], est[~masks.bool()])
    flat = torch.full((20000,), 0.5)
    noisy = poisson_noise(flat, 10.0, torch.Generator().manual_seed(0))
    assert noisy.mean() == pytest.approx(0.5, abs=0.01) and noisy.var() == pytest.approx(0.05, rel=0.05)


def test_noise_level_matching_step():
    ab = NoiseSchedule(ScheduleConfig("cosine", 1000)).alphas_bar
    for sigma in (0.05, 0.25, 0.5):
        t = matching_step(ab, sigma)
        assert float((ab[t].sqrt() * 2 * sigma - (1 - ab[t]).sqrt()).abs()) < 0.01  # same noise std at step t


@pytest.mark.parametrize("task,dims", [("denoise", 2), ("poisson", 2), ("kspace", 2), ("inpaint", 2), ("denoise", 3)])
def test_restorer_trains_two_steps(task: str, dims: int):
    torch.manual_seed(0)
    model = Restorer(dims, 1, RestoreConfig(task=task, channels=(8, 16), strides=(2,)))
    x = torch.rand(4, 1, *(8,) * dims)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = model([x]).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    d = model.degrade(x, torch.Generator().manual_seed(0), {"denoise": 0.5, "poisson": 5.0, "kspace": 4.0,
                                                            "inpaint": 0.25}[task])
    assert model.restore(d).shape == x.shape
    assert psnr_ssim(x, x)["ssim"] == pytest.approx(1.0)


def test_restore_commands_end_to_end(capsys, tmp_path: Path):
    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=64, n_val=16, n_test=16))
    run = tmp_path / "ks"
    code, _, err = run_cli(capsys, "restore", "train", "--task", "kspace", "--data", data, "--epochs", "1",
                           "--batch-size", "16", "--output", str(run), "--set", "method_options.channels=[8,16]",
                           "--set", "method_options.strides=[2]")
    assert code == 0, err
    ddpm = tmp_path / "ddpm"
    code, _, err = run_cli(capsys, "generate", "train", "--method", "ddpm", "--data", data, "--epochs", "1",
                           "--batch-size", "16", "--output", str(ddpm), "--set", "method_options.channels=[16,32]",
                           "--set", "method_options.attention_levels=[false,false]",
                           "--set", "method_options.schedule.steps=20")
    assert code == 0, err
    code, out, err = run_cli(capsys, "restore", "evaluate", str(run), "--diffusion", str(ddpm), "--n", "8",
                             "--steps", "2")
    assert code == 0, err
    for method in ("zero-filled", "UNet + data consistency", "diffusion + data consistency"):
        assert method in out
    assert "4x" in out and "8x" in out and (run / "restore_examples.png").is_file()
    code, _, err = run_cli(capsys, "restore", "evaluate", str(ddpm))
    assert code == 1 and "not a restoration run" in one_error_line(err)
    paired = tmp_path / "paired"
    code, _, err = run_cli(capsys, "restore", "train", "--task", "inpaint", "--method", "diffusion", "--data", data,
                           "--epochs", "1", "--batch-size", "16", "--output", str(paired),
                           "--set", "method_options.diffusion.channels=[16,32]",
                           "--set", "method_options.diffusion.attention_levels=[false,false]",
                           "--set", "method_options.sample_steps=2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "restore", "evaluate", str(paired), "--n", "4")
    assert code == 0 and "conditional diffusion + data consistency" in out, err


def test_classical_baselines_and_jpeg_rate_distortion():
    from medlatent.restore.compression import jpeg_curve, jpeg_roundtrip, quantise
    from medlatent.restore.evaluate import classical
    from conftest import stripes

    imgs, _ = stripes(6)
    x = torch.from_numpy(imgs[:, None]).float() / 255
    noisy = (x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    base = psnr_ssim(noisy, x)["psnr"]
    found = classical(noisy, 0.25)
    assert set(found) == {"non-local means", "total variation", "wavelet"}
    assert all(psnr_ssim(v, x)["psnr"] > base + 1 for v in found.values())  # each filter removes noise

    curve = jpeg_curve(x, (5, 50, 95))
    assert [r["bytes"] for r in curve] == sorted(r["bytes"] for r in curve)  # more quality, more bytes
    assert curve[0]["psnr"] < curve[-1]["psnr"] and all(r["file_bytes"] > r["bytes"] for r in curve)
    decoded, scan, file = jpeg_roundtrip(x[0, 0].numpy(), 95)
    assert decoded.shape == (28, 28) and 0 < scan < file
    z = torch.randn(4, 16)
    zq, nbytes = quantise(z)
    assert nbytes == 16 + 4 and (zq - z).abs().max() <= (z.max(1).values - z.min(1).values).max() / 255 + 1e-2


def test_rate_distortion_command(capsys, tmp_path: Path):
    from medlatent import api
    from medlatent.config import PretrainConfig

    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=64, n_val=16, n_test=16))
    runs = []
    for d in (8, 32):
        cfg = PretrainConfig()
        cfg.method, cfg.method_options = "autoencoder", {"latent_dim": d}
        cfg.data.name = data
        cfg.train.epochs, cfg.train.batch_size = 1, 32
        runs.append(str(api.pretrain(cfg, output=tmp_path / f"ae{d}")))
    code, out, err = run_cli(capsys, "restore", "rate-distortion", *runs, "--out", str(tmp_path / "rd.png"))
    assert code == 0 and "autoencoder (latent 8)" in out and "JPEG" in out, err
    assert (tmp_path / "rd.png").is_file() and (tmp_path / "rd.json").is_file()
    # the same autoencoders as a denoising row beside the UNet; a non-autoencoder run is refused
    den = tmp_path / "den"
    code, _, err = run_cli(capsys, "restore", "train", "--task", "denoise", "--data", data, "--epochs", "1",
                           "--batch-size", "16", "--output", str(den), "--set", "method_options.channels=[8,16]",
                           "--set", "method_options.strides=[2]")
    assert code == 0, err
    code, out, err = run_cli(capsys, "restore", "evaluate", str(den), "--autoencoder", runs[0], "--n", "8")
    assert code == 0 and out.count("denoising autoencoder") == 3, err  # one row per sigma
    code, _, err = run_cli(capsys, "restore", "evaluate", str(den), "--autoencoder", str(den), "--n", "8")
    assert code == 1 and "not an autoencoder run" in one_error_line(err)


def test_autoencoder_denoise_undoes_the_run_standardisation():
    from medlatent.restore.evaluate import autoencoder_denoise

    class Stub(torch.nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale

        def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * x

    y = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    mean, std = [0.3, 0.6], [0.2, 0.1]
    assert torch.allclose(autoencoder_denoise(Stub(1.0), mean, std, y), y, atol=1e-6)  # identity stays identity
    flat = autoencoder_denoise(Stub(0.0), mean, std, y)  # a zero code decodes to the channel means
    assert torch.allclose(flat[:, 0], torch.full_like(flat[:, 0], 0.3))
    assert torch.allclose(flat[:, 1], torch.full_like(flat[:, 1], 0.6))


def test_paired_diffusion_trains_and_restores_consistently():
    from medlatent.generative.ddpm import DDPMConfig
    from medlatent.generative.schedule import ScheduleConfig
    from medlatent.restore.paired_diffusion import PairedDiffusion, PairedDiffusionConfig

    torch.manual_seed(0)
    for task in ("kspace", "inpaint", "denoise"):
        cfg = PairedDiffusionConfig(RestoreConfig(task=task),
                                    DDPMConfig(channels=(16, 32), attention_levels=(False, False),
                                               schedule=ScheduleConfig(steps=20)), sample_steps=3)
        model = PairedDiffusion(2, 1, cfg)
        x = torch.rand(3, 1, 8, 8)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        loss = model([x]).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        model.on_step_end(0, 1)
        d = model.degrade(x, torch.Generator().manual_seed(0), {"kspace": 4.0, "inpaint": 0.25, "denoise": 0.5}[task])
        out = model.restore(d, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape
        if task == "inpaint":  # known pixels are kept exactly
            known = d["mask"].bool().expand_as(x)
            assert torch.allclose(out[known], x[known])


def test_default_unet_sees_the_noise_level():
    """A blind denoiser must know how strong the noise is. MONAI's UNet with per-image
    (instance) norm normalises its one-channel output map before the last conv, so the residual
    it predicts has the same size for a 10x weaker input; the default (batch norm) keeps the scale."""
    from medlatent.restore.tasks import Restorer, RestoreConfig

    y = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def growth(norm: str | None) -> float:  # residual std for y / for 0.1 y
        torch.manual_seed(0)
        m = Restorer(2, 1, RestoreConfig(norm=norm) if norm else RestoreConfig()).eval()
        with torch.no_grad():
            return float((m.unet(y).std(dim=(1, 2, 3)) / m.unet(0.1 * y).std(dim=(1, 2, 3))).mean())

    assert 0.9 < growth("instance") < 1.1
    assert growth(None) > 1.5
