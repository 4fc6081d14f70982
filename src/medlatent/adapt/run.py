"""One adaptation run: base encoder (a run's, or external ViT weights) + strategy + labelled
data -> trained adapter file and its test metrics.

Training is the evaluation suite's fine-tuning protocol (``eval/finetune.py``: AdamW, cosine
schedule, light augmentation, early stopping on val); the strategy only decides which
parameters train and what is added to the encoder.

Experiment trackers (``log=("tensorboard", "mlflow")``) get the adapter's training scalars
(``loss``, ``lr``, ``val_*`` at every validation), the adaptation config as parameters and the
final metrics (``final/test_acc``, ``final/trainable_params``, ...), in a folder beside the
adapter files: ``<adapter>.trackers/tensorboard/``, ``<adapter>.trackers/mlruns/`` and
``<adapter>.trackers/mlflow_run.json``. Writing the same adapter again replaces its TensorBoard
events and starts a new MLflow run in the same store.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from medlatent.adapt.files import adapter_files, load_adapter_into, read_adapter, save_adapter, weights_hash
from medlatent.adapt.strategies import AdaptConfig, adapt, count_parameters
from medlatent.config import DataConfig
from medlatent.data.sources import load_dataset
from medlatent.data.store import Dataset, channel_stats
from medlatent.errors import ConfigError, DataError
from medlatent.eval.features import predict_scores
from medlatent.eval.finetune import Classifier, FinetuneConfig, finetune
from medlatent.eval.fractions import label_fraction
from medlatent.eval.metrics import evaluate
from medlatent.train import trackers
from medlatent.train.precision import resolve_device

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Base:
    """A pretrained encoder with the data it is adapted to and the input standardisation."""

    encoder: nn.Module
    data: Dataset
    mean: list[float]
    std: list[float]
    source: str
    notes: str = ""


def load_base(source: str | Path, data: str | None = None, data_dir: str | None = None,
              num_heads: int | None = None, device: str = "auto") -> Base:
    """A run folder (its encoder and statistics; data default: its pretraining data) or a
    weights file (timm/DINO/MAE ViT; ``data`` required, statistics from its training split)."""
    from medlatent.adapt.external import vit_from_weights
    from medlatent.eval.session import RunEvaluation

    source = Path(source)
    if source.suffix in WEIGHT_SUFFIXES:
        if data is None:
            raise DataError(f"{source}: external weights need --data (what to adapt them to)")
        dataset = load_dataset(DataConfig(name=data, data_dir=data_dir)).labelled()
        vit, report = vit_from_weights(source, dataset.channels, dataset.image_size, num_heads)
        mean, std = channel_stats(dataset.split("train").images)
        return Base(vit.to(resolve_device(device)), dataset, mean, std, str(source), report.summary())
    ev = RunEvaluation(source, data, data_dir, device)
    return Base(ev.encoder, ev.data.labelled(), ev.mean, ev.std, str(source))


def tracker_folder(out: str | Path) -> Path:
    """Where an adapter's experiment trackers write: ``<adapter>.trackers`` beside its
    ``.safetensors`` and ``.json`` (the suffix replaced as :func:`save_adapter` does)."""
    return adapter_files(out)[0].with_suffix(".trackers")


def adapt_and_evaluate(base: Base, cfg: AdaptConfig, fraction: float = 1.0, seed: int = 0,
                       ft: FinetuneConfig | None = None, out: str | Path | None = None,
                       device: str = "auto", log: Iterable[str] = (),
                       on_metrics: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.strategy`` on a stratified ``fraction`` of the training labels; test ACC/AUC,
    trainable parameters (count and % of the encoder), time and peak memory; the adapter is
    written to ``out`` (.safetensors + .json) when given.

    ``log``: experiment trackers (tensorboard, mlflow) written into :func:`tracker_folder` of
    ``out`` (required then). ``on_metrics``: also receives finetune's record at every validation.
    """
    ft = ft or FinetuneConfig(feature_norm=True)
    log = list(dict.fromkeys(log))
    if log:
        trackers.require(log)
        if out is None:
            raise ConfigError("--log: the trackers write beside the adapter files; give the adapter a path (--out)")
    dev = resolve_device(device)
    data = base.data
    if data.task is None:
        raise DataError(f"{data.source or data.name}: has no labels; adapting needs labelled train and val splits")
    multi_label = data.task.startswith("multi-label")
    train = data.split("train")
    idx = label_fraction(train.labels, fraction, seed, multi_label)
    adapted = adapt(base.encoder.cpu(), cfg)
    trainable, _ = count_parameters(adapted)
    encoder_total = sum(p.numel() for p in base.encoder.parameters())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tracked = _open_trackers(log, out, dict(
        strategy=cfg.strategy, adapt=dataclasses.asdict(cfg), label_fraction=fraction, seed=seed, n_labels=len(idx),
        data=data.name, base=base.source, finetune=dataclasses.asdict(ft))) if log else trackers.Trackers()
    to_tracker = tracked.metrics_callback()

    def report(record: dict[str, Any]) -> None:
        to_tracker(record)
        if on_metrics is not None:
            on_metrics(record)

    status = "FAILED"
    try:
        t0 = time.perf_counter()
        model, val, steps = finetune(adapted, train.subset(idx), data.split("val"), data.task, data.n_classes,
                                     base.mean, base.std, data.name, ft, dev, seed,
                                     encoder_lr_scale=None if cfg.strategy == "finetune" else 1.0, on_metrics=report)
        seconds = time.perf_counter() - t0
        scores = predict_scores(model, data.split("test").images, base.mean, base.std, dev, multi_label)
        test = evaluate(data.split("test").labels.numpy(), scores, data.task)
        tracked.log_final(dict(trainable_params=trainable, trainable_pct=100 * trainable / encoder_total,
                               steps=steps, train_s=seconds, **{f"val_{k}": v for k, v in val.items()},
                               **{f"test_{k}": v for k, v in test.items()}), steps)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracked.close(status)
    result: dict[str, Any] = dict(
        strategy=cfg.strategy, data=data.name, fraction=fraction, seed=seed, n_labels=len(idx),
        trainable_params=trainable, encoder_params=encoder_total, trainable_pct=100 * trainable / encoder_total,
        head_params=sum(p.numel() for p in model.head.parameters()), steps=steps, train_s=seconds,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        peak_gpu_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        val=val, test=test, base=base.source, base_notes=base.notes, adapt=dataclasses.asdict(cfg))
    if out is not None:
        w, _ = save_adapter(out, model, cfg, weights_hash(base.encoder),
                            dict(n_outputs=data.n_classes, feature_norm=ft.feature_norm, task=data.task, data=data.name, mean=base.mean,
                                 std=base.std, base=base.source, test=test, label_fraction=fraction, seed=seed,
                                 finetune=dataclasses.asdict(ft)))
        result["adapter"] = str(w)
        result["adapter_bytes"] = w.stat().st_size
    if log:
        result["trackers"] = str(tracker_folder(out))
    return result


def _open_trackers(log: list[str], out: str | Path, params: dict[str, Any]) -> trackers.Trackers:
    """The adapter's trackers in a fresh ``<adapter>.trackers`` (events and the MLflow run of an
    adapter written there before are replaced; MLflow's store keeps the earlier runs)."""
    folder = tracker_folder(out)
    shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    (folder / "mlflow_run.json").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return trackers.Trackers.open(log, folder, params, Path(out).name, experiment="medlatent-adapt")


def load_adapted(base: Base, adapter: str | Path) -> Classifier:
    """The base encoder with an adapter file's strategy and weights (and its head) applied.

    Raises:
        CheckpointError: the adapter was trained on another base encoder, or does not match.
    """
    cfg, info, state = read_adapter(adapter)
    model = Classifier(adapt(base.encoder.cpu(), cfg), info["n_outputs"], info.get("feature_norm", False))
    return load_adapter_into(model, state, info, base.encoder, adapter).eval()


def run_mil(base: Base, positive_class: int, bag_size: int = 16, n_bags: int = 400, prompts: int = 0,
            steps: int = 300, figure: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """MIL on bags of the data's images (train bags from train, test bags from test): attention
    MIL on frozen embeddings, or Prompt-MIL (``prompts`` > 0) through the frozen ViT."""
    from medlatent.adapt.mil import AttentionMIL, PromptMIL, evaluate_mil, make_bags, train_mil
    from medlatent.adapt.prompts import PromptedViT
    from medlatent.augment import ops
    from medlatent.data.store import to_float
    from medlatent.eval.features import extract_features
    from medlatent.eval.maps import display_images
    from medlatent.report.figures import mil_figure

    data = base.data
    if data.task is None:
        raise DataError(f"{data.source or data.name}: has no labels; bags are built from labelled images")
    if not 0 <= positive_class < data.n_classes:
        raise DataError(f"--positive-class {positive_class}: {data.name} has classes 0..{data.n_classes - 1}")
    split_bags = {s: make_bags(data.split(s).labels, positive_class, n, bag_size, seed + i)
                  for i, (s, n) in enumerate((("train", n_bags), ("test", max(2, n_bags // 2))))}
    encoder = base.encoder.eval()
    dev = next(encoder.parameters()).device  # the device the base was loaded on (--device)
    if prompts:
        vit = adapt_frozen(encoder)
        model: nn.Module = PromptMIL(PromptedViT(vit, prompts, deep=False)).to(dev)
        m, s = torch.tensor(base.mean, device=dev), torch.tensor(base.std, device=dev)

        def inputs(split: str) -> torch.Tensor:
            idx = split_bags[split][0]
            x = ops.normalize(to_float(data.split(split).images[idx.flatten()].to(dev)), m, s)
            return x.view(*idx.shape, *x.shape[1:])  # (bags, N, C, *S)
    else:
        model = AttentionMIL(encoder.out_dim).to(dev)
        feats = {sp: extract_features(encoder, data.split(sp).images, base.mean, base.std, dev).to(dev)
                 for sp in split_bags}

        def inputs(split: str) -> torch.Tensor:
            return feats[split][split_bags[split][0]]  # (bags, N, D)
    train_idx, train_y, _ = split_bags["train"]
    train_mil(model, inputs("train"), train_y, steps, batch=8 if prompts else 16, seed=seed)
    test_idx, test_y, test_pos = split_bags["test"]
    x_test = inputs("test")
    result: dict[str, Any] = dict(method=f"Prompt-MIL ({prompts} prompts)" if prompts else "attention MIL",
                                  data=data.name, positive_class=positive_class, bag_size=bag_size, n_bags=n_bags,
                                  **evaluate_mil(model, x_test, test_y, test_pos))
    if figure is not None:
        with torch.no_grad():
            shown = [i for i in range(len(test_y)) if test_y[i]][:3]
            _, att = model(x_test[shown])
        rows = [(display_images(data.split("test").images[test_idx[i]]), att[j].tolist(), test_pos[i].tolist())
                for j, i in enumerate(shown)]
        result["figure"] = str(mil_figure(rows, f"{data.name}: {result['method']} attention weights on positive test bags "
                                          f"(class {positive_class} images outlined)", figure))
    return result


def adapt_frozen(encoder: nn.Module) -> nn.Module:
    """A frozen copy of an encoder (for prompt tuning inside MIL)."""
    return adapt(encoder, AdaptConfig(strategy="linear"))
