"""Semi-supervised learning as a label-efficiency protocol: FixMatch (Sohn et al., "FixMatch:
Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020).

The labelled fraction of the train split is trained with cross-entropy on weak views; the rest of
the train split, its labels dropped, adds a consistency term: the model's prediction on a weak
view of an unlabelled image becomes a hard pseudo-label where it is confident (max probability
>= tau), and the prediction on a strong view of the same image is trained towards it
(:class:`~medlatent.losses.FixMatchLoss`). It starts from random weights (protocol
``semi-scratch``) or from the run's pretrained encoder (``semi``); the optimiser, schedule,
budget, validation, early stopping and the learning-rate grid are fine-tuning's
(:mod:`medlatent.eval.finetune`), so its rows compare with the other protocols' directly.

Views come from the batched augmentation (:mod:`medlatent.augment.views`): the weak view is
fine-tuning's (crop 0.8-1, flips where the data allow); the strong view stands in for the
paper's RandAugment + Cutout with the project's strong photometric distortion (:func:`strong_view`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from medlatent.augment.views import ViewRecipe, blur_sigma, resolve
from medlatent.config import ViewConfig, bounded
from medlatent.data.catalogue import MULTI_LABEL
from medlatent.data.store import ImageSet, mix_seed
from medlatent.errors import ConfigError
from medlatent.eval.features import predict_scores
from medlatent.eval.finetune import (BatchOrder, Classifier, FinetuneConfig, OnMetrics, finetune_view, fit_on_val,
                                     forward_logits, memory_format, param_groups, patience_evals, supervised_loss,
                                     train_mode, training_steps)
from medlatent.eval.metrics import evaluate
from medlatent.losses.fixmatch import FixMatchLoss
from medlatent.train.batches import BatchReader


@dataclass
class SemiConfig:
    """FixMatch's own settings; the rest (learning-rate grid, budget, batch size, early stopping)
    is the :class:`~medlatent.eval.finetune.FinetuneConfig` of the other trained protocols."""

    # Confidence a weak view's prediction needs to become a pseudo-label: the paper's 0.95 (its
    # ablation, Fig. 3: lower thresholds admit more wrong labels and do worse).
    tau: float = bounded(0.95, gt=0, le=1)
    # Weight of the unlabelled loss in l_s + lambda_u * l_u: the paper's 1.
    lambda_u: float = bounded(1.0, ge=0)
    # Unlabelled images per labelled one in a batch. The paper uses 7 (with B = 64); each
    # unlabelled image is two views through the network, so a step costs (1 + 2 mu) fine-tuning
    # steps: 15x at 7, 5x at 2. On a CPU at 28 px 2 keeps a FixMatch training at the cost of a
    # few fine-tunings, and still shows the unlabelled images twice as often as the labelled ones.
    mu: int = bounded(2, ge=1)


def strong_view(data_name: str, size: int) -> ViewConfig:
    """FixMatch's strong view from the project's ops (the paper's RandAugment + Cutout is not
    copied): crop 0.5-1 of the area and the weak view's flips; colour jitter for RGB at SimCLR's
    full strength (s = 1, p = 0.8, random grayscale p = 0.2; both off where colour is the class:
    ``augment.views.resolve``) or intensity jitter for grayscale (p = 0.8); Gaussian blur p = 0.5
    (sigma from ``blur_sigma(size)``); solarisation p = 0.2; Gaussian noise p = 0.5. Strong enough
    that the strong view's prediction differs from the weak one's, none of it a change of the label."""
    return resolve(ViewConfig(crop_scale=(0.5, 1.0), color_jitter_strength=1.0, blur=0.5, blur_sigma=blur_sigma(size),
                              solarize=0.2, noise=0.5), data_name)


def unlabelled_rows(n: int, labelled: torch.Tensor) -> torch.Tensor:
    """The rest of the train split: (M,) rows not in ``labelled``; all ``n`` when every label is
    used (100 %: FixMatch's unlabelled set holds the labelled images too, their labels dropped)."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[labelled] = False
    return rest.nonzero()[:, 0] if bool(rest.any()) else torch.arange(n)


def fixmatch(encoder: nn.Module, train: ImageSet, labelled: torch.Tensor, val: ImageSet, task: str, n_outputs: int,
             mean: list[float], std: list[float], data_name: str, cfg: FinetuneConfig, semi: SemiConfig,
             device: torch.device, seed: int = 0, encoder_lr_scale: float | None = None,
             autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
             on_metrics: OnMetrics | None = None) -> tuple[Classifier, dict[str, float], int]:
    """Train ``encoder`` + a linear head with FixMatch on ``train``: its rows ``labelled`` with
    their labels, every other row without; keep the weights best on ``val``.

    Steps:
        1. model and optimiser as fine-tuning builds them (``cfg.lr``, ``encoder_lr_scale``).
        2. each step: B labelled rows (B = ``cfg.batch_size``, their own epoch order) and
           ``mu B`` unlabelled rows; a weak view of each labelled image, a weak and a strong
           view of each unlabelled one.
        3. one forward pass of the three batches together (batch-norm statistics over all, as
           the paper's implementation does).
        4. ``loss = CE(labelled) + lambda_u * FixMatchLoss(weak, strong)``; the pseudo-labels
           carry no gradient.
        5. :func:`~medlatent.eval.finetune.fit_on_val`: cosine schedule, val every
           ``eval_every`` steps, best weights kept, early stopping. The budget counts labelled
           batches, as fine-tuning's does.

    ``on_metrics`` records also hold ``loss_x``, ``loss_u`` and ``mask_rate`` (the share of
    unlabelled images whose pseudo-label passed tau) of the step.

    Args:
        train: the whole train split, (N, C, *S) images, (N, L) labels (only ``labelled``'s read).
        labelled: (M,) rows of ``train`` whose labels are used.

    Returns:
        (model at its best val ACC, its val metrics, optimiser steps taken).

    Raises:
        ConfigError: a multi-label task (FixMatch's pseudo-labels are one class per image).
    """
    if task == MULTI_LABEL:
        raise ConfigError(f"{data_name}: semi-supervised learning (FixMatch) needs one class per image; "
                          f"this task is {task}")
    labelled = torch.as_tensor(labelled).long()
    rest = unlabelled_rows(len(train), labelled)  # (U,)
    torch.manual_seed(seed)
    model = train_mode(Classifier(copy.deepcopy(encoder), n_outputs, cfg.feature_norm).to(device))
    fmt = memory_format(channels_last, train.images)
    model.to(memory_format=fmt)
    scale = cfg.encoder_lr_scale if encoder_lr_scale is None else encoder_lr_scale
    opt = torch.optim.AdamW(param_groups(model, cfg, scale), lr=cfg.lr)
    size = train.images.shape[-1]
    weak = finetune_view(data_name, cfg.augment)
    weak_recipe = ViewRecipe([(weak, size)], mean, std)
    pair_recipe = ViewRecipe([(weak, size), (strong_view(data_name, size), size)], mean, std)
    consistency = FixMatchLoss(semi.tau)
    labels = train.labels[labelled].to(device)  # (M, L)
    batch, total = training_steps(len(labelled), cfg)
    lab_order = BatchOrder(len(labelled), batch, seed)
    unl_batch = min(semi.mu * batch, len(rest))
    unl_order = BatchOrder(len(rest), unl_batch, mix_seed(seed, 1))
    lab_images = BatchReader(train.images, device)  # rows read by index: a store is never copied whole
    unl_images = BatchReader(train.images, device)

    def loss_at(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        li = lab_order(step)  # (B,) positions in ``labelled``
        ui = rest[unl_order(step)]  # (mu B,) rows of the train split
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, step, 7))
        x = weak_recipe(lab_images.read(labelled[li]), g)[0]  # (B, C, *S)
        u_weak, u_strong = pair_recipe(unl_images.read(ui), g)  # (mu B, C, *S) each
        both = torch.cat([x, u_weak, u_strong]).contiguous(memory_format=fmt)  # (B + 2 mu B, C, *S)
        logits = forward_logits(model, both, device, autocast_dtype)  # (B + 2 mu B, K)
        lx, (lw, ls) = logits[:len(x)], logits[len(x):].chunk(2)
        loss_x = supervised_loss(lx, labels[li.to(device)], multi_label=False)
        loss_u, mask = consistency(lw, ls)
        loss = loss_x + semi.lambda_u * loss_u
        return loss, dict(loss_x=loss_x.detach(), loss_u=loss_u.detach(), mask_rate=mask.mean())

    def score_val() -> dict[str, float]:
        scores = predict_scores(model, val.images, mean, std, device, False, autocast_dtype, channels_last)
        return evaluate(val.labels.numpy(), scores, task)

    patience = patience_evals(cfg, total)
    try:
        metrics, steps = fit_on_val(model, opt, loss_at, total, cfg.lr, cfg.eval_every, patience, score_val,
                                    "semi-supervised", on_metrics)
    finally:
        lab_images.close()
        unl_images.close()
    return model, metrics, steps
