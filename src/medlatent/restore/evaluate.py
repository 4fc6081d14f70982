"""Restoration benchmarks on a test split: the degraded input, the UNet (with and without data
consistency), classical filters (scikit-image, when installed), a (denoising) autoencoder and
diffusion (a DDPM trained on clean images), by PSNR and SSIM (MONAI's metrics, data range 1).

Autoencoder denoising: the noisy image, standardised as the autoencoder run was, goes through
encoder -> bottleneck -> decoder (Vincent et al. 2008); the bottleneck is what removes noise.

Diffusion restoration, with a DDPM that never saw a degraded image:
* Gaussian denoising: a noisy image y = x + sigma n is, after scaling by sqrt(alpha_bar_t), a
  diffusion state x_t for the step whose noise-to-signal ratio sqrt((1 - ab_t) / ab_t) equals
  sigma (in [-1, 1] units, 2 sigma); DDIM from that step to 0 denoises it.
* k-space and inpainting: DDIM from pure noise, each step's x0 estimate made consistent with the
  measurements (k-space columns, known pixels) before the next step (Chung et al. 2022 / RePaint,
  Lugmayr et al. 2022, in their simplest hard-projection form).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from medlatent.generative.samplers import sample
from medlatent.restore.compression import load_autoencoder
from medlatent.restore.degrade import kspace_consistency, pixel_consistency
from medlatent.restore.metrics import psnr_ssim
from medlatent.restore.tasks import make_consistent


def classical(y: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """scikit-image's non-local means, total variation (Chambolle) and wavelet (BayesShrink)
    denoisers, per 2-D image; empty when scikit-image is not installed."""
    try:
        from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, denoise_wavelet
    except ImportError:
        return {}
    out: dict[str, list[np.ndarray]] = {"non-local means": [], "total variation": [], "wavelet": []}
    for img in y.clamp(0, 1).numpy():
        im = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        axis = None if im.ndim == 2 else -1
        out["non-local means"].append(denoise_nl_means(im, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                                       patch_distance=6, channel_axis=axis))
        out["total variation"].append(denoise_tv_chambolle(im, weight=0.5 * sigma, channel_axis=axis))
        try:
            out["wavelet"].append(denoise_wavelet(im, sigma=sigma, channel_axis=axis, rescale_sigma=True))
        except (ImportError, ValueError):  # PyWavelets missing
            out["wavelet"] = []
    as_tensor = {}
    for name, imgs in out.items():
        if imgs:
            a = np.stack(imgs)
            as_tensor[name] = torch.from_numpy(a[:, None] if a.ndim == 3 else np.moveaxis(a, -1, 1)).float()
    return as_tensor


def autoencoder_denoise(ae: torch.nn.Module, mean: list[float], std: list[float], y: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) noisy in [0, 1] -> the autoencoder's reconstruction in [0, 1], in the run's
    standardisation (``mean``/``std`` per channel, from its data.json)."""
    shape = (1, -1, *([1] * (y.dim() - 2)))
    m = torch.tensor(mean, device=y.device).view(shape)
    s = torch.tensor(std, device=y.device).view(shape)
    return (ae.reconstruct((y - m) / s) * s + m).clamp(0, 1)


def _eps(ddpm: torch.nn.Module) -> Callable:
    def eps(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        null = torch.full((len(x),), ddpm.null_label, device=x.device) if ddpm.n_classes else None
        return ddpm.denoise(x, t, null, ema=True)
    return eps


def matching_step(alphas_bar: torch.Tensor, sigma: float) -> int:
    """The step t whose noise-to-signal ratio sqrt((1 - ab_t) / ab_t) is closest to 2 sigma
    (sigma in [0, 1] units is 2 sigma in the model's [-1, 1] units)."""
    return int(((1 - alphas_bar) / alphas_bar).sqrt().sub(2 * sigma).abs().argmin())


@torch.no_grad()
def diffusion_denoise(ddpm: torch.nn.Module, y: torch.Tensor, sigma: float, steps: int = 20,
                      g: torch.Generator | None = None) -> torch.Tensor:
    """Denoise y = x + sigma n (in [0, 1] units) with an unconditional DDPM (see module doc)."""
    t = matching_step(ddpm.schedule.alphas_bar, sigma)
    x_t = ddpm.schedule.alphas_bar[t].sqrt() * (2 * y - 1)
    out = sample(_eps(ddpm), ddpm.schedule, tuple(y.shape), steps, "ddim", 0.0, generator=g, device=y.device,
                 x_start=x_t, t_start=t)
    return (out.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def diffusion_consistent(ddpm: torch.nn.Module, d: dict[str, torch.Tensor], task: str, steps: int = 50,
                         g: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from noise with every x0 estimate projected onto the measurements."""
    def project(x0: torch.Tensor) -> torch.Tensor:  # x0 in [-1, 1]
        x01 = (x0 + 1) / 2
        x01 = (kspace_consistency(x01, d["kspace"], d["mask"]) if task == "kspace"
               else pixel_consistency(x01, d["input"], d["mask"]))
        return x01 * 2 - 1

    out = sample(_eps(ddpm), ddpm.schedule, tuple(d["input"].shape), steps, "ddim", 0.0, generator=g,
                 device=d["input"].device, x0_transform=project)
    return (out.clamp(-1, 1) + 1) / 2


def levels(cfg: Any) -> list[float]:
    return {"denoise": list(cfg.sigmas), "poisson": [cfg.peak], "kspace": list(cfg.accelerations),
            "inpaint": [cfg.hidden_fraction]}[cfg.task]


@torch.no_grad()
def benchmark(restorer: torch.nn.Module, clean: torch.Tensor, ddpm: torch.nn.Module | None = None,
              diffusion_steps: int = 20, batch: int = 250, seed: int = 0,
              autoencoder: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Rows {level, method, psnr, ssim} on ``clean`` (N, C, *S) in [0, 1] for each degradation
    level. ``autoencoder``: noisy -> denoised (see ``autoencoder_denoise``), for the noise tasks."""
    task = restorer.cfg.task
    rows = []
    for level in levels(restorer.cfg):
        preds: dict[str, list[torch.Tensor]] = {}
        g = torch.Generator().manual_seed(seed)
        for i in range(0, len(clean), batch):
            x = clean[i:i + batch]
            d = restorer.degrade(x, g, level)
            found = {"degraded input" if task in ("denoise", "poisson") else
                     ("zero-filled" if task == "kspace" else "masked input"): d["input"],
                     restorer.label: restorer.restore(d, consistent=False)}
            if task in ("kspace", "inpaint"):
                found[f"{restorer.label} + data consistency"] = make_consistent(found[restorer.label], d, task)
            if task == "denoise":
                found.update(classical(d["input"].cpu(), level))
            if autoencoder is not None and task in ("denoise", "poisson"):
                found["denoising autoencoder"] = autoencoder(d["input"])
            if ddpm is not None and task == "denoise":
                found["diffusion (DDPM)"] = diffusion_denoise(ddpm, d["input"], level, diffusion_steps, g)
            if ddpm is not None and task in ("kspace", "inpaint"):
                found["diffusion + data consistency"] = diffusion_consistent(ddpm, d, task, 2 * diffusion_steps, g)
            for name, p in found.items():
                preds.setdefault(name, []).append(p.cpu())
        for name, p in preds.items():
            rows.append(dict(task=task, level=level, method=name, **psnr_ssim(torch.cat(p), clean.cpu())))
    return rows


def level_name(task: str, level: float) -> str:
    return {"denoise": f"sigma {level:g}", "poisson": f"peak {level:g}", "kspace": f"{level:g}x",
            "inpaint": f"{level:.0%} hidden"}[task]


@torch.no_grad()
def benchmark_run(run_dir: str, diffusion_run: str | None = None, n: int = 500, diffusion_steps: int = 20,
                 data_dir: str | None = None, device: str = "auto",
                 autoencoder_run: str | None = None) -> dict[str, Any]:
    """``benchmark`` on the first n test images of the run's data; writes ``restore_eval.json``
    and ``restore_examples.png`` (rows: methods at the first level, columns: images).
    ``autoencoder_run``: an autoencoder / denoising-autoencoder run on clean images."""
    import dataclasses
    import functools
    import json
    import os
    from pathlib import Path

    from medlatent.data.sources import load_dataset
    from medlatent.data.store import to_float
    from medlatent.eval.maps import display_images
    from medlatent.methods.saved import load_method
    from medlatent.report.figures import sample_grid_figure
    from medlatent.train.precision import resolve_device
    from medlatent.train.runs import RunDir

    dev = resolve_device(device)
    cfg = RunDir(Path(run_dir)).read_config()
    if cfg.method not in ("restore", "restore-diffusion"):
        from medlatent.errors import ConfigError

        raise ConfigError(f"{run_dir}: a {cfg.method} run is not a restoration run (medlatent restore train)")
    restorer, meta, step = load_method(run_dir, dev)
    ddpm = load_method(diffusion_run, dev)[0] if diffusion_run else None
    ae = None
    if autoencoder_run:
        ae_method, ae_meta = load_autoencoder(autoencoder_run, dev)
        ae = functools.partial(autoencoder_denoise, ae_method, ae_meta["mean"], ae_meta["std"])
    data = load_dataset(dataclasses.replace(cfg.data, data_dir=data_dir if data_dir is not None else cfg.data.data_dir))
    clean = to_float(data.split("test").images[:n]).to(dev)
    rows = benchmark(restorer, clean, ddpm, diffusion_steps, autoencoder=ae)
    # example figure: the first level, 8 images, every method
    g = torch.Generator().manual_seed(0)
    x = clean[:8]
    first = levels(restorer.cfg)[0]
    d = restorer.degrade(x, g, first)
    shown = {"clean": x, "degraded": d["input"].clamp(0, 1), restorer.label: restorer.restore(d)}
    if ae is not None and restorer.cfg.task in ("denoise", "poisson"):
        shown["autoencoder"] = ae(d["input"])
    if ddpm is not None and restorer.cfg.task == "denoise":
        shown["diffusion"] = diffusion_denoise(ddpm, d["input"], first, diffusion_steps, g)
    elif ddpm is not None:
        shown["diffusion + DC"] = diffusion_consistent(ddpm, d, restorer.cfg.task, 2 * diffusion_steps, g)
    fig = sample_grid_figure([display_images(v.clamp(0, 1).cpu()) for v in shown.values()], list(shown),
                             f"{data.name}: {restorer.cfg.task} ({level_name(restorer.cfg.task, first)})",
                             Path(run_dir) / "restore_examples.png")
    result = dict(run=str(run_dir), diffusion_run=diffusion_run, autoencoder_run=autoencoder_run, data=data.name,
                  n_images=len(clean), step=step,
                  rows=[dict(r, level_name=level_name(r["task"], r["level"])) for r in rows], figure=str(fig))
    out = Path(run_dir) / "restore_eval.json"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result
