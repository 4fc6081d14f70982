"""The Python API: pretrain an encoder, load it back, probe it, embed images.

These functions wire data -> views -> method -> loop -> evaluation; the CLI is a thin layer
over them. Example::

    from medlatent import PretrainConfig, pretrain, probe
    cfg = PretrainConfig()                      # SimCLR, quarter-width ResNet-18, BloodMNIST 28 px
    cfg.train.epochs = 30
    run = pretrain(cfg, output="runs/blood-simclr")
    print(probe(run)["summary"])                # k-NN and linear probe ACC/AUC on val and test
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from medlatent import dist
from medlatent.adapt.strategies import AdaptConfig
from medlatent.config import DataConfig, PretrainConfig, check_ranges, from_dict, to_dict
from medlatent.data.sources import describe_data, load_dataset
from medlatent.data.store import Dataset, channel_stats
from medlatent.errors import ConfigError, DataError
from medlatent.eval.finetune import FinetuneConfig
from medlatent.eval.semi import SemiConfig
from medlatent.eval.session import PROTOCOLS, RunEvaluation, check_settings, crossover_words
from medlatent.methods.registry import resolve_config
from medlatent.methods.saved import LoadedEncoder, load_method, open_encoder, read_config
from medlatent.train import checkpoint, trackers
from medlatent.train.loop import FitResult, Progress, fit
from medlatent.train.precision import resolve_channels_last, resolve_device, resolve_precision, trunk
from medlatent.train.runs import RunDir, environment

_log = logging.getLogger("medlatent")


def default_output(cfg: PretrainConfig) -> Path:
    """``runs/<data>-<method>-<time>``; a mixture is named by its first source and how many
    others follow (``bloodmnist+3``)."""
    first = cfg.data.mixture[0] if cfg.data.mixture else cfg.data.name
    name = Path(first).stem if first.endswith(".npz") else Path(first).name
    if cfg.data.mixture:
        name += f"+{len(cfg.data.mixture) - 1}"
    return Path("runs") / f"{name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_views(views: Any, data: Dataset) -> Any:
    """The run's view config with its data-dependent defaults filled in
    (:func:`medlatent.augment.views.resolve`: vflip, rot90, color_jitter, grayscale).

    A mixture's rule: a data-dependent default is the one its sources agree on (all
    orientation-free: flips and 90-degree rotations on; all colour-is-class: colour jitter and
    grayscale off); where they differ, the generic default (a data set in neither list: no
    vertical flips or rotations, SimCLR's colour jitter 0.8 and grayscale 0.2). Values the user
    set are kept as given.
    """
    from medlatent.augment.views import resolve

    if not data.parts:
        return resolve(views, data.name)
    each = [resolve(views, part.name) for part in data.parts]
    generic = resolve(views, "")  # no data set's own defaults
    agreed = {}
    for f in ("vflip", "rot90", "color_jitter", "grayscale"):
        values = {getattr(v, f) for v in each}
        agreed[f] = values.pop() if len(values) == 1 else getattr(generic, f)
    return dataclasses.replace(generic, **agreed)


def make_config(tree: Mapping[str, Any] | None = None, where: str = "config") -> PretrainConfig:
    """A run's config from a mapping (as a YAML file holds it), with the method's own training
    defaults under the given keys: ``make_config({"method": "gan"})`` is the config that
    ``medlatent generate train --method gan`` trains. Keys, types and ranges are checked."""
    return resolve_config(tree, where)


def generative_models() -> list[str]:
    """The registered generative models (``medlatent generate train --method NAME``)."""
    from medlatent.methods.registry import GENERATIVE

    return list(GENERATIVE)


def is_generative(method: str) -> bool:
    """Whether ``method`` is a generative model (its runs sample images rather than export an encoder)."""
    return method in generative_models()


def pretrain(config: PretrainConfig | Mapping[str, Any] | None = None, output: str | Path | None = None,
             resume: bool = False, on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Path:
    """Train a run of any family (self-supervised, generative, restoration, anomaly detector);
    returns the run folder (see :func:`run_pretraining`)."""
    return run_pretraining(config, output, resume, on_progress, should_stop)[0]


# Flags that may accompany --resume: they change where and for how long the run goes on, never
# what it computes. Every other key comes from the run's own config.yaml.
RESUME_OVERRIDES = ("train.device", "train.time_budget_s")


def run_pretraining(config: PretrainConfig | Mapping[str, Any] | None = None, output: str | Path | None = None,
                    resume: bool = False,
                    on_progress: Callable[[Progress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    overrides: dict[str, Any] | None = None) -> tuple[Path, FitResult]:
    """Train a run of any family (an encoder without labels, a generative model, a restorer, an
    anomaly detector); returns the run folder and how training ended.

    Everything that can be checked is checked before the run folder is created (config ranges,
    data, batch size against the split, memory), so a refused run leaves nothing behind. The
    folder is then owned by this process (an OS lock) until training ends; a run that fails
    before its first checkpoint removes what it wrote.

    Args:
        config: the run's configuration (default: SimCLR on BloodMNIST): a
            :class:`PretrainConfig` is used exactly as given; a mapping gets the method's own
            training defaults first (:func:`make_config`). Ignored on resume, where the run
            folder's own config is used.
        output: run folder (default ``runs/<data>-<method>-<time>``).
        resume: continue the run in ``output`` from its newest intact checkpoint.
        on_progress: called after every step with a :class:`Progress`.
        should_stop: polled after every step; True saves a checkpoint and returns.
        overrides: on resume only, new values for the keys in :data:`RESUME_OVERRIDES`
            (e.g. ``{"train.device": "cuda"}``).

    Raises:
        ConfigError, DataError: the run was refused (nothing written).
        RunInUse: another process is training in ``output``.
    """
    if isinstance(config, Mapping) and not resume:
        config = make_config(config)
    run = RunDir(Path(output) if output else default_output(config or PretrainConfig()))
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"{run.path}: is a file; --output must be a run folder")
    main = dist.launched_rank() == 0  # under torchrun, rank 0 owns the folder for all ranks
    if resume:
        run.read_config()  # not a run folder: one line, and no folder or lock file is created
        if main:
            run.check_not_in_use()
        with run.lock() if main else contextlib.nullcontext():
            cfg = _with_overrides(read_config(run), overrides or {})
            trackers.require(cfg.train.log)
            return run.path, _train(run, cfg, True, on_progress, should_stop)
    if overrides:
        raise ConfigError("overrides apply to a resumed run only")
    cfg = dataclasses.replace(config) if config else PretrainConfig()
    check_ranges(cfg)
    trackers.require(cfg.train.log)  # a tracker's missing package: refused before anything is written
    if main:
        run.check_not_in_use()
        _refuse_used(run)
    created = not run.path.exists()
    plan = _plan(cfg)  # reads the data and builds the model: nothing is written yet
    if not main:
        return run.path, _train(run, cfg, False, on_progress, should_stop, plan)
    with run.lock():
        _refuse_used(run)  # another process may have started a run here meanwhile
        try:
            return run.path, _train(run, cfg, False, on_progress, should_stop, plan)
        except BaseException:
            if not run.has_checkpoint():
                _remove_unstarted(run, created)
            raise


def _refuse_used(run: RunDir) -> None:
    if run.exists() or run.has_checkpoint():
        raise ConfigError(f"{run.path}: already holds a run; continue it with --resume or choose another --output")


def _with_overrides(cfg: PretrainConfig, overrides: dict[str, Any]) -> PretrainConfig:
    """``cfg`` with the resume-safe keys replaced; any other key is refused by name."""
    for key, value in overrides.items():
        if key not in RESUME_OVERRIDES:
            raise ConfigError(f"{key}: cannot change on --resume (it would change the run); only "
                              f"{', '.join(RESUME_OVERRIDES)} can")
        section, name = key.split(".")
        tree = to_dict(getattr(cfg, section))
        tree[name] = value
        setattr(cfg, section, from_dict(type(getattr(cfg, section)), tree, section))
    return cfg


def _remove_unstarted(run: RunDir, created: bool) -> None:
    """Undo what a run wrote before it failed without a checkpoint, so ``--output`` can be reused."""
    import shutil

    if created:
        shutil.rmtree(run.path, ignore_errors=True)
        return
    for name in ("config.yaml", "data.json", "env.json", "metrics.jsonl", "mlflow_run.json", ".lock"):
        (run.path / name).unlink(missing_ok=True)
    for name in ("checkpoints", "maps", "tensorboard", "mlruns"):
        shutil.rmtree(run.path / name, ignore_errors=True)


@dataclasses.dataclass
class _Plan:
    """What a run trains: the method, its images and views, where and how."""

    spec: Any
    data: Dataset
    images: torch.Tensor  # (N, C, *S) the training split
    labels: torch.Tensor | None  # (N,) class labels for class-conditional models (n_classes: the null class)
    method: nn.Module
    recipe: Any
    mean: list[float]
    std: list[float]
    n_classes: int
    device: torch.device
    labels_seen: int | None = None  # how many real class labels the model trains with (None: no labels)


def _plan(cfg: PretrainConfig, resume: bool = False) -> _Plan:
    """Resolve and check everything a run needs, writing nothing: method options, data, the
    training split, the model, the views, and whether it all fits in memory."""
    from medlatent.augment.views import ViewRecipe
    from medlatent.data.sources import estimate_store_bytes
    from medlatent.nets.backbones import ENCODERS, VIT_ENCODERS, build_backbone
    from medlatent.methods.contract import BuildContext
    from medlatent.methods.registry import get_method
    from medlatent.train import memory

    spec = get_method(cfg.method)
    if cfg.backbone.name not in ENCODERS:  # before reading any data
        raise ConfigError(f"backbone.name: unknown encoder '{cfg.backbone.name}' (known: {', '.join(ENCODERS)})")
    if spec.needs_vit and cfg.backbone.name not in VIT_ENCODERS:
        raise ConfigError(f"method {cfg.method} works on patch tokens and needs a ViT backbone "
                          f"(--backbone {' or '.join(VIT_ENCODERS)}), not {cfg.backbone.name}")
    options = from_dict(spec.options, cfg.method_options, "method_options")
    cfg.method_options = to_dict(options)
    device = resolve_device(cfg.train.device)
    store = estimate_store_bytes(cfg.data)
    if store is not None:
        memory.require(store[0], f"{cfg.data.name}: loading the images ({store[1]})", device,
                       "choose a smaller --size or fewer images")

    data = load_dataset(cfg.data)
    train_split = data.split(cfg.data.split)
    if cfg.data.classes is not None:  # e.g. normal images only, for anomaly detection
        if train_split.labels is None:
            raise DataError(f"{data.source or data.name}: data.classes needs labelled images")
        keep = torch.isin(train_split.labels[:, 0], torch.tensor(cfg.data.classes))
        if not keep.any():
            raise DataError(f"{data.source or data.name}: no {cfg.data.split} images of classes {cfg.data.classes}")
        train_split = train_split.subset(keep.nonzero()[:, 0])
    images = train_split.images
    if cfg.data.size is not None and data.image_size != cfg.data.size:
        raise DataError(f"{data.source}: images are {data.image_size} px but data.size is {cfg.data.size}")
    cfg.data.size = data.image_size  # the run records the side it used
    if cfg.data.mixture:
        cfg.data.name = cfg.data.mixture[0]  # what older readers of data.name see: the first source
    _log.info(describe_data(data, cfg.data.split, len(images)))
    if len(images) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the {len(images)} "
                          f"{cfg.data.split} images of {data.source or data.name}; lower --batch-size")
    dist.init_from_env(device)
    torch.manual_seed(cfg.train.seed)  # weight initialisation
    encoder = build_backbone(cfg.backbone, data.channels, cfg.data.size, data.spatial_dims)
    if cfg.backbone.init and not resume:  # before the method is built: heads and teachers start from these weights
        from medlatent.adapt.external import init_encoder

        _log.info(f"init: {cfg.backbone.init}: {init_encoder(encoder, cfg.backbone.init).summary()}")
    labels = None
    if spec.uses_labels and getattr(options, "conditional", False) and data.task is not None \
            and not data.task.startswith("multi-label"):
        labels = train_split.labels[:, 0]
        if cfg.data.label_fraction is not None:
            images, labels = _labels_of_fraction(train_split, cfg.data, data.n_classes, spec.trains_unlabelled)
            if len(images) < cfg.train.batch_size:
                raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the {len(images)} "
                                  f"labelled images of data.label_fraction {cfg.data.label_fraction:g} (a {cfg.method} "
                                  f"trains on labelled images only); lower --batch-size")
        elif bool((labels < 0).any()):
            raise DataError(f"{data.source or data.name}: {int((labels < 0).sum())} {cfg.data.split} images have "
                            "no label; a class-conditional model needs every image labelled (or give "
                            "data.label_fraction to train the ddpm/ldm null class on the unlabelled ones)")
    n_classes = data.n_classes if labels is not None else 0
    labels_seen = int((labels < n_classes).sum()) if labels is not None else None
    context = BuildContext(len(images), cfg.train.batch_size, data.image_size, data.channels, data.spatial_dims,
                           n_classes)
    method = spec.build(encoder, options, context)
    if spec.pixel_range == "symmetric":  # (x - 0.5) / 0.5: images in [-1, 1]
        mean, std = [0.5] * data.channels, [0.5] * data.channels
    elif spec.pixel_range == "unit":  # images as they are, in [0, 1]
        mean, std = [0.0] * data.channels, [1.0] * data.channels
    elif data.stats is not None and cfg.data.classes is None and cfg.data.split == "train":
        mean, std = data.stats  # computed once when the store was prepared
    else:
        mean, std = channel_stats(images)
    recipe = ViewRecipe(spec.views(resolve_views(cfg.views, data), cfg.data.size, options), mean, std)
    if cfg.train.map_every and not hasattr(method, "encoder"):
        raise ConfigError(f"train.map_every: {cfg.method} has no encoder whose embeddings could be mapped")
    per_rank = cfg.train.batch_size // dist.world_size()
    need = memory.step_bytes(method, encoder, data.channels, [size for _, size in recipe.views],
                             data.spatial_dims, per_rank)
    memory.require(need, f"one training step ({cfg.backbone.name}, batch {per_rank}, {len(recipe.views)} views "
                         f"of up to {max(size for _, size in recipe.views)} px)", device,
                   "lower --batch-size or --size")
    return _Plan(spec, data, images, labels, method, recipe, mean, std, n_classes, device, labels_seen)


def _labels_of_fraction(split: Any, data: DataConfig, n_classes: int, null_class: bool) -> tuple[Any, torch.Tensor]:
    """The images and labels a class-conditional generator trains on when only
    ``data.label_fraction`` of the labels are known.

    The fraction is drawn exactly as the classifiers of every label-efficiency protocol draw
    theirs (:func:`medlatent.eval.fractions.label_fraction` over the split's labelled images,
    seed ``data.label_seed``), so a generator and a classifier of the same fraction and seed see
    the same labels. With ``null_class`` (classifier-free guidance, Ho & Salimans 2022) every
    other image, and every image a store holds without a label (-1), keeps its place with the
    null label ``n_classes``; without it only the labelled images are kept.

    Args:
        split: the training split (an ``ImageSet``): images (N, C, *S), labels (N, 1), -1 where unlabelled.

    Returns:
        images (N, C, *S) and labels (N,) in 0..n_classes (null_class), or the M labelled
        images (M, C, *S) and their labels (M,) in 0..n_classes-1.
    """
    from medlatent.eval.fractions import label_fraction

    labels = split.labels[:, 0]
    known = (labels >= 0).nonzero()[:, 0]  # positions of the labelled images, in split order
    chosen = known[label_fraction(labels[known], data.label_fraction, data.label_seed)]  # (M,)
    if not null_class:
        return split.subset(chosen).images, labels[chosen]
    seen = torch.full_like(labels, n_classes)  # the null class
    seen[chosen] = labels[chosen]
    return split.images, seen


def _train(run: RunDir, cfg: PretrainConfig, resume: bool, on_progress: Callable[[Progress], None] | None,
           should_stop: Callable[[], bool] | None, plan: _Plan | None = None) -> FitResult:
    """Write the run's config and facts, train, export the encoder when finished, and leave the
    process group the run joined (under torchrun)."""
    plan = plan or _plan(cfg, resume)  # a resumed run's weights come from its checkpoint
    data, method, device = plan.data, plan.method, plan.device
    autocast = resolve_precision(cfg.train.precision, device)
    channels_last = resolve_channels_last(cfg.train.channels_last, trunk(method))
    # Recorded, so a run resumed on another number of processes draws the same views.
    cfg.train.view_shards = cfg.train.view_shards or dist.world_size()
    if dist.is_main():
        run.write_config(cfg)
        run.write_json("data.json", dict(
            name=data.name, source=data.source, task=data.task, class_names=list(data.class_names),
            channels=data.channels, spatial_dims=data.spatial_dims, image_size=data.image_size,
            split=cfg.data.split, n_images=len(plan.images), mean=plan.mean, std=plan.std,
            condition_classes=plan.n_classes, labels_seen=plan.labels_seen,
            label_fraction=cfg.data.label_fraction if plan.labels is not None else None,
            label_seed=cfg.data.label_seed if plan.labels is not None and cfg.data.label_fraction else None,
            **_mixture_facts(data, plan.images)))
        run.write_json("env.json", environment(dict(
            device=str(device), world_size=dist.world_size(),
            autocast=str(autocast).replace("torch.", "") if autocast else "fp32",
            channels_last=channels_last, resumed=resume)))
    # TensorBoard / MLflow beside metrics.jsonl (main process only; nothing when train.log is empty)
    tracked = trackers.Trackers.open(cfg.train.log, run.path, to_dict(cfg), run.path.name,
                                     f"{cfg.data.name}-{cfg.method}")
    try:
        on_epoch_end = None
        if cfg.train.map_every and dist.is_main():
            on_epoch_end = _map_during_training(method.encoder, data, cfg, plan.mean, plan.std, device, run, tracked)
            if not run.has_checkpoint():
                on_epoch_end(0, 0)  # the map before any training
        result = fit(method, plan.images, plan.recipe, cfg, run, device, autocast, channels_last, on_progress,
                     should_stop, on_epoch_end, plan.labels, tracked)
        if result.status == "finished" and dist.is_main() and plan.spec.exports_encoder:
            export_encoder(run, method.encoder, cfg, result.step)
        if tracked:
            _track_final(tracked, run, cfg, result)
    except BaseException:
        tracked.close("FAILED")
        raise
    tracked.close("FINISHED" if result.status == "finished" else "KILLED")
    dist.leave()  # every rank, after rank 0 has exported: the group this run joined ends here
    return result


def _mixture_facts(data: Dataset, images: Any) -> dict[str, Any]:
    """For a mixture's data.json: each source's name, file, training images, channels (as
    stored) and share of the batches; nothing for one data set."""
    if not data.parts:
        return {}
    shares = images.shares or [n / len(images) for n in images.sizes]
    return dict(mixture=[dict(name=p.name, source=p.source, n_images=n, channels=p.channels, share=share,
                              weighted=images.shares is not None)
                         for p, n, share in zip(data.parts, images.sizes, shares)])


def _track_final(tracked: trackers.Trackers, run: RunDir, cfg: PretrainConfig, result: FitResult) -> None:
    """The final metrics and the training-curve figure, to the run's trackers."""
    from medlatent.report.figures import training_curves_figure

    records = run.read_metrics()
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and "step" in r]
    final = dict(steps=result.step, total_steps=result.total_steps, wall_s=result.wall_s)
    if losses:
        final["loss"] = losses[-1]
    tracked.log_final(final, result.step)
    curves = training_curves_figure(records, f"{cfg.method} on {cfg.data.name}", run.path / "training_curves.png")
    tracked.log_figure(curves, "training_curves", result.step)


def _map_during_training(encoder: nn.Module, data: Dataset, cfg: PretrainConfig, mean: list[float],
                         std: list[float], device: torch.device, run: RunDir,
                         tracked: trackers.Trackers | None = None) -> Callable[[int, int], None]:
    """Embedding maps of the val split (or the training split when there is none) every
    ``train.map_every`` epochs, into ``<run>/maps/`` (and to the run's trackers)."""
    from medlatent.eval.maps import MapPoints, map_callback
    from medlatent.report.figures import draw_embedding_map

    split = "val" if "val" in data.splits and cfg.data.split != "val" else cfg.data.split
    images = data.split(split)
    labels, names = images.labels, list(data.class_names)
    if data.parts:  # a mixture: points coloured by their source
        labels, names = images.images.source_ids()[:, None], [p.name for p in data.parts]

    def draw(points: MapPoints, epoch: int, step: int) -> None:
        png = run.path / "maps" / f"epoch-{epoch:04d}.png"
        draw_embedding_map(points, names, f"{data.name} {split}: {cfg.method}, epoch {epoch} (step {step})", png)
        if tracked:
            tracked.log_figure(png, f"maps/epoch-{epoch:04d}", step)

    callback = map_callback(images.images, labels, mean, std, device, cfg.train.map_every, draw)
    return lambda epoch, step: callback(encoder, epoch, step)


def export_encoder(run: RunDir, encoder: nn.Module, cfg: PretrainConfig, step: int) -> None:
    """Write the final encoder weights (MONAI parameter names) and what is needed to rebuild it;
    evaluation falls back to this file when the checkpoints have been deleted."""
    checkpoint.save_tensors(encoder.state_dict(), run.encoder_file,
                            metadata=dict(backbone=cfg.backbone.name, method=cfg.method, step=str(step)))
    run.write_json("encoder_step.json", dict(step=step))


def probe(run_dir: str | Path, data: str | None = None, splits: tuple[str, ...] = ("val", "test"),
          label_fractions: tuple[float, ...] = (1.0,), seeds: tuple[int, ...] = (0,), k: int = 20,
          data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """k-NN and linear-probe ACC/AUC of a run's encoder; also written to ``<run>/probe.json``
    (``result["file"]``; a mixture run probed on one source: ``<run>/probe-<source>.json``).

    Args:
        run_dir: a run folder with at least one checkpoint.
        data: labelled data to probe on (default: the pretraining data; a run pretrained on a
            mixture needs one named, e.g. ``"pneumoniamnist"``: its sources' labels are not one
            label space). 1-channel data are read as 3 channels for an RGB encoder.
        splits: splits to report (the probe's L2 penalty is always chosen on ``val``).
        label_fractions: fractions of the training labels to use (stratified per class).
        seeds: seeds for drawing the label subsets (fractions < 1 only).
        k: neighbours for k-NN.
    """
    return RunEvaluation(run_dir, data, data_dir, device).probe(splits, label_fractions, seeds, k)


def label_efficiency(run_dir: str | Path, fractions: tuple[float, ...] = (0.01, 0.1, 0.25, 1.0),
                     seeds: tuple[int, ...] = (0, 1, 2),
                     protocols: tuple[str, ...] = ("knn", "linear", "finetune", "supervised"),
                     finetune: FinetuneConfig | None = None, data: str | None = None, data_dir: str | None = None,
                     device: str = "auto", progress: Callable[[float, int], None] | None = None,
                     log: tuple[str, ...] = (),
                     on_metrics: Callable[[str, dict[str, Any]], None] | None = None,
                     semi: SemiConfig | None = None) -> dict[str, Any]:
    """Label-efficiency curves: every protocol at every fraction of the training labels, several
    seeds; ``<run>/label_efficiency.json`` and ``.png`` (a mixture run evaluated on one source
    with ``data``: ``label_efficiency-<source>.*``). See :class:`RunEvaluation`.

    ``protocols``: any of ``PROTOCOLS``: ``knn``, ``linear`` (frozen), ``finetune``, ``lpft``
    (linear probe, then fine-tuning from it), ``supervised`` (from scratch), ``semi`` /
    ``semi-scratch`` (FixMatch from the pretrained encoder / from scratch). ``finetune``: the
    trained protocols' budget and learning-rate grid (chosen on val; docs/evaluation.md);
    ``semi``: FixMatch's tau, lambda_u and mu.

    ``log``: experiment trackers (``"tensorboard"``, ``"mlflow"``) of the run folder
    (``<run>/tensorboard``, ``<run>/mlruns``; MLflow: the run folder's MLflow run from
    ``<run>/mlflow_run.json``, else a new one named ``label-efficiency``) get every fine-tuning
    and supervised training's validation records under ``<protocol>/<fraction>/seed<seed>/``
    (``finetune/0.1/seed0/loss``), the settings as ``efficiency.*`` parameters, and the summary
    as ``final/<protocol>/<fraction>/test_acc`` (``_auc``, ``_balanced_acc``) at the encoder's step.
    ``on_metrics(prefix, record)`` receives the same records.

    Raises:
        ConfigError: an unknown protocol or tracker, a tracker whose package is missing, a
            setting out of range (before anything runs).
    """
    log = tuple(dict.fromkeys(log))
    cfg = finetune or FinetuneConfig()
    semi = semi or SemiConfig()
    check_settings(protocols, cfg, semi)  # refused before the encoder is loaded or anything is trained
    trackers.require(log)
    ev = RunEvaluation(run_dir, data, data_dir, device)
    opened: list[trackers.Trackers] = []

    def tracked() -> trackers.Trackers:  # opened at the first record: a refused protocol opens nothing
        if not opened:
            opened.append(trackers.Trackers.open(log, ev.run.path, dict(efficiency=dict(
                data=ev.data.name, encoder_step=ev.step, fractions=list(fractions), seeds=list(seeds),
                protocols=list(protocols), finetune=dataclasses.asdict(cfg),
                **(dict(semi=dataclasses.asdict(semi)) if {"semi", "semi-scratch"} & set(protocols) else {}))),
                "label-efficiency"))
        return opened[0]

    def report(prefix: str, record: dict[str, Any]) -> None:
        tracked().log_metrics(record, prefix=prefix)
        if on_metrics is not None:
            on_metrics(prefix, record)

    status = "FAILED"
    try:
        result = ev.label_efficiency(fractions, seeds, protocols, cfg, progress=progress,
                                     on_metrics=report if log or on_metrics is not None else None, semi=semi)
        if log:
            tracked().log_final({f"{r['protocol']}/{r['fraction']:g}/{r['split']}_{m}": r[m]
                                 for r in result["summary"] for m in ("acc", "auc", "balanced_acc")}, ev.step)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for t in opened:
            t.close(status)
    _draw_efficiency(ev, result)
    return result


def _draw_efficiency(ev: RunEvaluation, result: dict[str, Any]) -> Path:
    from medlatent.report.figures import efficiency_figure

    return efficiency_figure(result["summary"], f"{ev.data.name}: {ev.cfg.method} encoder vs training from scratch",
                             ev.run.path / f"label_efficiency{ev.suffix}.png")


def _draw_map(ev: RunEvaluation, split: str, max_points: int = 2000, out: str | Path | None = None) -> Path:
    """The map's PNG, and its points beside it as a CSV (``index`` in the split, ``x``, ``y``,
    ``label`` or ``label_<name>`` per finding, ``source`` when the images came from files)."""
    from medlatent.data.store import label_columns, save_csv
    from medlatent.report.figures import draw_embedding_map

    points, title = ev.embedding_map(split, max_points)
    png = draw_embedding_map(points, list(ev.data.class_names), title,
                             Path(out) if out else ev.run.path / f"embedding_map_{split}.png")
    images = ev.split(split)
    index = torch.as_tensor(points.index)
    columns: dict[str, Any] = dict(index=points.index, x=points.coords[:, 0], y=points.coords[:, 1])
    columns.update(label_columns(None if images.labels is None else images.labels[index], ev.data.class_names))
    if images.sources is not None:
        columns["source"] = [images.sources[i] for i in index.tolist()]
    save_csv(png.with_suffix(".csv"), columns)
    return png


def _draw_retrieval(ev: RunEvaluation, k: int = 8, queries: int = 6) -> dict[str, Any]:
    """precision@k, its figure, and ``<run>/retrieval.json``."""
    from medlatent.report.figures import retrieval_figure

    r = ev.retrieval(k=k, n_queries=queries)
    figure = retrieval_figure(r.pop("queries"), r.pop("neighbours"), r.pop("relevant"), r.pop("title"),
                              ev.run.path / "retrieval.png")
    result = dict(r, figure=str(figure))
    ev.run.write_json("retrieval.json", result)
    return result


def _draw_confusion(ev: RunEvaluation, split: str = "test") -> Path | None:
    from medlatent.report.figures import confusion_figure

    c = ev.confusion_matrix(split)
    return None if c is None else confusion_figure(c["matrix"], c["class_names"], c["title"],
                                                   ev.run.path / f"confusion_{split}.png")


def load_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """A run's newest encoder with its preprocessing: an ``nn.Module`` (forward on preprocessed
    batches) with ``preprocess(images)``, ``embed(images)``, ``image_size``, ``in_channels``,
    ``out_dim``, ``spatial_dims``, ``mean``, ``std`` and provenance (``run``, ``step``,
    ``method``, ``backbone``, ``data``). ``load_encoder(run).embed(raw_uint8_images)`` equals
    what ``medlatent embed`` writes for the same images. See :class:`LoadedEncoder`.

    Raises:
        CheckpointError: the folder is not a run, or it has no checkpoint yet.
    """
    return open_encoder(run_dir, device)


def export(run_dir: str | Path, format: str, out: str | Path | None = None) -> dict[str, Any]:
    """Write a run's encoder for another ecosystem: ``monai`` (safetensors + the MONAI class and
    its arguments), ``timm`` (ViTs in timm's layout), ``torchscript``, ``onnx`` or ``bundle`` (a
    MONAI bundle that embeds a folder of images). The folder (default ``<run>/export/<format>``)
    holds ``export.json`` with the preprocessing, provenance, a usage snippet and the largest
    difference from the run's encoder measured on reloading (``max_abs_diff``). See docs/export.md.

    Raises:
        ConfigError: an unknown format, or one this encoder cannot take (timm for a ResNet).
        CheckpointError: the run has no checkpoint yet.
    """
    from medlatent.export import export_run

    return export_run(run_dir, format, out)


def embed(run_dir: str | Path, split: str = "test", out: str | Path | None = None, data: str | None = None,
          data_dir: str | None = None, device: str = "auto") -> Path:
    """Write the encoder's embeddings of one split to an .npz (``embeddings`` (N, D), ``index``,
    ``labels``, ``source`` for images read from files) and the same rows as a CSV beside it
    (see :meth:`RunEvaluation.embed`); returns the .npz path."""
    return RunEvaluation(run_dir, data, data_dir, device, need_labels=False).embed(split, out)


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
        cfg = run.read_config()
        ds = load_dataset(dataclasses.replace(cfg.data, data_dir=data_dir or cfg.data.data_dir))
        x = to_float(ds.split(split).images[:n])
    return ops.normalize(x, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))


def attention(run_dir: str | Path, images: list[str] | None = None, n: int = 8, split: str = "test",
              out: str | Path | None = None, data_dir: str | None = None) -> Path:
    """DINO-style attention maps of a ViT encoder: last-layer CLS attention per head, over the
    input. Writes a PNG (default ``<run>/attention.png``)."""
    from medlatent.nets.backbones import ViTEncoder
    from medlatent.report.figures import attention_figure

    from medlatent.methods.saved import load_encoder as load_bare_encoder

    run = RunDir(Path(run_dir))
    encoder, meta, _ = load_bare_encoder(run.path)
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


def report(run_dir: str | Path, data_dir: str | None = None, device: str = "auto") -> Path:
    """One self-contained HTML page for a run (``<run>/report.html``); computes what is missing
    (probe, embedding map, retrieval, confusion matrix) and includes what exists (label
    efficiency, attention maps, reconstructions)."""
    from medlatent.report.figures import training_curves_figure
    from medlatent.report.html import ReportInputs, write_report

    ev = RunEvaluation(run_dir, None, data_dir, device)
    probe = ev.probe(splits=("val", "test"))
    retrieval = _draw_retrieval(ev)
    eff = ev.run.path / "label_efficiency.json"
    efficiency = ev.run.read_json(eff.name) if eff.is_file() else None
    figures = dict(curves=training_curves_figure(ev.run.read_metrics(), f"{ev.cfg.method} on {ev.cfg.data.name}",
                                                 ev.run.path / "training_curves.png"),
                   map=_draw_map(ev, "test"), retrieval=Path(retrieval["figure"]), confusion=_draw_confusion(ev),
                   efficiency=_draw_efficiency(ev, efficiency) if efficiency else None)
    return write_report(ReportInputs(ev.run, ev.cfg, ev.data.name, ev.task, ev.step, probe, retrieval, efficiency,
                                     figures))


def compare(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[str, Path | None]:
    """Side-by-side table of runs (method, backbone, steps, test ACC/AUC per protocol), as
    Markdown, and as an HTML page when ``out`` is given."""
    from medlatent.report.html import compare_runs

    return compare_runs([Path(r) for r in run_dirs], Path(out) if out else None)


# ------------------------------------------------------------------------------ data


def list_datasets(data_dir: str | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Every MedMNIST subset (catalogue facts + whether its 28-px file is here) and the data folder."""
    from medlatent.data.catalogue import CATALOGUE
    from medlatent.data.download import data_root, is_present

    rows = [dict(name=i.name, spatial_dims=i.spatial_dims, task=i.task, n_classes=i.n_classes, channels=i.channels,
                 splits=dict(i.splits), licence=i.licence, present=is_present(i, 28, data_dir))
            for i in CATALOGUE.values()]
    return rows, data_root(data_dir)


def download(names: list[str], size: int = 28, data_dir: str | None = None) -> list[Path]:
    """Official MedMNIST files, md5-verified (a file already here is verified, not fetched)."""
    from medlatent.data.catalogue import get_info
    from medlatent.data.download import fetch

    return [fetch(get_info(name), size, data_dir) for name in names]


def prepare_store(source: str | Path, output: str | Path, labels: str | Path | None = None,
                  columns: Mapping[str, str] | None = None, group_by: str | None = None,
                  classes: list[str] | None = None, overwrite: bool = False, **options: Any) -> Any:
    """Decode a folder or CSV manifest once into a memory-mapped store (``data prepare``).

    Args:
        source: an image folder (split, class or flat layout) or a CSV with one row per image.
        output: the store folder to write (published atomically; reused when the inputs match).
        labels: for a flat folder, a CSV of ``path,label[,split][,group]`` relative to it.
        columns: CSV column names, e.g. ``{"path": "filename", "label": "diagnosis",
            "split": "fold", "group": "patient_id"}``.
        group_by: the group column of a CSV, or "parent" (each image's folder) for a folder.
        classes: the class names in label order (a label outside them is an error).
        options: :class:`medlatent.data.prepare.PrepareConfig` fields (size, workers, split, ...).

    Returns:
        :class:`medlatent.data.prepare.PreparedStore`.
    """
    from medlatent.data import manifest as mf
    from medlatent.data.prepare import PrepareConfig, prepare

    cfg = from_dict(PrepareConfig, dict(options), "prepare")
    cols = dict(columns or {})
    unknown = set(cols) - {"path", "label", "split", "group"}
    if unknown:
        raise ConfigError(f"columns: unknown key(s) {sorted(unknown)} (known: path, label, split, group)")
    src = Path(source)
    names = dict(path_col=cols.get("path", "path"), label_col=cols.get("label", "label"),
                 split_col=cols.get("split", "split"), classes=classes)
    group_col = cols.get("group") or (group_by if group_by != "parent" else None)
    if src.is_file():
        m = mf.read_csv(src, group_col=group_col, **names)
    elif src.is_dir() and labels is not None:
        m = mf.read_manifest(src, labels=labels, group_col=group_col, **names)
    elif src.is_dir():
        m = mf.read_folder(src, group_by=group_by)
    else:
        raise DataError(f"{src}: no such folder or CSV file")
    return prepare(m, output, cfg, overwrite=overwrite)


# ------------------------------------------------------------------------- evaluation extras


def embedding_map(run_dir: str | Path, split: str = "test", max_points: int = 2000, out: str | Path | None = None,
                  data_dir: str | None = None) -> Path:
    """A 2-D map of a split's embeddings (UMAP if installed, else t-SNE), coloured by label (PNG),
    and its points as a CSV beside it (index in the split, x, y, label, source)."""
    return _draw_map(RunEvaluation(run_dir, None, data_dir, need_labels=False), split, max_points, out)


def retrieval(run_dir: str | Path, k: int = 8, queries: int = 6, data_dir: str | None = None) -> dict[str, Any]:
    """Nearest training images of test queries (a figure) and precision@1/5/10."""
    return _draw_retrieval(RunEvaluation(run_dir, None, data_dir), k, queries)


# ------------------------------------------------------------------------------ generative


def sample(run_dir: str | Path, n: int = 1000, class_index: int | None = None, guidance: float = 1.0,
           steps: int = 50, seed: int = 0, out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Samples of a generative run as an .npz in MedMNIST layout (usable as data) and a PNG grid."""
    from medlatent.generative.evaluate import sample_run

    return sample_run(run_dir, n, class_index, guidance, steps, seed, out, device)


def evaluate_samples(run_dir: str | Path, n: int = 1000, guidance: float = 1.0, steps: int = 50,
                     classifier_epochs: int = 15, classifier_min_steps: int = 300, data_dir: str | None = None,
                     device: str = "auto") -> dict[str, Any]:
    """Frechet distance, precision/recall, TSTR vs TRTR and memorisation of a generative run."""
    from medlatent.generative.evaluate import judge_run

    return judge_run(run_dir, n, guidance, steps, 0, classifier_epochs, data_dir, device, classifier_min_steps)


def synthetic_augmentation(run_dir: str | Path, fractions: tuple[float, ...] = (0.01, 0.1), n_synthetic: int = 2000,
                           seeds: tuple[int, ...] = (0, 1, 2), guidance: float = 1.0, classifier_epochs: int = 15,
                           classifier_min_steps: int = 300, data_dir: str | None = None, device: str = "auto",
                           protocol: str = "fraction", generator_steps: int | None = None,
                           generator_budget_s: float | None = None, sampler_steps: int = 50) -> dict[str, Any]:
    """A classifier on a label fraction alone vs with a class-conditional generator's samples
    added; the gain's mean and std over seeds (``generate augment``).

    Args:
        run_dir: a class-conditional generative run (``generate train --conditional``).
        protocol: ``"fraction"`` (default): for each fraction and seed a generator with this
            run's config is trained inside the command (``<run>/synthetic/fraction-F-seedS/``,
            reused when finished) on the unlabelled train images and only the labels the
            classifier has (ddpm/ldm: the others as classifier-free guidance's null class; gan/vae:
            the labelled images alone). ``"all-labels"``: this run's own samples, trained on every
            train label: it leaks labels, kept only to reproduce old numbers.
        generator_steps: optimiser steps per fraction generator (default: as many as this run's).
        generator_budget_s: wall-clock cap per fraction generator (default 600 s; 0: none).
        sampler_steps: DDIM steps of ddpm/ldm sampling.

    Raises:
        ConfigError: an unknown protocol, generator budgets given with ``"all-labels"``, an
            unconditional run.
    """
    from medlatent.generative.evaluate import AUGMENT_PROTOCOLS, AugmentConfig, augment_experiment

    if protocol not in AUGMENT_PROTOCOLS:
        raise ConfigError(f"--protocol: unknown protocol '{protocol}' (known: {', '.join(AUGMENT_PROTOCOLS)})")
    if protocol == "all-labels" and (generator_steps is not None or generator_budget_s is not None):
        raise ConfigError("--generator-steps/--generator-budget: apply to --protocol fraction only (all-labels "
                          "reuses the run's own generator)")
    budget = {} if generator_budget_s is None else {"generator_budget_s": float(generator_budget_s)}
    cfg = AugmentConfig(protocol=protocol, fractions=tuple(fractions), seeds=tuple(seeds), n_synthetic=n_synthetic,
                        guidance=guidance, sampler_steps=sampler_steps, classifier_epochs=classifier_epochs,
                        classifier_min_steps=classifier_min_steps, generator_steps=generator_steps, **budget)
    check_ranges(cfg, "augment")
    train = _fraction_generator(Path(run_dir), data_dir, device, cfg.generator_budget_s) if protocol == "fraction" \
        else None
    return augment_experiment(run_dir, cfg, data_dir, device, train)


def _fraction_generator(run_dir: Path, data_dir: str | None, device: str,
                        budget_s: float) -> Callable[[float, int, int], Path]:
    """(fraction, seed, steps) -> the folder of a generator trained with ``run_dir``'s config on
    the train images and only that fraction's labels (``data.label_fraction``, ``data.label_seed``).

    A folder whose generator finished (``generator.json``) is reused; one with a checkpoint but
    no ``generator.json`` (a killed command) is resumed.
    """
    from medlatent.methods.registry import get_method

    base = read_config(RunDir(run_dir))
    spec = get_method(base.method)

    def train(fraction: float, seed: int, steps: int) -> Path:
        from medlatent.eval.fractions import label_fraction

        out = RunDir(run_dir / "synthetic" / f"fraction-{fraction:g}-seed{seed}")
        if (out.path / "generator.json").is_file():
            return out.path
        if out.has_checkpoint():
            _log.info(f"generator for {fraction:g} of the labels, seed {seed}: resuming {out.path}")
            _, fit_result = run_pretraining(None, out.path, resume=True,
                                            overrides={"train.device": device, "train.time_budget_s": budget_s})
        else:
            data = dataclasses.replace(base.data, data_dir=data_dir if data_dir is not None else base.data.data_dir,
                                       label_fraction=fraction, label_seed=seed)
            split = load_dataset(data).split(data.split)
            labels = split.labels[:, 0]
            n_labelled = len(label_fraction(labels[labels >= 0], fraction, seed))
            n_images = len(split) if spec.trains_unlabelled else n_labelled
            batch = min(base.train.batch_size, n_images)  # a gan/vae on 1 % of the labels may have fewer images
            epochs = steps / max(1, n_images // batch)  # fit() trains round(epochs x steps per epoch) steps
            cfg = dataclasses.replace(
                base, data=data, train=dataclasses.replace(base.train, epochs=epochs, batch_size=batch, seed=seed,
                                                           device=device, time_budget_s=budget_s, log=[], map_every=0))
            _log.info(f"generator for {fraction:g} of the labels ({n_labelled} labels), seed {seed}: "
                      f"{cfg.method}, {steps} steps{f' or {budget_s:g} s' if budget_s else ''} -> {out.path}")
            _, fit_result = run_pretraining(cfg, out.path)
        meta = out.read_json("data.json")
        out.write_json("generator.json", dict(fraction=fraction, seed=seed, labels_seen=meta["labels_seen"],
                                              status=fit_result.status, step=fit_result.step,
                                              total_steps=fit_result.total_steps, wall_s=fit_result.wall_s))
        return out.path

    return train


# --------------------------------------------------------------------------------- anomaly


def detector_method(name: str) -> str:
    """The method a detector name trains (``ae`` -> ``autoencoder``; see ``anomaly.detectors.DETECTORS``)."""
    from medlatent.anomaly.detectors import DETECTORS

    if name not in DETECTORS:
        raise ConfigError(f"--method: unknown detector '{name}' (known: {', '.join(DETECTORS)})")
    return DETECTORS[name]


def parse_classes(text: str) -> list[int]:
    """``"0,1"`` -> [0, 1] (class indices on the command line)."""
    from medlatent.anomaly.detectors import parse_classes as parse

    return parse(text)


def score_anomalies(run_dir: str | Path, score: str = "l2", threshold: str = "mean+3std", detector: str = "auto",
                    data: str | None = None, normal: list[int] | None = None, split: str = "test",
                    out: str | Path | None = None, data_dir: str | None = None,
                    device: str = "auto") -> dict[str, Any]:
    """Per-image anomaly scores (CSV) and heatmaps of a detector run; AUROC, AUPRC, and
    sensitivity/specificity at the threshold from normal val images."""
    from medlatent.anomaly.detectors import AnomalyConfig, score_run

    return score_run(run_dir, AnomalyConfig(score=score, threshold=threshold), detector, data, normal, split, out,
                     data_dir, resolve_device(device))


# ----------------------------------------------------------------------------- restoration


def evaluate_restoration(run_dir: str | Path, diffusion_run: str | None = None, autoencoder_run: str | None = None,
                         n: int = 500, steps: int = 20, data_dir: str | None = None,
                         device: str = "auto") -> dict[str, Any]:
    """PSNR and SSIM per degradation level: degraded input, the run's restorer (+ data
    consistency), classical filters, and optionally diffusion and an autoencoder."""
    from medlatent.restore.evaluate import benchmark_run

    return benchmark_run(str(run_dir), diffusion_run, n, steps, data_dir, device, autoencoder_run)


def rate_distortion(runs: list[str], n: int = 500, out: str = "rate_distortion.png",
                    data_dir: str | None = None) -> dict[str, Any]:
    """Autoencoder runs against JPEG at the same bytes: PSNR/SSIM against bytes per image."""
    from medlatent.restore.compression import rate_distortion as curve

    return curve(runs, n, out, data_dir)


# ------------------------------------------------------------------------------ adaptation


def adapt(source: str | Path, strategy: Any = None, data: str | None = None, label_fraction: float = 1.0,
          seed: int = 0, finetune: FinetuneConfig | None = None, heads: int | None = None,
          out: str | Path | None = None, data_dir: str | None = None, device: str = "auto",
          log: tuple[str, ...] = (), on_metrics: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Adapt a pretrained encoder (a run, or ViT weights in timm/DINO/MAE layout) to a labelled
    task with few trainable parameters; writes the adapter (.safetensors + .json).

    Args:
        strategy: an :class:`medlatent.adapt.strategies.AdaptConfig` (default LoRA).
        finetune: training of the adapter and head (default: feature-normalised head).
        log: experiment trackers (``"tensorboard"``, ``"mlflow"``) for the adapter's training,
            written into ``<adapter>.trackers/`` beside the adapter files (``result["trackers"]``).
        on_metrics: receives each validation record of the training (step, loss, lr, val_*).

    Raises:
        ConfigError: an unknown tracker, or one whose package is missing (before anything runs).
    """
    from medlatent.adapt.run import WEIGHT_SUFFIXES, adapt_and_evaluate, load_base
    from medlatent.adapt.strategies import adapt as apply_strategy

    log = tuple(dict.fromkeys(log))
    trackers.require(log)  # refused before the base is loaded or anything is trained
    cfg = strategy or AdaptConfig()
    ft = finetune or FinetuneConfig(feature_norm=True)
    base = load_base(source, data, data_dir, heads, device)
    apply_strategy(base.encoder, cfg)  # fails fast on a strategy the encoder cannot take
    if out is None:
        root = Path(source).with_suffix("") if Path(source).suffix in WEIGHT_SUFFIXES else Path(source)
        out = root / "adapters" / f"{cfg.strategy}-{base.data.name}-{label_fraction:g}"
    result = adapt_and_evaluate(base, cfg, label_fraction, seed, ft, str(out), device, log, on_metrics)
    return dict(result, weights_notes=base.notes)


def mil(source: str | Path, data: str | None = None, positive_class: int = 0, bag_size: int = 16, bags: int = 400,
        prompts: int = 0, steps: int = 300, out: str | Path | None = None, data_dir: str | None = None,
        device: str = "auto") -> dict[str, Any]:
    """Multiple-instance learning on bags built from labelled images: attention MIL (Ilse et al.
    2018) on frozen embeddings, or Prompt-MIL; bag AUC and attention on the positive images."""
    from medlatent.adapt.run import load_base, run_mil

    base = load_base(source, data, data_dir, None, device)
    default = (Path(source).with_suffix("") if Path(source).is_file() else Path(source)) / "mil.png"
    return run_mil(base, positive_class, bag_size, bags, prompts, steps, Path(out) if out else default)


__all__ = ["make_config", "pretrain", "run_pretraining", "probe", "label_efficiency", "embed", "load_encoder",
           "load_method", "attention", "reconstruct", "report", "compare", "embedding_map", "retrieval", "sample",
           "evaluate_samples", "synthetic_augmentation", "score_anomalies", "evaluate_restoration",
           "rate_distortion", "adapt", "mil", "list_datasets", "download", "PretrainConfig", "DataConfig",
           "FitResult", "FinetuneConfig", "SemiConfig", "PROTOCOLS", "AdaptConfig", "RunEvaluation", "crossover_words", "detector_method",
           "parse_classes", "is_generative", "generative_models", "export", "LoadedEncoder"]
