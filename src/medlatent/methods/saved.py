"""Opening a saved run: its config (upgraded to today's option defaults), its encoder, its
whole method. Every family and evaluation reads runs through these, so the checkpoint layout
and the fall-back over damaged checkpoints live in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medlatent.config import PretrainConfig, from_dict
from medlatent.errors import CheckpointError
from medlatent.methods.contract import BuildContext
from medlatent.methods.registry import get_method, upgrade_saved_options
from medlatent.nets.backbones import build_backbone
from medlatent.train import checkpoint
from medlatent.train.runs import RunDir


def read_config(run: RunDir) -> PretrainConfig:
    """The run's config with method options added since it was written filled in as the run
    used them (``MethodSpec.upgrade_saved``)."""
    cfg = run.read_config()
    cfg.method_options = upgrade_saved_options(cfg.method, cfg.method_options)
    return cfg



def load_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], int]:
    """The newest encoder of a run: (encoder in eval mode, data.json contents, its step).

    Raises:
        CheckpointError: the folder is not a run, or it has no checkpoint yet.
    """
    run = RunDir(Path(run_dir))
    cfg = read_config(run)
    try:
        ckpt = checkpoint.latest(run.checkpoints, with_optimizer=False)
    except CheckpointError:
        if not run.encoder_file.is_file():
            raise
        ckpt = None  # every checkpoint is damaged: the final encoder file still holds the weights
    if ckpt is not None:
        checkpoint.warn(ckpt)
        source, step = ckpt.path, ckpt.step
        weights = {k[len("encoder."):]: v for k, v in ckpt.model.items() if k.startswith("encoder.")}
    elif run.encoder_file.is_file():  # a finished run whose checkpoints were pruned keeps its encoder
        source, weights = run.encoder_file, checkpoint.load_tensors(run.encoder_file)
        step = int(run.read_json("encoder_step.json")["step"]) if (run.path / "encoder_step.json").is_file() else -1
    else:
        raise CheckpointError(f"{run.path}: has no checkpoint yet (a run writes its first one at the end of "
                              f"epoch 1); nothing to evaluate")
    meta = run.read_json("data.json")
    encoder = build_backbone(cfg.backbone, meta["channels"], meta["image_size"], meta["spatial_dims"])
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: encoder weights do not match {cfg.backbone.name} "
                              f"(missing {len(missing)}, unexpected {len(unexpected)})")
    return encoder.to(device).eval(), meta, step


def load_method(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], int]:
    """The whole method of a run (encoder, heads, decoders, teachers) from its newest checkpoint."""
    run = RunDir(Path(run_dir))
    cfg = read_config(run)
    ckpt = checkpoint.latest(run.checkpoints, with_optimizer=False)
    if ckpt is None:
        raise CheckpointError(f"{run.path}: has no checkpoint yet; nothing to show")
    checkpoint.warn(ckpt)
    meta = run.read_json("data.json")
    spec = get_method(cfg.method)
    options = from_dict(spec.options, cfg.method_options, "method_options")
    encoder = build_backbone(cfg.backbone, meta["channels"], meta["image_size"], meta["spatial_dims"])
    context = BuildContext(meta["n_images"], cfg.train.batch_size, meta["image_size"], meta["channels"],
                           meta["spatial_dims"], meta.get("condition_classes", 0))
    method = spec.build(encoder, options, context)
    method.load_state_dict(ckpt.model)
    return method.to(device).eval(), meta, ckpt.step
