"""Evaluating a run: load its encoder and labelled data once, then any protocol on cached features.

:class:`RunEvaluation` is what ``medlatent probe``, ``efficiency``, ``map``, ``retrieve``,
``report`` and ``embed`` share: the encoder of the newest checkpoint, the labelled data set
(the pretraining data unless another is named), features per split computed once, and the
protocols (k-NN, linear probe, fine-tuning, LP-FT, FixMatch, supervised baseline, maps, retrieval)
as methods.
Every result is written into the run folder as JSON or PNG.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlatent.config import PretrainConfig
from medlatent.methods.saved import load_encoder
from medlatent.data.catalogue import MULTI_LABEL
from medlatent.data.mixture import with_channels
from medlatent.data.sources import load_dataset, source_config
from medlatent.data.store import Dataset, ImageSet, label_columns, save_csv, save_npz, save_parquet
from medlatent.errors import ConfigError, DataError
from medlatent.eval.features import extract_features
from medlatent.config import check_ranges
from medlatent.eval.finetune import FinetuneConfig, finetune, probe_head, tune
from medlatent.eval.fractions import label_fraction
from medlatent.eval.knn import knn_scores
from medlatent.eval.linear import linear_probe
from medlatent.eval.maps import MapPoints, map_points
from medlatent.eval.metrics import confusion, evaluate
from medlatent.eval.semi import SemiConfig, fixmatch
from medlatent.train.precision import resolve_channels_last, resolve_device, resolve_precision
from medlatent.train.runs import RunDir


# Label-efficiency protocols, in table order: frozen probes, trained from the pretrained encoder,
# trained from random weights (the baselines' initialisation), and FixMatch from each.
PROTOCOLS = ("knn", "linear", "finetune", "lpft", "supervised", "semi", "semi-scratch")
FROZEN = frozenset({"knn", "linear"})
FROM_SCRATCH = frozenset({"supervised", "semi-scratch"})


def check_protocols(protocols: tuple[str, ...]) -> None:
    """Raises ConfigError naming every unknown protocol and the known ones."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ConfigError(f"unknown protocol(s) {', '.join(sorted(unknown))} (known: {', '.join(PROTOCOLS)})")


def check_settings(protocols: tuple[str, ...], cfg: FinetuneConfig, semi: SemiConfig | None = None) -> None:
    """Everything label efficiency can refuse before a run is loaded: protocol names and the
    ranges of the fine-tuning and FixMatch settings (``finetune.lr_grid: ...``, ``semi.tau: ...``).

    Raises:
        ConfigError: one line naming the protocol or key.
    """
    check_protocols(protocols)
    check_ranges(cfg, "finetune")
    if semi is not None:
        check_ranges(semi, "semi")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each (protocol, split, fraction)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["split"], r["fraction"]), []).append(r)
    out = []
    for (protocol, split, fraction), rs in groups.items():
        entry: dict[str, Any] = dict(protocol=protocol, split=split, fraction=fraction, n_seeds=len(rs),
                                     n_labels=rs[0].get("n_labels"))
        for m in ("acc", "auc", "balanced_acc"):
            v = np.array([r[m] for r in rs], dtype=float)
            entry[m], entry[f"{m}_std"] = float(v.mean()), float(v.std())
        out.append(entry)
    return out


# ------------------------------------------------------------------------------ the session


class RunEvaluation:
    """A run's encoder and labelled data, with features computed once per split.

    Args:
        run_dir: a run folder with at least one checkpoint.
        data: labelled data to evaluate on (default: the pretraining data; a mixture run needs
            one data set named, e.g. one of its sources). 1-channel data are read as 3 channels
            for an RGB encoder (the mixture's rule); standardisation is the run's ``data.json``.
        data_dir: data folder override.
        device: auto, cpu, cuda ...
        need_labels: raise unless the data have labels.
    """

    def __init__(self, run_dir: str | Path, data: str | None = None, data_dir: str | None = None,
                 device: str = "auto", need_labels: bool = True) -> None:
        self.run = RunDir(Path(run_dir))
        self.device = resolve_device(device)
        self.encoder, self.meta, self.step = load_encoder(self.run.path, self.device)
        self.cfg: PretrainConfig = self.run.read_config()
        mixture = self.cfg.data.mixture
        if data is None and mixture and need_labels:
            raise ConfigError(f"{self.run.path}: was pretrained on a mixture ({', '.join(mixture)}) whose labels "
                              f"are not one label space; evaluate on one source with --data (e.g. --data "
                              f"{mixture[0]})")
        dcfg = dataclasses.replace(self.cfg.data, data_dir=data_dir if data_dir is not None else self.cfg.data.data_dir)
        if data is not None:
            dcfg = source_config(dcfg, data)
        self.data: Dataset = load_dataset(dcfg)
        if self.data.channels == 1 and self.encoder.in_channels == 3:
            self.data = with_channels(self.data, 3)  # gray read as RGB, as a mixture's gray sources were
        if self.encoder.in_channels != self.data.channels:
            raise DataError(f"{self.run.path}: the encoder takes {self.encoder.in_channels}-channel images but "
                            f"{self.data.source or self.data.name} has {self.data.channels}-channel images")
        if need_labels and self.data.task is None:
            raise DataError(f"{self.data.source or self.data.name}: has no labels; this needs labelled train "
                            f"and val splits")
        # A mixture run evaluated on one source writes probe-<source>.json (and so on), so the
        # results of its sources sit side by side instead of replacing one another.
        self.suffix = f"-{self.data.name}" if mixture and data is not None else ""
        self.task = self.data.task
        self.multi_label = self.task == MULTI_LABEL
        self.autocast = resolve_precision(self.cfg.train.precision, self.device)
        self.channels_last = resolve_channels_last(self.cfg.train.channels_last, self.encoder)
        self._features: dict[str, torch.Tensor] = {}
        self._labelled: dict[str, ImageSet] = {}
        self.need_labels = need_labels

    @property
    def mean(self) -> list[float]:
        return self.meta["mean"]

    @property
    def std(self) -> list[float]:
        return self.meta["std"]

    def split(self, name: str) -> ImageSet:
        """A split's images; only its labelled ones when labels are needed (a store may hold
        unlabelled images too)."""
        if name not in self._labelled:
            whole = self.data.split(name)
            self._labelled[name] = whole.labelled() if self.need_labels else whole
        return self._labelled[name]

    def features(self, split: str) -> torch.Tensor:
        """(N, D) frozen features of a split, computed once."""
        if split not in self._features:
            self._features[split] = extract_features(self.encoder, self.split(split).images, self.mean, self.std,
                                                     self.device, self.autocast, channels_last=self.channels_last)
        return self._features[split]

    def target(self, split: str) -> torch.Tensor:
        """Labels as the probes want them: (N,) class indices, or (N, L) for multi-label."""
        y = self.split(split).labels
        assert y is not None
        return y if self.multi_label else y[:, 0]

    # -------------------------------------------------------------------- protocols

    def frozen_rows(self, fraction: float, seed: int, splits: tuple[str, ...], k: int = 20) -> list[dict]:
        """k-NN and linear probe on a label subset of the frozen training features."""
        idx = label_fraction(self.split("train").labels, fraction, seed, self.multi_label)
        tx, ty = self.features("train")[idx], self.target("train")[idx]
        n_out = self.data.n_classes
        lin = linear_probe(tx, ty, self.features("val"), self.target("val"), self.task, n_out)
        rows = []
        for s in splits:
            y_true = self.split(s).labels.numpy()
            knn = knn_scores(tx, ty, self.features(s), n_out, self.multi_label, k=k).numpy()
            common = dict(split=s, fraction=fraction, seed=seed, n_labels=len(idx))
            rows.append(dict(protocol="knn", **common, **evaluate(y_true, knn, self.task)))
            rows.append(dict(protocol="linear", weight_decay=lin.weight_decay, **common,
                             **evaluate(y_true, lin.scores(self.features(s)).numpy(), self.task)))
        return rows

    def trained_rows(self, fraction: float, seed: int, splits: tuple[str, ...], cfg: FinetuneConfig,
                     protocol: str = "finetune", on_metrics: Any = None, semi: SemiConfig | None = None) -> list[dict]:
        """One trained protocol on a label subset, its learning rate chosen on val
        (:func:`~medlatent.eval.finetune.tune`), evaluated at its best val step.

        Protocols: ``finetune`` (the pretrained encoder + a linear head), ``lpft`` (the same,
        the head first fitted as a linear probe on the frozen features: Kumar et al. 2022),
        ``supervised`` (the same architecture from random weights), ``semi`` / ``semi-scratch``
        (FixMatch with the rest of the train split unlabelled, from the pretrained encoder / from
        random weights: :mod:`medlatent.eval.semi`). Rows carry the chosen ``lr`` and
        ``encoder_lr_scale``, ``steps``, and ``search`` (each candidate's short-budget val result).

        ``on_metrics(record)``: the final training's record at every validation (step, loss, lr,
        val_*), then one at the last step with each split's metrics of the best model (``test_acc``, ...)."""
        from medlatent.eval.features import predict_scores
        from medlatent.nets.backbones import build_backbone

        trained = [p for p in PROTOCOLS if p not in FROZEN]
        if protocol not in trained:
            raise ConfigError(f"{protocol!r} is not a trained protocol (trained: {', '.join(trained)})")
        train = self.split("train")
        idx = label_fraction(train.labels, fraction, seed, self.multi_label)
        scratch = protocol in FROM_SCRATCH
        if scratch:
            torch.manual_seed(seed)
            encoder = build_backbone(self.cfg.backbone, self.data.channels, self.meta["image_size"], self.meta["spatial_dims"])
        else:
            encoder = self.encoder
        common = dict(task=self.task, n_outputs=self.data.n_classes, mean=self.mean, std=self.std,
                      data_name=self.data.name, device=self.device, seed=seed, autocast_dtype=self.autocast,
                      channels_last=self.channels_last)
        extra: dict[str, Any] = {}
        head = None
        if protocol == "lpft":  # LP-FT step 1: the linear probe on frozen features, the head's start
            probe = linear_probe(self.features("train")[idx], self.target("train")[idx], self.features("val"),
                                 self.target("val"), self.task, self.data.n_classes)
            head, extra = probe_head(probe, cfg.feature_norm), dict(weight_decay=probe.weight_decay)
        if protocol in ("semi", "semi-scratch"):
            semi = semi or SemiConfig()
            pool, rows_of = train, idx
            whole = self.data.split("train")  # a store's unlabelled rows (label -1) are FixMatch's too
            if self.need_labels and whole.labels is not None and not bool((whole.labels[:, 0] >= 0).all()):
                pool, rows_of = whole, (whole.labels[:, 0] >= 0).nonzero()[:, 0][idx]

            def train_fn(c: FinetuneConfig, scale: float, report: Any) -> Any:
                return fixmatch(encoder, pool, rows_of, self.split("val"), cfg=c, semi=semi, encoder_lr_scale=scale,
                                on_metrics=report, **common)
        else:
            labelled = train.subset(idx)

            def train_fn(c: FinetuneConfig, scale: float, report: Any) -> Any:
                return finetune(encoder, labelled, self.split("val"), cfg=c, encoder_lr_scale=scale,
                                on_metrics=report, head=head, **common)

        tuned = tune(train_fn, cfg, 1.0 if scratch else cfg.encoder_lr_scale, on_metrics)
        rows = []
        for s in splits:
            scores = predict_scores(tuned.model, self.split(s).images, self.mean, self.std, self.device,
                                    self.multi_label, self.autocast, self.channels_last)
            rows.append(dict(protocol=protocol, split=s, fraction=fraction, seed=seed, n_labels=len(idx),
                             steps=tuned.steps, lr=tuned.chosen.lr, encoder_lr_scale=tuned.chosen.encoder_lr_scale,
                             **extra, **evaluate(self.split(s).labels.numpy(), scores, self.task),
                             search=tuned.search))
        if on_metrics is not None:
            on_metrics(dict(step=tuned.steps, **{f"{r['split']}_{m}": r[m] for r in rows
                                                 for m in ("acc", "auc", "balanced_acc") if m in r}))
        return rows

    def probe(self, splits: tuple[str, ...] = ("val", "test"), fractions: tuple[float, ...] = (1.0,),
              seeds: tuple[int, ...] = (0,), k: int = 20) -> dict[str, Any]:
        """k-NN and linear probe; written to ``<run>/probe.json`` (a mixture run's source:
        ``probe-<source>.json``; ``result["file"]``)."""
        rows = [r for f in fractions for seed in (seeds if f < 1 else seeds[:1])
                for r in self.frozen_rows(f, seed, splits, k)]
        result = dict(run=str(self.run.path), data=self.data.name, task=self.task, encoder_step=self.step, k=k,
                      rows=rows, summary=summarise(rows))
        result["file"] = str(self.run.path / f"probe{self.suffix}.json")
        self.run.write_json(f"probe{self.suffix}.json", result)
        return result

    def label_efficiency(self, fractions: tuple[float, ...] = (0.01, 0.1, 0.25, 1.0), seeds: tuple[int, ...] = (0, 1, 2),
                         protocols: tuple[str, ...] = ("knn", "linear", "finetune", "supervised"),
                         cfg: FinetuneConfig | None = None, splits: tuple[str, ...] = ("test",),
                         progress: Any = None, on_metrics: Any = None, semi: SemiConfig | None = None) -> dict[str, Any]:
        """Every protocol (:data:`PROTOCOLS`) at every label fraction and seed; mean and std over
        seeds. Written to ``<run>/label_efficiency.json`` (a mixture run's source:
        ``label_efficiency-<source>.json``). ``cfg``: the trained protocols' budget and
        learning-rate grid; ``semi``: FixMatch's settings (``semi``, ``semi-scratch``).

        ``on_metrics(prefix, record)``: the records of each trained protocol's final training
        (see :meth:`trained_rows`), with ``prefix`` ``"<protocol>/<fraction>/seed<seed>/"``
        (``"finetune/0.1/seed0/"``)."""
        cfg = cfg or FinetuneConfig()
        semi = semi or SemiConfig()
        check_settings(protocols, cfg, semi)
        if self.multi_label and set(protocols) & {"semi", "semi-scratch"}:
            raise ConfigError(f"{self.data.name}: semi-supervised learning (FixMatch) needs one class per image; "
                              f"this task is {self.task}")
        rows = []
        for fraction in fractions:
            for seed in seeds if fraction < 1 else seeds[:1]:  # all labels: one subset, one run
                if {"knn", "linear"} & set(protocols):
                    rows += [r for r in self.frozen_rows(fraction, seed, splits) if r["protocol"] in protocols]
                for name in PROTOCOLS:
                    if name in protocols and name not in FROZEN:
                        prefix = f"{name}/{fraction:g}/seed{seed}/"
                        report = None if on_metrics is None else (
                            lambda record, prefix=prefix: on_metrics(prefix, record))
                        rows += self.trained_rows(fraction, seed, splits, cfg, name, report, semi)
                if progress is not None:
                    progress(fraction, seed)
        summary = summarise(rows)
        result = dict(run=str(self.run.path), data=self.data.name, task=self.task, encoder_step=self.step,
                      fractions=list(fractions), seeds=list(seeds), finetune=dataclasses.asdict(cfg),
                      **(dict(semi=dataclasses.asdict(semi)) if set(protocols) & {"semi", "semi-scratch"} else {}),
                      rows=rows, summary=summary, crossover=crossover(summary))
        result["file"] = str(self.run.path / f"label_efficiency{self.suffix}.json")
        self.run.write_json(f"label_efficiency{self.suffix}.json", result)
        return result

    def embed(self, split: str = "test", out: str | Path | None = None) -> Path:
        """The split's embeddings with their ids, for the user's own analysis.

        Writes ``<run>/embeddings-<split>.npz`` (or ``out``) with ``embeddings`` (N, D),
        ``index`` (N,) (row i is image i of the split), ``labels`` (N, L) when labelled,
        ``source`` (N,) (each image's file) when the images came from files, and ``step``; and
        the same rows beside it as a CSV (``index``, ``source``, ``label`` or one ``label_<name>``
        per finding, ``d0`` ... ``d<D-1>``), plus Parquet when pyarrow is installed.
        Returns the .npz path.
        """
        path = Path(out) if out else self.run.path / f"embeddings-{split}.npz"
        if path.suffix == ".csv":
            path = path.with_suffix(".npz")
        images = self.split(split)
        features = self.features(split).float().numpy()
        index = np.arange(len(features))
        arrays: dict[str, np.ndarray] = dict(embeddings=features, index=index, step=np.array(self.step))
        columns: dict[str, Any] = dict(index=index)
        if images.sources is not None:
            arrays["source"] = np.array(images.sources, dtype=str)
            columns["source"] = list(images.sources)
        if images.labels is not None:
            arrays["labels"] = images.labels.numpy()
        columns.update(label_columns(images.labels, self.data.class_names))
        columns.update({f"d{j}": features[:, j] for j in range(features.shape[1])})
        save_csv(path.with_suffix(".csv"), columns)
        save_parquet(path.with_suffix(".parquet"), columns)
        return save_npz(path, arrays)

    def display(self, split: str, index: torch.Tensor | list[int]) -> list[np.ndarray]:
        """Images of a split as (H, W[, 3]) arrays in [0, 1] for figures (3-D: middle slice)."""
        from medlatent.eval.maps import display_images

        return display_images(self.split(split).images[torch.as_tensor(index)])

    def embedding_map(self, split: str = "test", max_points: int = 2000, n_thumbs: int = 12,
                      seed: int = 0) -> tuple[MapPoints, str]:
        """2-D map of a split's embeddings with thumbnails, and its title (drawn by ``report``)."""
        points = map_points(self.features(split), self.split(split).labels, self.split(split).images, max_points,
                            n_thumbs, seed)
        return points, f"{self.data.name} {split}: {self.cfg.method} embedding, step {self.step}"

    def retrieval(self, split: str = "test", gallery: str = "train", k: int = 8, n_queries: int = 6,
                  ks: tuple[int, ...] = (1, 5, 10), seed: int = 0) -> dict[str, Any]:
        """precision@k over the whole split, and the nearest ``gallery`` images of a few queries
        (``queries``: images; ``neighbours``: k images each; ``relevant``: same class or not)."""
        from medlatent.eval.retrieval import nearest, precision_at_k

        q_labels, g_labels = self.split(split).labels, self.split(gallery).labels
        nb, _ = nearest(self.features(split), self.features(gallery), max(max(ks), k))
        precision = {f"precision@{kk}": precision_at_k(q_labels, g_labels, nb[:, :kk]) for kk in ks}
        queries = torch.randperm(len(nb), generator=torch.Generator().manual_seed(seed))[:n_queries]
        relevant = [[bool(precision_at_k(q_labels[i:i + 1], g_labels, nb[i:i + 1, j:j + 1]) > 0) for j in range(k)]
                    for i in queries.tolist()]
        return dict(split=split, gallery=gallery, **precision, queries=self.display(split, queries),
                    neighbours=[self.display(gallery, nb[i, :k]) for i in queries], relevant=relevant,
                    title=f"{self.data.name}: nearest {gallery} images of {split} queries (green: same class)")

    def confusion_matrix(self, split: str = "test") -> dict[str, Any] | None:
        """Row-normalised confusion matrix of the linear probe (all training labels) on a split
        (None for multi-label tasks)."""
        if self.multi_label:
            return None
        lin = linear_probe(self.features("train"), self.target("train"), self.features("val"), self.target("val"),
                           self.task, self.data.n_classes)
        matrix = confusion(self.split(split).labels.numpy(), lin.scores(self.features(split)).numpy(), self.task,
                           self.data.n_classes)
        return dict(matrix=matrix, class_names=list(self.data.class_names),
                    title=f"{self.data.name} {split}: linear probe")


def crossover(summary: list[dict]) -> dict[str, Any]:
    """Where each self-supervised (or semi-supervised) protocol wins, ties and loses against training from scratch
    (the ``supervised`` protocol) on test ACC, per label fraction both have.

    Returns protocol -> None when there is no supervised baseline, else
    ``dict(wins=[...], ties=[...], losses=[...])``, each a list, by fraction, of
    ``dict(fraction=f, margin_points=100 * (ACC - supervised ACC))``. A protocol can win at 1 %
    and lose at 10 %, so there is no single "from this fraction on".
    """
    base = {r["fraction"]: r["acc"] for r in summary if r["protocol"] == "supervised" and r["split"] == "test"}
    out: dict[str, Any] = {}
    present = {r["protocol"] for r in summary}
    for protocol in ("knn", "linear", "finetune", *(p for p in ("lpft", "semi", "semi-scratch") if p in present)):
        if not base:
            out[protocol] = None
            continue
        rows = sorted((r for r in summary if r["protocol"] == protocol and r["split"] == "test"
                       and r["fraction"] in base), key=lambda r: r["fraction"])
        c: dict[str, list[dict]] = dict(wins=[], ties=[], losses=[])
        for r in rows:
            margin = 100 * (r["acc"] - base[r["fraction"]])
            key = "ties" if abs(margin) < 1e-9 else "wins" if margin > 0 else "losses"
            c[key].append(dict(fraction=r["fraction"], margin_points=margin))
        out[protocol] = c
    return out


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def crossover_words(c: dict[str, list[dict]]) -> str:
    """One protocol's ``crossover`` entry in words: ``wins at 1% (+2.1 points), loses at 10%
    (-0.8), 25% (-1.0)``; ``never wins: ...`` when it wins at no fraction."""
    parts, unit = [], " points"  # the unit once, on the first margin
    for verb, key in (("wins", "wins"), ("ties", "ties"), ("loses", "losses")):
        items = []
        for x in c[key]:
            if key == "ties":
                items.append(_percent(x["fraction"]))
            else:
                items.append(f"{_percent(x['fraction'])} ({x['margin_points']:+.1f}{unit})")
                unit = ""
        if items:
            parts.append(f"{verb} at {', '.join(items)}")
    text = ", ".join(parts) or "no common label fraction"
    return text if c["wins"] or not parts else f"never wins: {text}"
