"""Sampling a generative run to files, and judging the samples.

Features come from a *domain encoder*: a ResNet-18/4 classifier trained on the real training
split with labels (cached per data set), whose penultimate features replace Inception's. The
same classifier's protocol gives train-on-real-test-on-real (TRTR) and, trained on samples
instead, train-on-synthetic-test-on-real (TSTR). The augmentation experiment
(:func:`augment_experiment`) adds samples to a label fraction; by default each fraction's
generator is trained with that fraction's labels only (:class:`AugmentConfig`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn as nn

from medlatent.config import bounded
from medlatent.train.checkpoint import save_tensors, write_json_atomic
from medlatent.data.store import Dataset, ImageSet, save_npz
from medlatent.errors import ConfigError
from medlatent.eval.features import extract_features, predict_scores
from medlatent.eval.finetune import Classifier, FinetuneConfig, finetune
from medlatent.eval.fractions import label_fraction
from medlatent.eval.metrics import evaluate
from medlatent.generative.metrics import frechet_distance, memorisation, precision_recall

DOMAIN_BACKBONE = "resnet18-quarter"
_log = logging.getLogger("medlatent")


@torch.no_grad()
def sample_images(method: nn.Module, n: int, shape: tuple[int, ...], n_classes: int, class_index: int | None = None,
                  guidance: float = 1.0, steps: int = 50, seed: int = 0, batch: int = 250,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """n samples as uint8 (N, C, *S), their class labels (N, 1) (class-balanced, or all
    ``class_index``; None when unconditional), and samples per second."""
    if class_index is not None and not n_classes:
        raise ConfigError("--class: this model is unconditional (train it with --conditional)")
    if class_index is not None and not 0 <= class_index < n_classes:
        raise ConfigError(f"--class {class_index}: the model knows classes 0..{n_classes - 1}")
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    labels = None
    if n_classes:
        labels = torch.full((n,), class_index) if class_index is not None else torch.arange(n) % n_classes
    out, t0 = [], time.perf_counter()
    for start in range(0, n, batch):
        y = labels[start:start + batch] if labels is not None else None
        k = min(batch, n - start)
        x = method.generate(k, shape, y, steps=steps, guidance=guidance, generator=g)  # [-1, 1]
        out.append(((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    rate = n / max(time.perf_counter() - t0, 1e-9)
    return torch.cat(out), None if labels is None else labels[:, None], rate


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """MedMNIST layout (``train_images`` (N, H, W[, 3]) uint8, ``train_labels`` (N, 1)), so the
    samples feed ``--data`` of every other command; written atomically."""
    x = images.numpy()
    x = x[:, 0] if x.shape[1] == 1 else np.moveaxis(x, 1, -1)
    arrays = {"train_images": x}
    if labels is not None:
        arrays["train_labels"] = labels.numpy().astype(np.int64)
    return save_npz(path, arrays, compress=True)


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDLATENT_CACHE", Path.home() / ".cache" / "medlatent")) / "domain"


def train_classifier(train: ImageSet, data: Dataset, mean: list[float], std: list[float], device: torch.device,
                     epochs: int, seed: int = 0, min_steps: int = 300) -> Classifier:
    """ResNet-18/4 from scratch on ``train`` with early stopping on the real val split."""
    from medlatent.nets.backbones import build_encoder

    torch.manual_seed(seed)
    encoder = build_encoder(DOMAIN_BACKBONE, data.channels, data.image_size, data.spatial_dims)
    model, _, _ = finetune(encoder, train, data.split("val"), data.task, data.n_classes, mean, std, data.name,
                           FinetuneConfig(epochs=epochs, min_steps=min_steps), device, seed, encoder_lr_scale=1.0)
    return model


def data_digest(data: Dataset, splits: tuple[str, ...] = ("train", "val")) -> str:
    """SHA-256 (first 16 hex digits) of the splits a domain classifier learns from: the shape,
    dtype and raw bytes of each split's images and labels. Two files with the same name but other
    images get other digests; the same images read again get the same one (~1 s per GB)."""
    import hashlib

    h = hashlib.sha256()
    for split in splits:
        part = data.split(split)
        for t in (part.images, part.labels):
            if t is None:
                h.update(f"{split}|none|".encode())
                continue
            a = np.ascontiguousarray(t.detach().cpu().numpy())
            h.update(f"{split}|{a.dtype}|{a.shape}|".encode())
            h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:16]


def domain_classifier(data: Dataset, mean: list[float], std: list[float], device: torch.device,
                      epochs: int = 15, min_steps: int = 300) -> tuple[Classifier, str]:
    """The supervised classifier on the real training split, trained once per data set and cached
    (``$MEDLATENT_CACHE/domain``, default ``~/.cache/medlatent/domain``), keyed by the content of
    the train and val splits (``data_digest``), so two ``data.npz`` files never share one, and by
    the training recipe (epochs, minimum steps, early stopping's ``patience_fraction``)."""
    from safetensors.torch import load_file

    wait = FinetuneConfig().patience_fraction
    name = (f"{Path(data.name).name}-{data_digest(data)}-{DOMAIN_BACKBONE}-{data.image_size}px"
            f"-e{epochs}-s{min_steps}-p{wait:g}")
    path = _cache_dir() / f"{name}.safetensors"
    if path.is_file():
        from medlatent.nets.backbones import build_encoder

        model = Classifier(build_encoder(DOMAIN_BACKBONE, data.channels, data.image_size, data.spatial_dims),
                           data.n_classes)
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval(), name
    model = train_classifier(data.split("train"), data, mean, std, device, epochs, 0, min_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), path)
    return model, name


def _accuracy(model: Classifier, data: Dataset, mean: list[float], std: list[float], device: torch.device) -> dict:
    test = data.split("test")
    return evaluate(test.labels.numpy(), predict_scores(model, test.images, mean, std, device, False), data.task)


def judge(samples: ImageSet, data: Dataset, device: torch.device, classifier_epochs: int = 15,
          seed: int = 0, min_steps: int = 300) -> dict[str, Any]:
    """Frechet distance, precision/recall, memorisation, and (labelled samples) TSTR vs TRTR.

    Real references: the test split for the distribution metrics (never trained on by the
    generator), the training split for memorisation.
    """
    mean, std = [0.5] * data.channels, [0.5] * data.channels
    clf, clf_name = domain_classifier(data, mean, std, device, classifier_epochs, min_steps)
    feats = {k: extract_features(clf.encoder, imgs, mean, std, device)
             for k, imgs in (("samples", samples.images), ("train", data.split("train").images),
                             ("test", data.split("test").images))}
    mem = memorisation(feats["train"], feats["samples"], feats["test"])
    test_ratio = memorisation(feats["train"], feats["test"], feats["test"])["ratio"]
    result: dict[str, Any] = dict(
        domain_encoder=f"{clf_name} (supervised on the real train split; penultimate features)",
        n_samples=len(samples), frechet_distance=frechet_distance(feats["test"], feats["samples"]),
        frechet_distance_train_vs_test=frechet_distance(feats["test"], feats["train"]),
        **precision_recall(feats["test"], feats["samples"]),
        memorisation=dict(share_below_half=mem["share_below"], median_ratio=float(mem["ratio"].median())),
        trtr_full=_accuracy(clf, data, mean, std, device))
    if samples.labels is not None:
        # TSTR: trained and early-stopped on samples only (90 / 10), tested on real test images.
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        cut = max(1, len(samples) // 10)
        synth_data = Dataset(data.name, data.task, data.class_names,
                             {"train": samples.subset(order[cut:]), "val": samples.subset(order[:cut]),
                              "test": data.split("test")}, data.source)
        tstr = train_classifier(synth_data.split("train"), synth_data, mean, std, device, classifier_epochs, seed,
                                min_steps)
        idx = label_fraction(data.split("train").labels, min(1.0, len(samples) / len(data.split("train"))), seed)
        trtr = train_classifier(data.split("train").subset(idx), data, mean, std, device, classifier_epochs, seed,
                                min_steps)
        result.update(tstr=_accuracy(tstr, data, mean, std, device), trtr_same_n=_accuracy(trtr, data, mean, std, device),
                      trtr_same_n_images=len(idx))
        result["tstr_over_trtr"] = result["tstr"]["acc"] / result["trtr_same_n"]["acc"]
    result["_memorisation"] = (mem, test_ratio)  # for the figure; not written to JSON
    return result


# ------------------------------------------------------------------------------ a run's samples


def load_generator(run_dir: str | Path, device: str = "auto") -> tuple[nn.Module, dict[str, Any], int, Any]:
    """(model in eval mode, data.json, step, run config) of a generative run."""
    from medlatent.methods.saved import load_method
    from medlatent.methods.registry import GENERATIVE
    from medlatent.train.precision import resolve_device
    from medlatent.train.runs import RunDir

    cfg = RunDir(Path(run_dir)).read_config()
    if cfg.method not in GENERATIVE:
        raise ConfigError(f"{run_dir}: a {cfg.method} run is not a generative model "
                          f"(train one with medlatent generate train --method {'|'.join(GENERATIVE)})")
    model, meta, step = load_method(run_dir, resolve_device(device))
    return model, meta, step, cfg


def _shape(meta: dict[str, Any]) -> tuple[int, ...]:
    return (meta["channels"], *(meta["image_size"],) * meta["spatial_dims"])


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    write_json_atomic(path, obj)
    return path


def sample_run(run_dir: str | Path, n: int = 1000, class_index: int | None = None, guidance: float = 1.0,
               steps: int = 50, seed: int = 0, out: str | Path | None = None, device: str = "auto",
               loaded: tuple | None = None) -> dict[str, Any]:
    """Write n samples (npz in MedMNIST layout) and a per-class grid PNG into the run folder.
    ``loaded``: the result of :func:`load_generator`, to avoid loading twice."""
    from medlatent.eval.maps import display_images
    from medlatent.report.figures import sample_grid_figure

    model, meta, step, cfg = loaded or load_generator(run_dir, device)
    k = meta.get("condition_classes", 0)
    dev = next(model.parameters()).device
    images, labels, rate = sample_images(model, n, _shape(meta), k, class_index, guidance, steps, seed, device=dev)
    tag = f"samples-{cfg.method}" + (f"-class{class_index}" if class_index is not None else "") + f"-g{guidance:g}"
    path = save_samples(Path(out) if out else Path(run_dir) / f"{tag}.npz", images, labels)
    names = meta["class_names"] if k else ["samples"]
    rows = ([display_images(images[(labels[:, 0] == c)][:10]) for c in range(k)] if k
            else [display_images(images[i:i + 10]) for i in range(0, min(len(images), 50), 10)])
    row_names = names if k else [""] * len(rows)
    keep = [i for i, r in enumerate(rows) if r]
    grid = sample_grid_figure([rows[i] for i in keep], [row_names[i] for i in keep],
                              f"{cfg.method} on {meta['name']} (step {step}, guidance {guidance:g})",
                              path.with_suffix(".png"))
    return dict(samples=str(path), grid=str(grid), n=n, samples_per_s=rate, step=step)


def judge_run(run_dir: str | Path, n: int = 1000, guidance: float = 1.0, steps: int = 50, seed: int = 0,
                 classifier_epochs: int = 15, data_dir: str | None = None, device: str = "auto",
                 min_steps: int = 300) -> dict[str, Any]:
    """Sample n images and judge them against the run's data; writes ``generation_eval.json``,
    ``memorisation.png`` and the per-class grid into the run folder."""
    import dataclasses

    from medlatent.data.sources import load_dataset
    from medlatent.eval.maps import display_images
    from medlatent.report.figures import memorisation_figure

    loaded = load_generator(run_dir, device)
    model, meta, step, cfg = loaded
    dev = next(model.parameters()).device
    data = load_dataset(dataclasses.replace(cfg.data, data_dir=data_dir if data_dir is not None else cfg.data.data_dir)).labelled()
    if data.task is None or data.task.startswith("multi-label"):
        raise ConfigError(f"{data.source or data.name}: judging samples needs single-label train/val/test splits")
    sampled = sample_run(run_dir, n, None, guidance, steps, seed, Path(run_dir) / "samples-eval.npz", device, loaded)
    from medlatent.data.medmnist import load_npz

    synth = load_npz(sampled["samples"]).split("train")
    result = judge(synth, data, dev, classifier_epochs, seed, min_steps)
    mem, test_ratio = result.pop("_memorisation")
    closest = mem["ratio"].argsort()[:6]
    train_imgs = data.split("train").images
    pairs = [(display_images(synth.images[i:i + 1])[0], display_images(train_imgs[mem["nearest"][i]:mem["nearest"][i] + 1])[0],
              float(mem["ratio"][i])) for i in closest.tolist()]
    fig = memorisation_figure(pairs, mem["ratio"].numpy(), test_ratio.numpy(),
                              f"{cfg.method} on {data.name}: closest samples to training images",
                              Path(run_dir) / "memorisation.png")
    result.update(model=cfg.method, data=data.name, step=step, guidance=guidance, sampler_steps=steps,
                  samples_per_s=sampled["samples_per_s"], grid=sampled["grid"], memorisation_figure=str(fig),
                  conditional=bool(meta.get("condition_classes", 0)))
    _write_json(Path(run_dir) / "generation_eval.json", result)
    return result


# ----------------------------------------------------------------- synthetic images as training data

AUGMENT_PROTOCOLS = ("fraction", "all-labels")

# (fraction, seed, optimiser steps) -> the folder of a generator run that trained on the train
# split's images with only that fraction's labels (``api.synthetic_augmentation`` trains it).
TrainGenerator = Callable[[float, int, int], Path]


@dataclass
class AugmentConfig:
    """The synthetic-augmentation experiment (``generate augment``): a classifier trained on a
    label fraction alone, and on the fraction plus a class-conditional generator's samples.

    Protocols:

    * ``"fraction"`` (the default, leak-free): the user's real setting. For each label fraction
      and seed, a generator is trained with the given run's config (method, options, optimiser)
      on the unlabelled train images and only the labels of that fraction, drawn by
      :func:`medlatent.eval.fractions.label_fraction` with the classifier's seed (so the two see
      the same labels; ``data.label_fraction``/``data.label_seed`` of the generator run). DDPM
      and latent diffusion train every other train image as the null class of classifier-free
      guidance (Ho & Salimans 2022), the unconditional model they learn anyway; the GAN and VAE
      have no null class and train on the labelled images alone.
    * ``"all-labels"``: the given run's own samples, as the command did before: that generator
      learned from every label of the train split, labels a user with a fraction does not have.
      It leaks labels; kept only to reproduce old numbers, and its rows say so.
    """

    protocol: Literal["fraction", "all-labels"] = "fraction"
    # The label fractions (MedMNIST's label-efficiency points where synthetic images could matter).
    fractions: tuple[float, ...] = bounded((0.01, 0.1), gt=0, le=1)
    # Seeds of the labelled subsets, classifiers and (fraction protocol) generators; the spread
    # over 3 seeds is what a gain must beat.
    seeds: tuple[int, ...] = bounded((0, 1, 2), ge=0)
    # Samples added to the real fraction, class-balanced (2,000: 250 per BloodMNIST class, 17x
    # the 1 % fraction, so they can matter).
    n_synthetic: int = bounded(2000, ge=1)
    # Classifier-free guidance scale of ddpm/ldm sampling (1: the conditional model alone).
    guidance: float = bounded(1.0, ge=0)
    # DDIM steps of ddpm/ldm sampling (50: close to the 1,000-step chain at a twentieth of the cost).
    sampler_steps: int = bounded(50, ge=1)
    # The ResNet-18/4 classifier's budget (early stopping on the real val split).
    classifier_epochs: int = bounded(15, ge=1)
    classifier_min_steps: int = bounded(300, ge=0)
    # Fraction protocol: optimiser steps of each generator; None: as many as the given run
    # trained, so a generator gets the training its config was made for.
    generator_steps: int | None = bounded(None, ge=1)
    # Fraction protocol: wall-clock cap per generator, in seconds (0: none). 600 s is the small
    # end of the CPU budgets in docs/generative.md (5-20 min per model); the default experiment
    # trains 2 fractions x 3 seeds = 6 generators, about an hour. The schedule still spans
    # generator_steps, so a capped generator is a truncated run.
    generator_budget_s: float = bounded(600.0, ge=0)

    def check(self, where: str = "augment") -> None:
        if not self.fractions or not self.seeds:
            raise ConfigError(f"{where}: needs at least one label fraction and one seed")


def _labels_seen(meta: dict[str, Any]) -> int:
    """Labels a generator run trained with (runs before ``labels_seen``: every training image's)."""
    seen = meta.get("labels_seen")
    return int(seen) if seen is not None else int(meta["n_images"])


def augment_experiment(run_dir: str | Path, cfg: AugmentConfig, data_dir: str | None = None, device: str = "auto",
                       train_generator: TrainGenerator | None = None) -> dict[str, Any]:
    """A classifier on a labelled fraction alone vs the fraction plus class-conditional samples
    (real val for early stopping, real test for the score); the gain's mean and std over seeds.

    Args:
        run_dir: a class-conditional generative run: the generator itself (``"all-labels"``), or
            the config every fraction's generator is trained with (``"fraction"``).
        cfg: protocol, fractions, seeds and budgets (:class:`AugmentConfig`).
        train_generator: trains the generator of one fraction and seed (``"fraction"``).

    Returns:
        ``rows`` (one per fraction, seed and training, with ``protocol``, ``labels_seen`` (labels
        the generator trained with), ``leaks_labels`` and the generator's folder), ``summary``
        (mean and std per fraction and training) and ``gains`` (real + synthetic minus real only,
        paired by seed: mean, std, and whether the mean exceeds two std); written to
        ``<run>/synthetic_augmentation-<protocol>.json`` (``file``).

    Raises:
        ConfigError: an unconditional run, or a generator that saw other labels than the
            classifier's fraction.
    """
    import dataclasses

    from medlatent.config import check_ranges
    from medlatent.data.sources import load_dataset

    check_ranges(cfg, "augment")
    if cfg.protocol == "fraction" and train_generator is None:
        raise ValueError("the fraction protocol needs train_generator (api.synthetic_augmentation passes it)")
    model, meta, step, run_cfg = load_generator(run_dir, device)
    if not meta.get("condition_classes", 0):
        raise ConfigError(f"{run_dir}: synthetic augmentation needs a class-conditional model (--conditional)")
    dev = next(model.parameters()).device
    data = load_dataset(dataclasses.replace(run_cfg.data, data_dir=data_dir if data_dir is not None
                                            else run_cfg.data.data_dir)).labelled()
    train = data.split("train")
    mean, std = [0.5] * data.channels, [0.5] * data.channels
    generator_steps = cfg.generator_steps or max(1, step)
    shared = None
    if cfg.protocol == "all-labels":
        images, labels, _ = sample_images(model, cfg.n_synthetic, _shape(meta), meta["condition_classes"], None,
                                          cfg.guidance, cfg.sampler_steps, 0, device=dev)
        shared = (ImageSet(images, labels), Path(run_dir), step, _labels_seen(meta))
        _log.warning(f"--protocol all-labels: the generator {run_dir} trained with {_labels_seen(meta)} labels, "
                     f"more than the classifiers' fractions have: these numbers leak labels (kept to reproduce "
                     f"old results; --protocol fraction is the user's real setting)")
    del model
    rows = []
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            idx = label_fraction(train.labels, fraction, seed)  # the classifier's labelled subset
            real = train.subset(idx)
            synth, gen_dir, gen_step, seen = shared or _fraction_samples(train_generator, fraction, seed,
                                                                         generator_steps, len(idx), cfg, dev)
            mixed = ImageSet(torch.cat([real.images, synth.images]), torch.cat([real.labels, synth.labels]))
            for name, subset in (("real only", real), ("real + synthetic", mixed)):
                clf = train_classifier(subset, data, mean, std, dev, cfg.classifier_epochs, seed,
                                       cfg.classifier_min_steps)
                rows.append(dict(protocol=cfg.protocol, fraction=fraction, seed=seed, training=name, n_real=len(idx),
                                 n_synthetic=len(synth) if name != "real only" else 0, labels_seen=seen,
                                 leaks_labels=seen > len(idx), generator=str(gen_dir), generator_step=gen_step,
                                 **_accuracy(clf, data, mean, std, dev)))
    result = dict(model=run_cfg.method, data=data.name, step=step, protocol=cfg.protocol,
                  leaks_labels=any(r["leaks_labels"] for r in rows), n_synthetic=cfg.n_synthetic,
                  guidance=cfg.guidance, generator_steps=generator_steps if cfg.protocol == "fraction" else None,
                  generator_budget_s=cfg.generator_budget_s if cfg.protocol == "fraction" else None,
                  rows=rows, summary=_augment_summary(rows, cfg), gains=_augment_gains(rows, cfg))
    path = _write_json(Path(run_dir) / f"synthetic_augmentation-{cfg.protocol}.json", result)
    return dict(result, file=str(path))


def _fraction_samples(train_generator: TrainGenerator, fraction: float, seed: int, steps: int, n_labels: int,
                      cfg: AugmentConfig, device: torch.device) -> tuple[ImageSet, Path, int, int]:
    """Samples of the generator trained on this fraction's labels: (samples, its run folder, its
    step, labels it saw), after checking it saw as many labels as the classifier's fraction holds."""
    gen_dir = train_generator(fraction, seed, steps)
    model, meta, step, _ = load_generator(gen_dir, device)
    seen = _labels_seen(meta)
    if meta.get("label_fraction") != fraction or meta.get("label_seed") != seed or seen != n_labels:
        raise ConfigError(f"{gen_dir}: this generator trained with {seen} labels (data.label_fraction "
                          f"{meta.get('label_fraction')}, seed {meta.get('label_seed')}), not the {n_labels} of the "
                          f"classifier's {fraction:g} fraction with seed {seed}; remove the folder to train it again")
    images, labels, _ = sample_images(model, cfg.n_synthetic, _shape(meta), meta["condition_classes"], None,
                                      cfg.guidance, cfg.sampler_steps, seed, device=device)
    return ImageSet(images, labels), Path(gen_dir), step, seen


def _augment_summary(rows: list[dict[str, Any]], cfg: AugmentConfig) -> list[dict[str, Any]]:
    """Mean and std (over seeds) of test ACC/AUC per fraction and training."""
    summary = []
    for fraction in cfg.fractions:
        for name in ("real only", "real + synthetic"):
            mine = [r for r in rows if r["fraction"] == fraction and r["training"] == name]
            acc, auc = np.array([r["acc"] for r in mine]), np.array([r["auc"] for r in mine])
            summary.append(dict(protocol=cfg.protocol, fraction=fraction, training=name, acc=float(acc.mean()),
                                acc_std=float(acc.std()), auc=float(auc.mean()), auc_std=float(auc.std()),
                                n_seeds=len(acc), labels_seen=[r["labels_seen"] for r in mine],
                                leaks_labels=any(r["leaks_labels"] for r in mine)))
    return summary


def _augment_gains(rows: list[dict[str, Any]], cfg: AugmentConfig) -> list[dict[str, Any]]:
    """Per fraction: (real + synthetic) - (real only), paired by seed (same labelled subset and
    classifier seed), its mean and std over seeds (numpy's, ddof 0, as the summary's), and
    whether the mean gain exceeds two std (the issue's target)."""
    gains = []
    for fraction in cfg.fractions:
        pick = {(r["seed"], r["training"]): r for r in rows if r["fraction"] == fraction}
        entry: dict[str, Any] = dict(protocol=cfg.protocol, fraction=fraction, n_seeds=len(cfg.seeds))
        for m in ("acc", "auc"):
            d = np.array([pick[(s, "real + synthetic")][m] - pick[(s, "real only")][m] for s in cfg.seeds])
            entry[f"{m}_gain"], entry[f"{m}_gain_std"] = float(d.mean()), float(d.std())
        entry["gain_over_two_std"] = bool(entry["acc_gain"] > 2 * entry["acc_gain_std"])
        entry["labels_seen"] = [pick[(s, "real only")]["labels_seen"] for s in cfg.seeds]
        entry["leaks_labels"] = any(pick[(s, "real only")]["leaks_labels"] for s in cfg.seeds)
        gains.append(entry)
    return gains
