"""Detectors built from trained runs, and one evaluation protocol for all of them.

* reconstruction: a bottleneck or denoising autoencoder run (``ssl/autoencoder.py``), a VAE run
  (posterior mean decoded) or a DDPM run (noise the image to step t, denoise it back with DDIM
  and compare: Wolleb et al. 2022, "Diffusion models for medical anomaly detection"; the
  SDEdit reconstruction of Meng et al. 2022), all trained on normal images only;
* features: any encoder run; an image's score is its mean cosine distance to the k nearest
  normal training embeddings.

The protocol: scores on the test split (anomaly = label not among the normal classes), a
threshold from the normal val images, sensitivity/specificity at it, AUROC and AUPRC.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medlatent.train.checkpoint import write_json_atomic
from medlatent.anomaly.scores import knn_distance, pixel_scores
from medlatent.anomaly.thresholds import operating_point, ranking, threshold
from medlatent.data.store import Dataset, to_float
from medlatent.errors import ConfigError, DataError

RECONSTRUCTION = ("autoencoder", "denoising-autoencoder", "vae", "ddpm")
# ``medlatent anomaly fit --method``: detector name -> the method whose run it trains.
DETECTORS = {"ae": "autoencoder", "dae": "denoising-autoencoder", "vae": "vae", "ddpm": "ddpm"}


def parse_classes(text: str, flag: str = "--normal") -> list[int]:
    """``"0"`` or ``"0,1"`` -> [0] or [0, 1]."""
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected class indices such as 0 or 0,1") from None


def score_run(run_dir: str | Path, cfg: AnomalyConfig, detector: str = "auto", data: str | None = None,
              normal: list[int] | None = None, split: str = "test", out: str | Path | None = None,
              data_dir: str | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Score ``split`` of the run's data (or ``data``) with the run's detector and write the
    per-image CSV and heatmaps into ``out`` (default ``<run>/anomaly-<data>``).

    ``normal``: the normal classes (default: those the run was fitted on).
    """
    from medlatent.anomaly.thresholds import parse_rule
    from medlatent.data.sources import load_dataset
    from medlatent.train.runs import RunDir

    try:
        parse_rule(cfg.threshold)
    except ValueError as e:
        raise ConfigError(f"--threshold: {e}") from None
    run_cfg = RunDir(Path(run_dir)).read_config()
    classes = normal or run_cfg.data.classes
    if not classes:
        raise ConfigError(f"{run_dir}: was not fitted on chosen normal classes; give --normal")
    dataset = load_dataset(dataclasses.replace(run_cfg.data, name=data or run_cfg.data.name,
                                               data_dir=data_dir if data_dir is not None else run_cfg.data.data_dir)).labelled()
    result = evaluate_detector(run_dir, dataset, classes, cfg, detector, split, device)
    return write_outputs(result, dataset.split(split).images,
                         Path(out) if out else Path(run_dir) / f"anomaly-{dataset.name}")


@dataclasses.dataclass
class AnomalyConfig:
    """How a run scores images."""

    # l2, l1 or ssim for reconstruction detectors; feature runs always use the k-NN distance.
    score: str = "l2"
    # Threshold rule on normal val scores: "mean+3std" or a percentile such as "p95".
    threshold: str = "mean+3std"
    # Diffusion reconstruction: noise to this fraction of the schedule, then this many DDIM steps.
    diffusion_t: float = 0.3
    diffusion_steps: int = 10
    # Neighbours for the feature detector.
    k: int = 5


Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # (B, C, *S) in [0, 1] -> same


def reconstructor(run_dir: Path, cfg: AnomalyConfig, device: torch.device) -> tuple[Reconstruct, str]:
    """A function from images in [0, 1] to their reconstruction in [0, 1], and its name."""
    from medlatent.methods.saved import load_method
    from medlatent.generative.samplers import sample
    from medlatent.train.runs import RunDir

    method_name = RunDir(run_dir).read_config().method
    if method_name not in RECONSTRUCTION:
        raise ConfigError(f"{run_dir}: a {method_name} run does not reconstruct images "
                          f"(use {', '.join(RECONSTRUCTION)}, or --detector knn with any encoder run)")
    method, meta, _ = load_method(run_dir, device)
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, *([1] * meta["spatial_dims"]))
    std = torch.tensor(meta["std"], device=device).view(1, -1, *([1] * meta["spatial_dims"]))
    if method_name in ("autoencoder", "denoising-autoencoder"):
        return (lambda x: (method.reconstruct((x - mean) / std) * std + mean).clamp(0, 1)), method_name
    if method_name == "vae":
        return (lambda x: (method.decode(method.encode(x * 2 - 1)[0]).clamp(-1, 1) + 1) / 2), method_name
    t_start = max(1, int(cfg.diffusion_t * method.schedule.steps) - 1)
    g = torch.Generator(device=device).manual_seed(0)

    def diffuse(x: torch.Tensor) -> torch.Tensor:
        x0 = x * 2 - 1
        t = torch.full((len(x),), t_start, device=device, dtype=torch.long)
        x_t = method.schedule.add_noise(x0, torch.randn(x0.shape, generator=g, device=device), t)
        null = torch.full((len(x),), method.null_label, device=device) if method.n_classes else None

        def eps(z: torch.Tensor, tt: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return method.denoise(z, tt, null, ema=True)  # unconditional: the null class

        out = sample(eps, method.schedule, tuple(x.shape), cfg.diffusion_steps, "ddim", 0.0, None, None, 1.0, g,
                     device, 1.0, x_start=x_t, t_start=t_start)
        return (out.clamp(-1, 1) + 1) / 2

    return diffuse, f"ddpm (t = {cfg.diffusion_t:g} T, {cfg.diffusion_steps} DDIM steps)"


@torch.no_grad()
def score_images(fn: Reconstruct, images: torch.Tensor, kind: str, device: torch.device, batch: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) scores and (N, *S) heatmaps of stored images."""
    scores, heats = [], []
    for i in range(0, len(images), batch):
        x = to_float(images[i:i + batch].to(device))
        s, h = pixel_scores(x, fn(x), kind)
        scores.append(s.cpu())
        heats.append(h.cpu())
    return torch.cat(scores), torch.cat(heats)


def _is_normal(labels: torch.Tensor, normal: list[int]) -> np.ndarray:
    return torch.isin(labels[:, 0], torch.tensor(normal)).numpy()


def evaluate_detector(run_dir: str | Path, data: Dataset, normal: list[int], cfg: AnomalyConfig,
                      detector: str = "auto", split: str = "test", device: torch.device | None = None
                      ) -> dict[str, Any]:
    """Scores of ``split`` (anomaly = not a normal class), threshold from normal val images."""
    from medlatent.eval.features import extract_features
    from medlatent.methods.saved import load_encoder

    device = device or torch.device("cpu")
    run_dir = Path(run_dir)
    if data.task is None or data.task.startswith("multi-label"):
        raise DataError(f"{data.source or data.name}: anomaly evaluation needs single-label classes")
    bad = [c for c in normal if not 0 <= c < data.n_classes]
    if bad or not normal:
        raise ConfigError(f"--normal {normal}: {data.name} has classes 0..{data.n_classes - 1}")
    val, test = data.split("val"), data.split(split)
    val_normal = _is_normal(val.labels, normal)
    heat = None
    if detector == "knn":
        encoder, meta, _ = load_encoder(run_dir, device)
        train = data.split("train")
        bank_idx = torch.from_numpy(_is_normal(train.labels, normal)).nonzero()[:, 0]

        def feats(images: torch.Tensor) -> torch.Tensor:
            return extract_features(encoder, images, meta["mean"], meta["std"], device)

        bank = feats(train.images[bank_idx])
        s_val = knn_distance(bank, feats(val.images[torch.from_numpy(val_normal)]), cfg.k)
        s_test = knn_distance(bank, feats(test.images), cfg.k)
        name = f"k-NN feature distance (k = {cfg.k})"
    else:
        fn, name = reconstructor(run_dir, cfg, device)
        s_val, _ = score_images(fn, val.images[torch.from_numpy(val_normal)], cfg.score, device)
        s_test, heat = score_images(fn, test.images, cfg.score, device)
        name = f"{name}, {cfg.score} score"
    is_anomaly = ~_is_normal(test.labels, normal)
    thr = threshold(s_val.numpy(), cfg.threshold)
    return dict(detector=name, data=data.name, normal=normal, split=split, n=len(s_test),
                n_anomalous=int(is_anomaly.sum()), threshold_rule=cfg.threshold,
                **ranking(s_test.numpy(), is_anomaly), **operating_point(s_test.numpy(), is_anomaly, thr),
                _scores=s_test, _heatmaps=heat, _is_anomaly=is_anomaly)


def write_outputs(result: dict[str, Any], images: torch.Tensor, out_dir: Path) -> dict[str, Any]:
    """Per-image scores (CSV), a heatmap figure of the highest-scoring images, and the JSON."""
    from medlatent.eval.maps import display_images
    from medlatent.report.figures import heatmap_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    scores, heat, is_anomaly = result.pop("_scores"), result.pop("_heatmaps"), result.pop("_is_anomaly")
    csv = out_dir / "scores.csv"
    tmp = csv.with_name(f".{csv.name}.tmp-{os.getpid()}")
    tmp.write_text("index,score,anomalous,flagged\n" + "".join(
        f"{i},{s:.6g},{int(a)},{int(s > result['threshold'])}\n" for i, (s, a) in enumerate(zip(scores.tolist(), is_anomaly))))
    os.replace(tmp, csv)
    result["scores_csv"] = str(csv)
    if heat is not None:
        top = scores.argsort(descending=True)[:8]
        low = scores.argsort()[:4]
        pick = torch.cat([top, low])
        result["heatmaps"] = str(heatmap_figure(
            display_images(images[pick]), [h.numpy() for h in heat[pick]],
            [f"{'anomaly' if is_anomaly[i] else 'normal'} {scores[i]:.3g}" for i in pick.tolist()],
            f"{result['data']}: highest (left) and lowest anomaly scores - {result['detector']}",
            out_dir / "heatmaps.png"))
    write_json_atomic(out_dir / "anomaly.json", result)
    return result
