"""Compression: rate-distortion of autoencoders against JPEG at the same number of bytes.

An autoencoder compresses an image to its latent code. Stored with uniform 8-bit quantisation
(per image: min and max as two float16 values), a code of d numbers costs d + 4 bytes. JPEG's
file carries ~150-300 bytes of tables and headers that dominate at 28 px, so JPEG is counted
by its entropy-coded scan (what changes with quality; the tables could be fixed and shared),
and the full file size is reported beside it.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from medlatent.restore.metrics import psnr_ssim


def quantise(z: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, int]:
    """(B, d) codes -> (dequantised codes, bytes per image) with per-image min/max scaling."""
    lo, hi = z.min(1, keepdim=True).values, z.max(1, keepdim=True).values
    lo, hi = lo.half().float(), hi.half().float()  # what would be stored
    levels = 2 ** bits - 1
    q = ((z - lo) / (hi - lo).clamp(min=1e-8) * levels).round().clamp(0, levels)
    return lo + q / levels * (hi - lo), z.shape[1] * bits // 8 + 4


def jpeg_scan_bytes(data: bytes) -> int:
    """Bytes of a JPEG's entropy-coded data: from the end of the SOS header to the EOI marker."""
    sos = data.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("not a baseline JPEG (no SOS marker)")
    header = int.from_bytes(data[sos + 2:sos + 4], "big")
    return len(data) - (sos + 2 + header) - 2  # minus the final FF D9


def jpeg_roundtrip(image: np.ndarray, quality: int) -> tuple[np.ndarray, int, int]:
    """(decoded image in [0, 1], scan bytes, file bytes) of one (H, W) or (H, W, 3) image in [0, 1]."""
    from PIL import Image

    arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality), optimize=True)
    data = buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 255
    return decoded, jpeg_scan_bytes(data), len(data)


def jpeg_curve(images: torch.Tensor, qualities: tuple[int, ...] = (1, 5, 10, 20, 30, 50, 70, 90)
               ) -> list[dict[str, float]]:
    """Mean scan bytes, file bytes, PSNR and SSIM of JPEG at each quality; images (N, C, H, W) in [0, 1]."""
    rows = []
    for q in qualities:
        decoded, scan, file = [], [], []
        for img in images.numpy():
            im = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
            d, s, f = jpeg_roundtrip(im, q)
            decoded.append(d[None] if d.ndim == 2 else np.moveaxis(d, -1, 0))
            scan.append(s)
            file.append(f)
        rows.append(dict(codec="JPEG", quality=q, bytes=float(np.mean(scan)), file_bytes=float(np.mean(file)),
                         **psnr_ssim(torch.from_numpy(np.stack(decoded)), images)))
    return rows


@torch.no_grad()
def load_autoencoder(run_dir: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """An autoencoder or denoising-autoencoder run's model and metadata (mean/std).

    Raises:
        ConfigError: the run is another method.
    """
    from pathlib import Path

    from medlatent.errors import ConfigError
    from medlatent.methods.saved import load_method
    from medlatent.train.runs import RunDir

    method = RunDir(Path(run_dir)).read_config().method
    if method not in ("autoencoder", "denoising-autoencoder"):
        raise ConfigError(f"{run_dir}: a {method} run is not an autoencoder run (autoencoder, denoising-autoencoder)")
    model, meta, _ = load_method(run_dir, device)
    return model, meta


def autoencoder_point(method: torch.nn.Module, images: torch.Tensor, mean: list[float], std: list[float]
                      ) -> dict[str, float]:
    """Bytes per image and PSNR/SSIM of an autoencoder run with 8-bit quantised codes."""
    shape = (1, -1, *([1] * (images.dim() - 2)))
    m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    z = method.bottleneck(method.encoder((images - m) / s))  # (N, d)
    zq, nbytes = quantise(z)
    recon = (method.decoder(zq) * s + m).clamp(0, 1)
    return dict(codec=f"autoencoder (latent {z.shape[1]})", latent_dim=z.shape[1], bytes=float(nbytes),
                **psnr_ssim(recon, images))


def rate_distortion(runs: list[str], n: int = 500, out: str = "rate_distortion.png",
                    data_dir: str | None = None) -> dict:
    """Autoencoder runs (any latent sizes) against JPEG at the same bytes on the first ``n`` test
    images of the first run's data: rows {codec, bytes, psnr, ssim}, a plot at ``out`` and the
    rows beside it as JSON."""
    import dataclasses
    from pathlib import Path

    from medlatent.data.sources import load_dataset
    from medlatent.data.store import to_float
    from medlatent.report.figures import rate_distortion_figure
    from medlatent.train.checkpoint import write_json_atomic
    from medlatent.train.runs import RunDir

    rows, data, images = [], None, None
    for run in runs:
        method, meta = load_autoencoder(run, "cpu")
        if data is None:
            cfg = RunDir(Path(run)).read_config()
            data = load_dataset(dataclasses.replace(cfg.data, data_dir=data_dir or cfg.data.data_dir))
            images = to_float(data.split("test").images[:n])
        rows.append(dict(autoencoder_point(method, images, meta["mean"], meta["std"]), run=run))
    rows += jpeg_curve(images)
    rows.sort(key=lambda r: (r["codec"] == "JPEG", r["bytes"]))
    figure = rate_distortion_figure(rows, f"{data.name} test ({len(images)} images): rate-distortion", Path(out))
    table = Path(out).with_suffix(".json")
    write_json_atomic(table, rows)
    return dict(rows=rows, figure=figure, table=table)
