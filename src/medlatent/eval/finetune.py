"""Fine-tuning protocols: encoder + linear head trained on labelled images, early stopping on val.

* :func:`finetune` trains one classifier with one learning rate (the loop every trained protocol
  shares: :func:`fit_on_val`). The same function trains the supervised baseline (a freshly
  initialised encoder of the same architecture), so every table can carry the row a reviewer
  asks for: "and how does that compare with training from scratch on the same labels?"
* :func:`tune` chooses the learning rate and the encoder's learning-rate scale on the val split
  from a small grid (:class:`FinetuneConfig` ``lr_grid`` x ``encoder_lr_scale_grid``), per label
  fraction, for any trained protocol; the label-efficiency protocols (fine-tuning, LP-FT, the
  supervised baseline, FixMatch) all go through it, so each gets the same grid and budget.
* :func:`probe_head` starts the head from a linear probe on frozen features: LP-FT (Kumar et al.,
  "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022):
  a random head's large early gradients distort the pretrained features before the head is any
  good; fitting the head first (the linear probe) and then fine-tuning everything from it avoids
  that.

The grid and its cost (``docs/evaluation.md``, "Choosing the learning rate"): by default the head
learning rate is one of {1e-3, 3e-4, 1e-4} and the encoder's is 1.0x or 0.1x of it, 6 candidates.
Each is trained with a quarter of the budget (``search_fraction``: the cosine schedule compressed
onto a quarter of the steps, early stopping on val), all with the same seed (same head
initialisation, batches and views), and the one best on val ACC (then AUC; ties: the lower
learning rate, then the lower encoder scale) is trained again with the whole budget: about
1 + 6 x 0.25 = 2.5 trainings per protocol, label fraction and seed, instead of one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import progress
from medlatent.augment.views import ViewRecipe, geometric_only, resolve
from medlatent.config import ViewConfig, bounded
from medlatent.data.catalogue import MULTI_LABEL
from medlatent.train.batches import BatchReader
from medlatent.data.store import ImageSet, epoch_batches, mix_seed
from medlatent.errors import ConfigError
from medlatent.eval.features import predict_scores
from medlatent.eval.linear import LinearProbe
from medlatent.eval.metrics import evaluate
from medlatent.train.optim import lr_at

OnMetrics = Callable[[dict[str, Any]], None]
# One optimiser step's loss and its named parts, detached (read back only at validations): step -> (loss, parts).
StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class FinetuneConfig:
    """How a labelled encoder is trained, and how its learning rate is chosen on val."""

    # Most epochs; early stopping usually ends sooner. Small label fractions get more epochs
    # (min_steps), so 1 % of the labels still means a few hundred optimiser steps.
    epochs: int = bounded(30, ge=1)
    min_steps: int = bounded(300, ge=0)
    batch_size: int = bounded(128, ge=1)
    # Head learning rate (AdamW); the encoder's is lr * encoder_lr_scale (0.1 keeps pretrained
    # features from being washed out early; the supervised baseline uses 1.0). One training
    # (finetune(), adapters) uses these; the label-efficiency protocols search the grids below
    # and use these only where a grid is None.
    lr: float = bounded(1e-3, gt=0, le=1)
    encoder_lr_scale: float = bounded(0.1, ge=0, le=1)
    # Layer-wise decay (BEiT/MAE fine-tuning): block i of n gets decay^(n - i) of the encoder
    # learning rate. None: one learning rate for the whole encoder.
    layer_decay: float | None = bounded(None, gt=0, le=1)
    weight_decay: float = bounded(1e-4, ge=0)
    # Evaluate on val every this many optimiser steps (and at the last step).
    eval_every: int = bounded(50, ge=1)
    # Stop after this many evaluations without a better val ACC ...
    patience: int = bounded(6, ge=1)
    # ... or after this fraction of the run's steps without one, whichever is longer
    # (``patience_evals``). A fixed 6 x 50 steps cut BloodMNIST's 2790-step full-data fine-tuning
    # at step 1300 (best val ACC 0.935 at step 1000), while the cosine rate was still high and
    # below what its own 744-step search run reached (0.951). A quarter leaves every run of up to
    # 1200 steps (6 x 50 / 0.25) exactly as before. 0: ``patience`` alone.
    patience_fraction: float = bounded(0.25, ge=0, le=1)
    # Light augmentation (crop 0.8-1, flips where the data allow them).
    augment: bool = True
    # Normalise the features before the head with a BatchNorm without affine parameters (MAE's
    # linear-probing recipe, He et al. 2022): frozen ViT features have very uneven scales.
    feature_norm: bool = False
    # The learning-rate grid of the label-efficiency protocols (tune()), chosen on val per label
    # fraction and seed. Head learning rates: AdamW's 1e-3 (today's value) and two steps of ~3x
    # down, where fine-tuning a pretrained encoder usually does best; 3 values span a decade,
    # enough to tell "too high" from "too low" at 28 px. None: lr alone.
    lr_grid: tuple[float, ...] | None = bounded((1e-3, 3e-4, 1e-4), gt=0, le=1)
    # Encoder learning rate as a fraction of the head's: 1.0 (the supervised baseline's today)
    # and 0.1 (fine-tuning's today). Both are tried for every protocol, pretrained or not, so the
    # comparison is fair both ways. None: encoder_lr_scale for pretrained encoders and 1.0 for
    # fresh ones (today's protocol).
    encoder_lr_scale_grid: tuple[float, ...] | None = bounded((1.0, 0.1), gt=0, le=1)
    # Budget of each candidate, as a fraction of the full one (epochs and min_steps scaled, at
    # least one epoch); the winner is then trained with the full budget. A quarter keeps the
    # search at 1.5x one training for 6 candidates (2.5x in all) on a CPU, and is long enough for
    # the cosine schedule to show which rate learns. 1.0: every candidate gets the full budget and
    # the best one is kept as trained (no retraining; 6x).
    search_fraction: float = bounded(0.25, gt=0, le=1)

    def check(self, where: str) -> None:
        for name in ("lr_grid", "encoder_lr_scale_grid"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"{where}.{name}: an empty grid; give at least one value, or null for no search")


# ------------------------------------------------------------------------------ the classifier


class Classifier(nn.Module):
    """Encoder (B, C, *S) -> (B, D) followed by a linear head -> (B, K) logits; with
    ``feature_norm`` the head is BatchNorm1d(affine=False) then Linear.

    Args:
        head: a state dict the head starts from (``probe_head``: LP-FT); None: PyTorch's
            default initialisation.
    """

    def __init__(self, encoder: nn.Module, n_outputs: int, feature_norm: bool = False,
                 head: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        linear = nn.Linear(encoder.out_dim, n_outputs)  # drawn even when replaced: the same RNG stream
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.out_dim, affine=False), linear) if feature_norm else linear
        if head is not None:
            self.head.load_state_dict(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def probe_head(probe: LinearProbe, feature_norm: bool = False) -> dict[str, torch.Tensor]:
    """A fitted linear probe as the state dict of a :class:`Classifier` head (LP-FT, step 1).

    The probe computes ``((x - mean) / std) @ W.T + b``; folded into one Linear that is
    ``W' = W / std`` (per feature) and ``b' = b - W' @ mean``, the same logits. With
    ``feature_norm`` the head's BatchNorm takes the probe's mean and variance as its running
    statistics and the Linear takes ``W * sqrt(std^2 + eps) / std`` (the BatchNorm divides by
    ``sqrt(var + eps)``) and ``b``: the same logits in eval mode; in training the BatchNorm uses
    batch statistics, as it would anyway.
    """
    w, b = probe.weight.float(), probe.bias.float()  # (K, D), (K,)
    mean, std = probe.mean.float(), probe.std.float()  # (D,), (D,)
    if feature_norm:
        eps = nn.BatchNorm1d(1).eps
        return {"0.running_mean": mean.clone(), "0.running_var": std ** 2, "0.num_batches_tracked": torch.tensor(0),
                "1.weight": w * torch.sqrt(std ** 2 + eps) / std, "1.bias": b.clone()}
    folded = w / std  # (K, D)
    return {"weight": folded, "bias": b - folded @ mean}


def train_mode(model: nn.Module) -> nn.Module:
    """Training mode, except batch-norm layers whose weights are frozen: a frozen encoder
    (linear probe, adapters) keeps its pretrained running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()
    return model


def layer_index(name: str, n_layers: int) -> int:
    """Depth of an encoder parameter for layer-wise decay: stem 0, stages/blocks 1..n, head n + 1."""
    if name.startswith("head."):
        return n_layers + 1
    parts = name.split(".")
    if parts[1].startswith("layer") and parts[1][5:].isdigit():  # ResNet stages layer1..layer4
        return int(parts[1][5:])
    if parts[1] == "blocks":  # ViT blocks
        return int(parts[2]) + 1
    if parts[1] in ("norm", "fc"):
        return n_layers
    return 0


def param_groups(model: Classifier, cfg: FinetuneConfig, encoder_lr_scale: float) -> list[dict]:
    n_layers = len(getattr(model.encoder, "blocks", [])) or 4
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            scale = 1.0
        else:
            scale = encoder_lr_scale
            if cfg.layer_decay is not None:
                scale *= cfg.layer_decay ** (n_layers + 1 - layer_index(name, n_layers))
        wd = cfg.weight_decay if p.dim() > 1 else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [dict(params=ps, lr_scale=s, weight_decay=wd) for (s, wd), ps in groups.items()]


# ------------------------------------------------------------------------------ shared pieces


def finetune_view(data_name: str, augment: bool = True) -> ViewConfig:
    """The light view of fine-tuning (FixMatch's weak view): crop 0.8-1 of the area and the
    flips / 90-degree rotations the data allow; no photometric change. ``augment=False``: none."""
    view = geometric_only(resolve(ViewConfig(), data_name), (0.8, 1.0))
    if not augment:
        view = dataclasses.replace(view, crop_scale=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=0.0)
    return view


def memory_format(channels_last: bool, images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last and images.dim() == 4 else torch.contiguous_format


def training_steps(n: int, cfg: FinetuneConfig) -> tuple[int, int]:
    """(batch, total optimiser steps) for ``n`` labelled images: ``max(epochs x n // batch, min_steps)``."""
    batch = min(cfg.batch_size, n)
    return batch, max(cfg.epochs * max(1, n // batch), cfg.min_steps)


class BatchOrder:
    """The rows of step ``s``: batch ``s % k`` of epoch ``s // k`` (k batches an epoch), each
    epoch's order a pure function of (seed, epoch) (``data.store.epoch_batches``)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.steps_per_epoch = max(1, n // batch)
        self._epoch, self._batches = -1, []

    def __call__(self, step: int) -> torch.Tensor:
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.n, self.batch, self.seed, epoch)
        return self._batches[step % self.steps_per_epoch]  # (batch,)


def forward_logits(model: nn.Module, x: torch.Tensor, device: torch.device,
                   autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, C, *S) -> (B, K) float32 logits, under bf16 autocast when asked."""
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        return model(x).float()


def supervised_loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against (B, L) labels (one BCE per label when multi-label)."""
    return F.binary_cross_entropy_with_logits(logits, y.float()) if multi_label else F.cross_entropy(logits, y[:, 0])


def patience_evals(cfg: FinetuneConfig, total: int) -> int:
    """Validations without a better val ACC before a ``total``-step run stops early: ``cfg.patience``,
    or as many as cover ``cfg.patience_fraction`` of the run, whichever is more."""
    return max(cfg.patience, math.ceil(cfg.patience_fraction * total / cfg.eval_every))


def val_key(metrics: dict[str, float]) -> tuple[float, float]:
    """What "better on val" means everywhere here: ACC, then AUC."""
    return (metrics["acc"], float(np.nan_to_num(metrics["auc"])))


def fit_on_val(model: nn.Module, opt: torch.optim.Optimizer, loss_at: StepLoss, total: int, lr: float,
               eval_every: int, patience: int, score_val: Callable[[], dict[str, float]], task_name: str,
               on_metrics: OnMetrics | None = None) -> tuple[dict[str, float], int]:
    """The loop of every trained protocol: cosine learning rate (no warm-up, to 1 % of ``lr``;
    each parameter group scaled by its ``lr_scale``), ``loss_at(step)`` backpropagated, val
    every ``eval_every`` steps and at the last, the best weights kept, early stopping after
    ``patience`` validations without a better val ACC (then AUC).

    ``on_metrics(record)`` receives ``step``, ``loss``, ``lr`` (the head's), the loss's parts
    and ``val_<metric>`` at every validation. ``model`` ends with its best weights, in eval mode.

    Returns:
        (val metrics of the best weights, optimiser steps taken).
    """
    best_key, best_state, best_metrics, bad_evals = None, None, {}, 0
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, 0, lr, 0.01) * group["lr_scale"]
        loss, parts = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        progress.report(task_name, step, total)
        if step % eval_every == 0 or step == total:
            metrics = score_val()
            if on_metrics is not None:
                on_metrics(dict(step=step, loss=float(loss.detach()), lr=lr_at(step - 1, total, 0, lr, 0.01),
                                **{k: float(v) for k, v in parts.items()},
                                **{f"val_{k}": float(v) for k, v in metrics.items()}))
            key = val_key(metrics)
            if best_key is None or key > best_key:
                best_key, best_metrics, bad_evals = key, metrics, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_evals += 1
            train_mode(model)
            if bad_evals >= patience:
                total = step  # early stop
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return best_metrics, step


# ------------------------------------------------------------------------------ one training


def finetune(encoder: nn.Module, train: ImageSet, val: ImageSet, task: str, n_outputs: int, mean: list[float],
             std: list[float], data_name: str, cfg: FinetuneConfig, device: torch.device, seed: int = 0,
             encoder_lr_scale: float | None = None, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False, on_metrics: OnMetrics | None = None,
             head: dict[str, torch.Tensor] | None = None) -> tuple[Classifier, dict[str, float], int]:
    """Train ``encoder`` + a linear head on ``train`` with ``cfg.lr``; keep the weights best on ``val``.

    Steps: a copy of the encoder and a head (``head``: its starting state, e.g. ``probe_head``
    for LP-FT); AdamW with the head at ``cfg.lr`` and the encoder at ``encoder_lr_scale`` of it
    (default ``cfg.encoder_lr_scale``); each step a batch of light views (``finetune_view``) and
    cross-entropy; :func:`fit_on_val` for the schedule, validation and early stopping.

    ``on_metrics(record)``, when given, receives a record at every validation (``eval_every``
    steps): ``step``, ``loss`` (that step's training loss), ``lr`` (the head's), ``val_acc``,
    ``val_auc`` (e.g. for an experiment tracker; the loss is read back only then).

    Returns:
        (model at its best val ACC, its val metrics, optimiser steps taken).
    """
    torch.manual_seed(seed)
    model = train_mode(Classifier(copy.deepcopy(encoder), n_outputs, cfg.feature_norm, head).to(device))
    fmt = memory_format(channels_last, train.images)
    model.to(memory_format=fmt)
    scale = cfg.encoder_lr_scale if encoder_lr_scale is None else encoder_lr_scale
    opt = torch.optim.AdamW(param_groups(model, cfg, scale), lr=cfg.lr)
    multi_label = task == MULTI_LABEL
    recipe = ViewRecipe([(finetune_view(data_name, cfg.augment), train.images.shape[-1])], mean, std)
    images = BatchReader(train.images, device)  # a store's rows are read by index, never copied whole
    labels = train.labels.to(device)
    batch, total = training_steps(len(train), cfg)
    order = BatchOrder(len(train), batch, seed)

    def loss_at(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = order(step)  # (B,)
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, step, 7))
        x = recipe(images.read(index), g)[0].contiguous(memory_format=fmt)  # (B, C, *S)
        y = labels[index.to(device)]  # (B, L)
        return supervised_loss(forward_logits(model, x, device, autocast_dtype), y, multi_label), {}

    def score_val() -> dict[str, float]:
        scores = predict_scores(model, val.images, mean, std, device, multi_label, autocast_dtype, channels_last)
        return evaluate(val.labels.numpy(), scores, task)

    patience = patience_evals(cfg, total)
    try:
        metrics, steps = fit_on_val(model, opt, loss_at, total, cfg.lr, cfg.eval_every, patience, score_val,
                                    "fine-tuning", on_metrics)
    finally:
        images.close()
    return model, metrics, steps


# ------------------------------------------------------------------------------ the learning-rate grid


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: the head's learning rate and the encoder's scale of it."""

    lr: float
    encoder_lr_scale: float


# A trained protocol as tune() calls it: (config with the candidate's lr and budget, encoder
# learning-rate scale, on_metrics) -> (model at its best val ACC, its val metrics, steps).
TrainFn = Callable[[FinetuneConfig, float, "OnMetrics | None"], tuple[nn.Module, dict[str, float], int]]


@dataclass
class Tuned:
    """What :func:`tune` found: the model (best weights, eval mode), its val metrics, its steps,
    the chosen candidate and each candidate's short-budget result (empty when the grid had one)."""

    model: nn.Module
    val: dict[str, float]
    steps: int
    chosen: Candidate
    search: list[dict[str, float]] = field(default_factory=list)


def candidates(cfg: FinetuneConfig, encoder_lr_scale: float) -> list[Candidate]:
    """The grid ``lr_grid x encoder_lr_scale_grid`` (``cfg.lr`` / ``encoder_lr_scale`` where a grid
    is None), from the lowest learning rate up (the order ties are broken in)."""
    lrs = cfg.lr_grid if cfg.lr_grid is not None else (cfg.lr,)
    scales = cfg.encoder_lr_scale_grid if cfg.encoder_lr_scale_grid is not None else (encoder_lr_scale,)
    return sorted({Candidate(float(a), float(s)) for a in lrs for s in scales},
                  key=lambda c: (c.lr, c.encoder_lr_scale))


def best_candidate(results: list[tuple[Candidate, dict[str, float]]]) -> int:
    """Index of the best (candidate, val metrics) pair: highest val ACC, then AUC; on a tie the
    lower learning rate, then the lower encoder scale (the gentler change of the encoder)."""
    order = sorted(range(len(results)), key=lambda i: (results[i][0].lr, results[i][0].encoder_lr_scale))
    best = order[0]
    for i in order[1:]:
        if val_key(results[i][1]) > val_key(results[best][1]):
            best = i
    return best


def search_budget(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with ``search_fraction`` of its budget: epochs (at least one) and min_steps scaled."""
    f = cfg.search_fraction
    return dataclasses.replace(cfg, epochs=max(1, math.ceil(f * cfg.epochs)), min_steps=math.ceil(f * cfg.min_steps))


def tune(train: TrainFn, cfg: FinetuneConfig, encoder_lr_scale: float, on_metrics: OnMetrics | None = None) -> Tuned:
    """Choose the learning rate of a trained protocol on val, then train it.

    Steps:
        1. ``candidates``: the grid (``encoder_lr_scale`` stands in for a None scale grid).
        2. One candidate: trained once with the full budget, nothing searched (a grid of one
           value reproduces the protocol without a search exactly).
        3. Otherwise each candidate is trained with ``search_budget(cfg)`` (``train`` keeps its
           seed, so every candidate sees the same initialisation, batches and views).
        4. ``best_candidate`` on val.
        5. The winner trained again with the full budget; with ``search_fraction == 1`` the
           candidate's own training is that, and it is kept (its records replayed to ``on_metrics``).

    Cost: ``1 + len(grid) * search_fraction`` trainings (2.5 by default), or ``len(grid)`` at 1.

    ``on_metrics`` receives the records of the final training only.
    """
    grid = candidates(cfg, encoder_lr_scale)
    if len(grid) == 1:
        c = grid[0]
        model, val, steps = train(dataclasses.replace(cfg, lr=c.lr), c.encoder_lr_scale, on_metrics)
        return Tuned(model, val, steps, c)
    short = search_budget(cfg)
    keep = cfg.search_fraction == 1
    results: list[tuple[Candidate, dict[str, float]]] = []
    search: list[dict[str, float]] = []
    kept: tuple[nn.Module, int, list[dict[str, Any]]] | None = None
    for c in grid:
        records: list[dict[str, Any]] = []
        model, val, steps = train(dataclasses.replace(short, lr=c.lr), c.encoder_lr_scale, records.append)
        results.append((c, val))
        search.append(dict(lr=c.lr, encoder_lr_scale=c.encoder_lr_scale, steps=steps,
                           **{f"val_{k}": float(v) for k, v in val.items()}))
        if keep and best_candidate(results) == len(results) - 1:
            kept = (model, steps, records)  # only the best so far is held in memory
        del model
    i = best_candidate(results)
    chosen, val = results[i]
    if keep:
        assert kept is not None
        model, steps, records = kept
        for record in records if on_metrics is not None else ():
            on_metrics(record)
        return Tuned(model, val, steps, chosen, search)
    model, val, steps = train(dataclasses.replace(cfg, lr=chosen.lr), chosen.encoder_lr_scale, on_metrics)
    return Tuned(model, val, steps, chosen, search)
