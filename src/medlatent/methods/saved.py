"""Opening a saved run: its config (upgraded to today's option defaults), its encoder, its
whole method. Every family and evaluation reads runs through these, so the checkpoint layout
and the fall-back over damaged checkpoints live in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medlatent.config import PretrainConfig, from_dict, load_yaml
from medlatent.data.folders import center_square
from medlatent.errors import CheckpointError, DataError
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
    if "stem" not in (load_yaml(run.config_file).get("backbone") or {}):
        cfg.backbone.stem = "cifar"  # every run before backbone.stem existed used the CIFAR stem
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


# ------------------------------------------------------------------------- an encoder that knows its input


class LoadedEncoder(nn.Module):
    """A run's encoder together with the preprocessing it was trained with.

    It *is* the encoder (``forward`` runs it on an already-preprocessed batch, so it drops into
    any PyTorch code) and it knows what that batch must be: :meth:`preprocess` turns raw images
    into it, :meth:`embed` does both under ``no_grad``, in batches. ``medlatent.load_encoder``
    returns one::

        enc = medlatent.load_encoder("runs/blood-simclr")
        z = enc.embed(images)          # (N, H, W[, C]) or (N, C, H, W) uint8 -> (N, enc.out_dim)

    Attributes:
        encoder: the bare encoder (MONAI ResNet or our ViT, MONAI parameter names).
        image_size, in_channels, spatial_dims, out_dim: what it takes and gives.
        mean, std: the per-channel standardisation of ``data.json``.
        run, step, method, backbone, data: provenance (the run folder, the checkpoint's step,
            the method and backbone names, the pretraining data's name).
        meta: the run's ``data.json``.
    """

    def __init__(self, encoder: nn.Module, meta: dict[str, Any], step: int, run: Path, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.meta = dict(meta)
        self.step = step
        self.run = run
        self.method = cfg.method
        self.backbone = cfg.backbone.name
        self.data = str(meta.get("name", cfg.data.name))
        self.image_size = int(meta["image_size"])
        self.in_channels = int(encoder.in_channels)
        self.spatial_dims = int(encoder.spatial_dims)
        self.out_dim = int(encoder.out_dim)
        self.mean = [float(m) for m in meta["mean"]]
        self.std = [float(s) for s in meta["std"]]
        self.prefers_channels_last = bool(getattr(encoder, "prefers_channels_last", False))
        self._precision = cfg.train.precision  # what the run's evaluation computes in (medlatent embed)
        self._channels_last = cfg.train.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) preprocessed images -> (B, out_dim)."""
        return self.encoder(x)

    def __iter__(self):  # noqa: ANN204 - old callers unpack (encoder, data.json, step)
        """``encoder, meta, step = load_encoder(run)`` keeps working (the bare encoder first)."""
        return iter((self.encoder, self.meta, self.step))

    def preprocess(self, images: Any) -> torch.Tensor:
        """Raw images -> the normalised float32 batch the encoder takes, (B, C, *[image_size]).

        Args:
            images: a numpy array or tensor, (B, H, W), (B, H, W, C) or (B, C, H, W) (3-D runs:
                (B, D, H, W), (B, D, H, W, C) or (B, C, D, H, W)); uint8 (divided by 255), other
                integers (divided by their type's maximum, as image folders are read), or float
                in [0, 1]. Grayscale is repeated for a 3-channel encoder and an alpha channel
                dropped; images of another size are centre-cropped to a square and resized
                (antialiased when shrinking 2-D images), as image folders are prepared
                (``medlatent.data.folders.prepare_image``).

        Raises:
            DataError: a shape that is not a batch of images, or RGB images for a grayscale encoder.
        """
        from medlatent.augment import ops

        x = self._channels_first(_as_tensor(images))  # (B, C, *S)
        x = _unit_range(x)
        c = x.shape[1]
        if c == 4 and self.in_channels == 3:
            x = x[:, :3]  # RGBA: drop alpha, as image folders are read
        elif c == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, *x.shape[2:])
        elif c != self.in_channels:
            raise DataError(f"{self.run}: images have {c} channels but the encoder takes {self.in_channels}"
                            + (" (convert RGB to grayscale first)" if self.in_channels == 1 else ""))
        if tuple(x.shape[2:]) != (self.image_size,) * self.spatial_dims:
            x = ops.center_resize(center_square(x), self.image_size).clamp(0, 1)
        return ops.normalize(x, torch.tensor(self.mean, device=x.device), torch.tensor(self.std, device=x.device))

    @torch.no_grad()
    def embed(self, images: Any, batch_size: int = 512, precision: str = "run") -> torch.Tensor:
        """``forward(preprocess(images))`` in batches, without gradients: (N, out_dim) float32 on the CPU.

        Args:
            images: as :meth:`preprocess` takes them.
            batch_size: images per forward pass (512, as evaluation uses).
            precision: "run" computes as the run's evaluation does (``train.precision``: bf16
                autocast where the hardware is fast at it, so the result equals what
                ``medlatent embed`` writes), or "fp32", "bf16", "auto".
        """
        from medlatent.train.precision import memory_format, resolve_channels_last, resolve_precision

        device = next(self.encoder.parameters()).device
        autocast = resolve_precision(self._precision if precision == "run" else precision,  # type: ignore[arg-type]
                                     device)
        channels_last = resolve_channels_last(self._channels_last, self.encoder)
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(images), batch_size):
                x = self.preprocess(images[start:start + batch_size]).to(device)
                if channels_last:
                    x = x.contiguous(memory_format=memory_format(self.spatial_dims))
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    out.append(self.encoder(x).float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.out_dim)
        return torch.cat(out)

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S), (B, *S, C) or (B, C, *S) -> (B, C, *S); channel-first wins when both could be."""
        d = self.spatial_dims
        if x.dim() == d + 1:
            return x.unsqueeze(1)
        if x.dim() == d + 2:
            channels = {1, 3, 4, self.in_channels}
            if x.shape[1] in channels:
                return x
            if x.shape[-1] in channels:
                return x.movedim(-1, 1)
        layouts = ("(B, D, H, W), (B, D, H, W, C) or (B, C, D, H, W)" if d == 3
                   else "(B, H, W), (B, H, W, C) or (B, C, H, W)")
        raise DataError(f"{self.run}: images of shape {tuple(x.shape)} are not a batch of {d}-D images; "
                        f"expected {layouts}")


def _as_tensor(images: Any) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    import numpy as np

    a = np.asarray(images)
    if a.dtype.kind not in "uifb":
        raise DataError(f"images of dtype {a.dtype} are not numbers")
    if a.dtype == np.uint16 or a.dtype == np.uint32 or a.dtype == np.uint64:  # torch has no such dtypes
        a = a.astype(np.float64) / np.iinfo(a.dtype).max
    return torch.from_numpy(np.ascontiguousarray(a))


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 /255 (as evaluation does), other integers over their type's range, floats as they are."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.dtype == torch.bool:
        return x.float()
    if not x.dtype.is_floating_point:
        info = torch.iinfo(x.dtype)
        return (x.double().clamp_(min=0) / info.max).float()
    return x.float()


def open_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """The newest encoder of a run as a :class:`LoadedEncoder` (in eval mode, on ``device``).

    Raises:
        CheckpointError: the folder is not a run, or it has no checkpoint yet.
    """
    encoder, meta, step = load_encoder(run_dir, device)
    run = RunDir(Path(run_dir))
    return LoadedEncoder(encoder, meta, step, run.path, read_config(run)).eval()
