"""The Python API: pretrain an encoder, load it back, probe it, embed images.

These functions wire data -> views -> method -> loop -> evaluation; the CLI is a thin layer
over them. Example::

    from medlatent import PretrainConfig, pretrain, probe
    cfg = PretrainConfig()                      # SimCLR, half-width ResNet-18, BloodMNIST 28 px
    cfg.train.epochs = 30
    run = pretrain(cfg, output="runs/blood-simclr")
    print(probe(run)["summary"])                # k-NN and linear probe ACC/AUC on val and test
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from medlatent import dist
from medlatent.config import DataConfig, PretrainConfig, from_dict, to_dict
from medlatent.data.catalogue import MULTI_LABEL
from medlatent.data.sources import load_dataset
from medlatent.data.store import Dataset, channel_stats
from medlatent.errors import CheckpointError, ConfigError, DataError
from medlatent.train import checkpoint
from medlatent.train.loop import FitResult, Progress, fit
from medlatent.train.precision import resolve_channels_last, resolve_device, resolve_precision
from medlatent.train.runs import RunDir, environment


def default_output(cfg: PretrainConfig) -> Path:
    name = Path(cfg.data.name).stem if cfg.data.name.endswith(".npz") else Path(cfg.data.name).name
    return Path("runs") / f"{name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def pretrain(config: PretrainConfig | None = None, output: str | Path | None = None, resume: bool = False,
             on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Path:
    """Pretrain an encoder without labels; returns the run folder (see :func:`run_pretraining`)."""
    return run_pretraining(config, output, resume, on_progress, should_stop)[0]


def run_pretraining(config: PretrainConfig | None = None, output: str | Path | None = None, resume: bool = False,
                    on_progress: Callable[[Progress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[Path, FitResult]:
    """Pretrain an encoder without labels; returns the run folder and how training ended.

    Args:
        config: the run's configuration (default: SimCLR on BloodMNIST); ignored on resume,
            where the run folder's own config is used.
        output: run folder (default ``runs/<data>-<method>-<time>``).
        resume: continue the run in ``output`` from its newest checkpoint.
        on_progress: called after every step with a :class:`Progress`.
        should_stop: polled after every step; True saves a checkpoint and returns.
    """
    from medlatent.augment.views import ViewRecipe, resolve
    from medlatent.nets.backbones import ViTEncoder, build_encoder
    from medlatent.ssl.base import BuildContext
    from medlatent.ssl.registry import get_method

    run = RunDir(Path(output) if output else default_output(config or PretrainConfig()))
    if resume:
        cfg = run.read_config()
    else:
        cfg = dataclasses.replace(config) if config else PretrainConfig()
        if run.exists() or run.has_checkpoint():
            raise ConfigError(f"{run.path}: already holds a run; continue it with --resume or choose another --output")
    spec = get_method(cfg.method)
    options = from_dict(spec.options, cfg.method_options, "method_options")
    cfg.method_options = to_dict(options)

    data = load_dataset(cfg.data)
    images = data.split(cfg.data.split).images
    if data.image_size != cfg.data.size:
        raise DataError(f"{data.source}: images are {data.image_size} px but data.size is {cfg.data.size}")
    device = resolve_device(cfg.train.device)
    dist.init_from_env(device)
    torch.manual_seed(cfg.train.seed)  # weight initialisation
    encoder = build_encoder(cfg.backbone.name, data.channels, cfg.data.size, data.spatial_dims,
                            cfg.backbone.patch_size, cfg.backbone.depth)
    if spec.needs_vit and not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"method {cfg.method} works on patch tokens and needs a ViT backbone "
                          f"(--backbone vit-tiny or vit-small), not {cfg.backbone.name}")
    context = BuildContext(len(images), cfg.train.batch_size, data.image_size, data.channels, data.spatial_dims)
    method = spec.build(encoder, options, context)
    mean, std = channel_stats(images)
    recipe = ViewRecipe(spec.views(resolve(cfg.views, data.name), cfg.data.size, options), mean, std)
    autocast = resolve_precision(cfg.train.precision, device)
    channels_last = resolve_channels_last(cfg.train.channels_last, encoder)

    if dist.is_main():
        run.write_config(cfg)
        run.write_json("data.json", dict(
            name=data.name, source=data.source, task=data.task, class_names=list(data.class_names),
            channels=data.channels, spatial_dims=data.spatial_dims, image_size=data.image_size,
            split=cfg.data.split, n_images=len(images), mean=mean, std=std))
        run.write_json("env.json", environment(dict(
            device=str(device), world_size=dist.world_size(),
            autocast=str(autocast).replace("torch.", "") if autocast else "fp32",
            channels_last=channels_last, resumed=resume)))
    result = fit(method, images, recipe, cfg, run, device, autocast, channels_last, on_progress, should_stop)
    if result.status == "finished" and dist.is_main():
        export_encoder(run, method.encoder, cfg)
    return run.path, result


def export_encoder(run: RunDir, encoder: nn.Module, cfg: PretrainConfig) -> None:
    """Write the final encoder weights (MONAI parameter names) and what is needed to rebuild it."""
    checkpoint.save_tensors(encoder.state_dict(), run.encoder_file,
                            metadata=dict(backbone=cfg.backbone.name, method=cfg.method))


def load_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], int]:
    """The newest encoder of a run: (encoder in eval mode, data.json contents, its step).

    Raises:
        CheckpointError: the folder is not a run, or it has no checkpoint yet.
    """
    from medlatent.nets.backbones import build_encoder

    run = RunDir(Path(run_dir))
    cfg = run.read_config()
    ckpt = checkpoint.latest(run.checkpoints, with_optimizer=False)
    if ckpt is None:
        raise CheckpointError(f"{run.path}: has no checkpoint yet (a run writes its first one at the end of "
                              f"epoch 1); nothing to evaluate")
    meta = run.read_json("data.json")
    encoder = build_encoder(cfg.backbone.name, meta["channels"], meta["image_size"], meta["spatial_dims"],
                            cfg.backbone.patch_size, cfg.backbone.depth)
    weights = {k[len("encoder."):]: v for k, v in ckpt.model.items() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path}: encoder weights do not match {cfg.backbone.name} "
                              f"(missing {len(missing)}, unexpected {len(unexpected)})")
    return encoder.to(device).eval(), meta, ckpt.step


def _probe_data(run: RunDir, data: str | None, data_dir: str | None) -> tuple[Dataset, PretrainConfig]:
    cfg = run.read_config()
    dcfg = dataclasses.replace(cfg.data, name=data or cfg.data.name,
                               data_dir=data_dir if data_dir is not None else cfg.data.data_dir)
    return load_dataset(dcfg), cfg


def _check_channels(encoder: nn.Module, ds: Dataset, run: Path) -> None:
    if encoder.in_channels != ds.channels:
        raise DataError(f"{run}: the encoder takes {encoder.in_channels}-channel images but "
                        f"{ds.source or ds.name} has {ds.channels}-channel images")


def probe(run_dir: str | Path, data: str | None = None, splits: tuple[str, ...] = ("val", "test"),
          label_fractions: tuple[float, ...] = (1.0,), seeds: tuple[int, ...] = (0,), k: int = 20,
          data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """k-NN and linear-probe ACC/AUC of a run's encoder; also written to ``<run>/probe.json``.

    Args:
        run_dir: a run folder with at least one checkpoint.
        data: labelled data to probe on (default: the pretraining data).
        splits: splits to report (the probe's L2 penalty is always chosen on ``val``).
        label_fractions: fractions of the training labels to use (stratified per class).
        seeds: seeds for drawing the label subsets (fractions < 1 only).
        k: neighbours for k-NN.
    """
    from medlatent.eval.features import extract_features
    from medlatent.eval.fractions import label_fraction
    from medlatent.eval.knn import knn_scores
    from medlatent.eval.linear import linear_probe
    from medlatent.eval.metrics import evaluate

    run = RunDir(Path(run_dir))
    dev = resolve_device(device)
    encoder, meta, step = load_encoder(run.path, dev)
    ds, cfg = _probe_data(run, data, data_dir)
    _check_channels(encoder, ds, run.path)
    if ds.task is None:
        raise DataError(f"{ds.source or ds.name}: has no labels; probing needs labelled train and val splits")
    needed = ["train", "val"] + [s for s in splits if s not in ("train", "val")]
    sets = {s: ds.split(s) for s in needed}
    autocast = resolve_precision(cfg.train.precision, dev)
    cl = resolve_channels_last(cfg.train.channels_last, encoder)
    feats = {s: extract_features(encoder, sets[s].images, meta["mean"], meta["std"], dev, autocast,
                                 channels_last=cl) for s in needed}
    multi_label = ds.task == MULTI_LABEL
    n_out = ds.n_classes

    def target(s: str) -> torch.Tensor:
        y = sets[s].labels
        assert y is not None
        return y if multi_label else y[:, 0]

    rows = []
    for fraction in label_fractions:
        for seed in (seeds if fraction < 1 else seeds[:1]):
            idx = label_fraction(sets["train"].labels, fraction, seed, multi_label)
            tx, ty = feats["train"][idx], target("train")[idx]
            lin = linear_probe(tx, ty, feats["val"], target("val"), ds.task, n_out)
            for s in splits:
                y_true = sets[s].labels.numpy()
                knn = knn_scores(tx, ty, feats[s], n_out, multi_label, k=k).numpy()
                rows.append(dict(protocol="knn", split=s, fraction=fraction, seed=seed, n_labels=len(idx),
                                 **evaluate(y_true, knn, ds.task)))
                rows.append(dict(protocol="linear", split=s, fraction=fraction, seed=seed, n_labels=len(idx),
                                 weight_decay=lin.weight_decay,
                                 **evaluate(y_true, lin.scores(feats[s]).numpy(), ds.task)))
    result = dict(run=str(run.path), data=ds.name, task=ds.task, encoder_step=step, k=k,
                  rows=rows, summary=_summarise(rows))
    run.write_json("probe.json", result)
    return result


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each (protocol, split, fraction)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["split"], r["fraction"]), []).append(r)
    out = []
    for (protocol, split, fraction), rs in groups.items():
        entry: dict[str, Any] = dict(protocol=protocol, split=split, fraction=fraction, n_seeds=len(rs))
        for m in ("acc", "auc", "balanced_acc"):
            v = np.array([r[m] for r in rs], dtype=float)
            entry[m], entry[f"{m}_std"] = float(v.mean()), float(v.std())
        out.append(entry)
    return out


def embed(run_dir: str | Path, split: str = "test", out: str | Path | None = None, data: str | None = None,
          data_dir: str | None = None, device: str = "auto") -> Path:
    """Write the encoder's embeddings of one split to an .npz (``embeddings`` (N, D), ``labels``)."""
    from medlatent.eval.features import extract_features

    run = RunDir(Path(run_dir))
    dev = resolve_device(device)
    encoder, meta, step = load_encoder(run.path, dev)
    ds, cfg = _probe_data(run, data, data_dir)
    _check_channels(encoder, ds, run.path)
    s = ds.split(split)
    autocast = resolve_precision(cfg.train.precision, dev)
    feats = extract_features(encoder, s.images, meta["mean"], meta["std"], dev, autocast,
                             channels_last=resolve_channels_last(cfg.train.channels_last, encoder))
    path = Path(out) if out else run.path / f"embeddings-{split}.npz"
    arrays: dict[str, np.ndarray] = dict(embeddings=feats.numpy(), step=np.array(step))
    if s.labels is not None:
        arrays["labels"] = s.labels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_method(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], int]:
    """The whole method of a run (encoder, heads, decoders, teachers) from its newest checkpoint."""
    from medlatent.nets.backbones import build_encoder
    from medlatent.ssl.base import BuildContext
    from medlatent.ssl.registry import get_method

    run = RunDir(Path(run_dir))
    cfg = run.read_config()
    ckpt = checkpoint.latest(run.checkpoints, with_optimizer=False)
    if ckpt is None:
        raise CheckpointError(f"{run.path}: has no checkpoint yet; nothing to show")
    meta = run.read_json("data.json")
    spec = get_method(cfg.method)
    options = from_dict(spec.options, cfg.method_options, "method_options")
    encoder = build_encoder(cfg.backbone.name, meta["channels"], meta["image_size"], meta["spatial_dims"],
                            cfg.backbone.patch_size, cfg.backbone.depth)
    context = BuildContext(meta["n_images"], cfg.train.batch_size, meta["image_size"], meta["channels"],
                           meta["spatial_dims"])
    method = spec.build(encoder, options, context)
    method.load_state_dict(ckpt.model)
    return method.to(device).eval(), meta, ckpt.step


def _figure_inputs(run: RunDir, meta: dict[str, Any], images: list[str] | None, n: int, split: str,
                   data_dir: str | None) -> torch.Tensor:
    """Standardised (B, C, *S) inputs: the given image files, or the first n of a split."""
    from medlatent.augment import ops
    from medlatent.data.store import to_float

    if images:
        from medlatent.data.folders import prepare_image

        cfg = run.read_config()
        arrays = [prepare_image(Path(f), meta["image_size"], meta["spatial_dims"], cfg.data.normalize,
                           (cfg.data.window_center, cfg.data.window_width), (0.5, 99.5)) for f in images]
        x = torch.stack([to_float(torch.from_numpy(a)) for a in arrays])
        if x.shape[1] != meta["channels"]:
            if x.shape[1] == 1:
                x = x.expand(-1, meta["channels"], *x.shape[2:])
            else:
                raise DataError(f"{images[0]}: has {x.shape[1]} channels; the encoder takes {meta['channels']}")
    else:
        ds, _ = _probe_data(run, None, data_dir)
        x = to_float(ds.split(split).images[:n])
    return ops.normalize(x, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))


def attention(run_dir: str | Path, images: list[str] | None = None, n: int = 8, split: str = "test",
              out: str | Path | None = None, data_dir: str | None = None) -> Path:
    """DINO-style attention maps of a ViT encoder: last-layer CLS attention per head, over the
    input. Writes a PNG (default ``<run>/attention.png``)."""
    from medlatent.nets.backbones import ViTEncoder
    from medlatent.report.figures import attention_figure

    run = RunDir(Path(run_dir))
    encoder, meta, _ = load_encoder(run.path)
    if not isinstance(encoder, ViTEncoder) or encoder.spatial_dims != 2:
        raise ConfigError(f"{run.path}: attention maps need a 2-D ViT encoder; this run's backbone is "
                          f"{run.read_config().backbone.name}")
    x = _figure_inputs(run, meta, images, n, split, data_dir)
    return attention_figure(x, encoder.last_attention(x), meta["mean"], meta["std"],
                            Path(out) if out else run.path / "attention.png")


def reconstruct(run_dir: str | Path, n: int = 8, split: str = "test", out: str | Path | None = None,
                seed: int = 0, data_dir: str | None = None) -> Path:
    """MAE reconstructions: input / masked input / reconstruction, as a PNG (default
    ``<run>/reconstruction.png``)."""
    from medlatent.report.figures import reconstruction_figure
    from medlatent.ssl.mae import MAE

    run = RunDir(Path(run_dir))
    method, meta, _ = load_method(run.path)
    if not isinstance(method, MAE):
        raise ConfigError(f"{run.path}: reconstructions need an MAE run; this run's method is "
                          f"{run.read_config().method}")
    x = _figure_inputs(run, meta, None, n, split, data_dir)
    torch.manual_seed(seed)
    masked, recon = method.reconstruct(x)
    return reconstruction_figure(x, masked, recon, meta["mean"], meta["std"],
                                 Path(out) if out else run.path / "reconstruction.png")


__all__ = ["pretrain", "probe", "embed", "load_encoder", "load_method", "attention", "reconstruct",
           "PretrainConfig", "DataConfig", "FitResult"]
