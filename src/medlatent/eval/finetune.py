"""Fine-tuning protocol: encoder + linear head trained on labelled images, early stopping on val.

The same function trains the supervised baseline (a freshly initialised encoder of the same
architecture, full learning rate), so every table can carry the row a reviewer asks for:
"and how does that compare with training from scratch on the same labels?"
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import progress
from medlatent.augment.views import ViewRecipe, geometric_only, resolve
from medlatent.config import ViewConfig
from medlatent.data.catalogue import MULTI_LABEL
from medlatent.train.batches import BatchReader
from medlatent.data.store import ImageSet, epoch_batches, mix_seed
from medlatent.eval.features import predict_scores
from medlatent.eval.metrics import evaluate
from medlatent.train.optim import lr_at


@dataclass
class FinetuneConfig:
    """How a labelled encoder is trained."""

    # Most epochs; early stopping usually ends sooner. Small label fractions get more epochs
    # (min_steps), so 1 % of the labels still means a few hundred optimiser steps.
    epochs: int = 30
    min_steps: int = 300
    batch_size: int = 128
    # Head learning rate (AdamW); the encoder's is lr * encoder_lr_scale (0.1 keeps pretrained
    # features from being washed out early; the supervised baseline uses 1.0).
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    # Layer-wise decay (BEiT/MAE fine-tuning): block i of n gets decay^(n - i) of the encoder
    # learning rate. None: one learning rate for the whole encoder.
    layer_decay: float | None = None
    weight_decay: float = 1e-4
    # Evaluate on val every this many optimiser steps (and at the last step).
    eval_every: int = 50
    # Stop after this many evaluations without a better val ACC.
    patience: int = 6
    # Light augmentation (crop 0.8-1, flips where the data allow them).
    augment: bool = True
    # Normalise the features before the head with a BatchNorm without affine parameters (MAE's
    # linear-probing recipe, He et al. 2022): frozen ViT features have very uneven scales.
    feature_norm: bool = False


class Classifier(nn.Module):
    """Encoder (B, C, *S) -> (B, D) followed by a linear head -> (B, K) logits; with
    ``feature_norm`` the head is BatchNorm1d(affine=False) then Linear."""

    def __init__(self, encoder: nn.Module, n_outputs: int, feature_norm: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        linear = nn.Linear(encoder.out_dim, n_outputs)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.out_dim, affine=False), linear) if feature_norm else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


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


def finetune(encoder: nn.Module, train: ImageSet, val: ImageSet, task: str, n_outputs: int, mean: list[float],
             std: list[float], data_name: str, cfg: FinetuneConfig, device: torch.device, seed: int = 0,
             encoder_lr_scale: float | None = None, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False, on_metrics: Callable[[dict[str, Any]], None] | None = None,
             ) -> tuple[Classifier, dict[str, float], int]:
    """Train ``encoder`` + a linear head on ``train``; keep the weights best on ``val``.

    ``on_metrics(record)``, when given, receives a record at every validation (``eval_every``
    steps): ``step``, ``loss`` (that step's training loss), ``lr`` (the head's), ``val_acc``,
    ``val_auc`` (e.g. for an experiment tracker; the loss is read back only then).

    Returns:
        (model at its best val ACC, its val metrics, optimiser steps taken).
    """
    torch.manual_seed(seed)
    model = train_mode(Classifier(copy.deepcopy(encoder), n_outputs, cfg.feature_norm).to(device))
    fmt = torch.channels_last if channels_last and train.images.dim() == 4 else torch.contiguous_format
    model.to(memory_format=fmt)
    scale = cfg.encoder_lr_scale if encoder_lr_scale is None else encoder_lr_scale
    opt = torch.optim.AdamW(param_groups(model, cfg, scale), lr=cfg.lr)
    multi_label = task == MULTI_LABEL
    base = resolve(ViewConfig(), data_name)
    view = geometric_only(base, (0.8, 1.0))
    if not cfg.augment:
        view = dataclasses.replace(view, crop_scale=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=0.0)
    size = train.images.shape[-1]
    recipe = ViewRecipe([(view, size)], mean, std)
    images = BatchReader(train.images, device)  # a store's rows are read by index, never copied whole
    labels = train.labels.to(device)
    batch = min(cfg.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // batch)
    total = max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    best_key, best_state, best_metrics, bad_evals = None, None, {}, 0
    step = 0
    while step < total:
        for index in epoch_batches(len(train), batch, seed, step // steps_per_epoch):
            g = torch.Generator(device=device).manual_seed(mix_seed(seed, step, 7))
            x = recipe(images.read(index), g)[0].contiguous(memory_format=fmt)
            y = labels[index.to(device)]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, 0, cfg.lr, 0.01) * group["lr_scale"]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(x).float()
            loss = (F.binary_cross_entropy_with_logits(logits, y.float()) if multi_label
                    else F.cross_entropy(logits, y[:, 0]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress.report("fine-tuning", step, total)
            if step % cfg.eval_every == 0 or step == total:
                scores = predict_scores(model, val.images, mean, std, device, multi_label, autocast_dtype, channels_last)
                metrics = evaluate(val.labels.numpy(), scores, task)
                if on_metrics is not None:
                    on_metrics(dict(step=step, loss=float(loss.detach()), lr=lr_at(step - 1, total, 0, cfg.lr, 0.01),
                                    **{f"val_{k}": float(v) for k, v in metrics.items()}))
                key = (metrics["acc"], np.nan_to_num(metrics["auc"]))
                if best_key is None or key > best_key:
                    best_key, best_metrics, bad_evals = key, metrics, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_evals += 1
                train_mode(model)
                if bad_evals >= cfg.patience:
                    total = step  # early stop
            if step >= total:
                break
    images.close()
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval(), best_metrics, step
