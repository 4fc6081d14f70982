"""The training loop: views -> method -> loss -> optimiser step, with checkpoints and metrics.

Randomness is a pure function of (seed, step, slice): the batch order of epoch e comes from a
generator seeded by (seed, e) (a mixture with ``data.weights``:
:func:`~medlatent.data.mixture.mixture_batches`); the global batch of step s is cut into
``train.view_shards`` slices (default: one per process) and slice k's views come from a generator seeded by
(seed, s, k). A run resumed from the checkpoint of step s therefore replays exactly what an
uninterrupted run does, with no RNG state to save, and the views do not depend on how many
processes share the batch. Images are read through :class:`~medlatent.train.batches.BatchReader`
(on the device, or gathered by index from a memory-mapped store with one batch read ahead).
Nothing here prints; progress goes to the ``on_progress`` callback.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from medlatent import dist
from medlatent.augment.views import ViewRecipe
from medlatent.config import PretrainConfig
from medlatent.data.mixture import batch_order
from medlatent.data.store import mix_seed
from medlatent.errors import CheckpointError, ConfigError, TrainingDiverged
from medlatent.train import checkpoint
from medlatent.train.batches import BatchReader
from medlatent.train.optim import build_optimizer, lr_at, scaled_lr
from medlatent.train.precision import memory_format, trunk
from medlatent.train.runs import RunDir
from medlatent.train.trackers import Trackers


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class FitResult:
    """How a call to :func:`fit` ended."""

    step: int
    total_steps: int
    status: str  # "finished", "budget" (time budget reached) or "stopped" (asked to stop)
    wall_s: float


@dataclass
class Progress:
    """What the progress callback receives after every step.

    ``loss`` is the mean loss of the last logged window (``train.log_every`` steps, as in
    ``metrics.jsonl``); None until the first window has been read back."""

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    lr: float
    images_per_s: float
    eta_s: float


def fit(method: nn.Module, images: torch.Tensor, recipe: ViewRecipe, cfg: PretrainConfig, run: RunDir,
        device: torch.device, autocast_dtype: torch.dtype | None, channels_last: bool,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_epoch_end: Callable[[int, int], None] | None = None,
        labels: torch.Tensor | None = None, trackers: Trackers | None = None,
        images_resident: bool | None = None) -> FitResult:
    """Train ``method`` on ``images`` (N, C, *S) for ``cfg.train.epochs``, resuming if ``run``
    holds a checkpoint.

    ``labels`` (N,), when given, are passed with the views: ``method(views, labels[index])``
    (class-conditional generative models). ``on_epoch_end(epochs_done, step)`` runs on the main process after each epoch's checkpoint.
    ``trackers`` (main process) get every metrics record as it is written to ``metrics.jsonl``.
    ``images_resident``: copy ``images`` to the device once (True) or gather each batch by index
    on the CPU with one batch read ahead (False); None decides
    (:func:`medlatent.train.batches.keep_on_device`: a memory-mapped store is never copied whole).

    Under torchrun each process takes its ``batch_size / processes`` rows of every global batch
    and draws the views of the ``view_shards`` slices those rows make up (see the module note).

    Raises:
        TrainingDiverged: the loss became NaN/inf; the last good checkpoint is kept.
    """
    t = cfg.train
    world, rank = dist.world_size(), dist.rank()
    if t.batch_size % world:
        raise CheckpointError(f"train.batch_size {t.batch_size} is not divisible by {world} processes")
    per_rank = t.batch_size // world
    shards = t.view_shards or world
    if t.batch_size % shards or shards % world:
        raise ConfigError(f"train.view_shards: {shards} must divide train.batch_size {t.batch_size} and be a "
                          f"multiple of the {world} processes")
    per_shard = t.batch_size // shards
    my_shards = range(rank * shards // world, (rank + 1) * shards // world)  # the slices of this process's rows
    steps_per_epoch = len(images) // t.batch_size
    total = max(1, round(t.epochs * steps_per_epoch))  # epochs may be fractional
    # Warm-up never takes more than a fifth of the run (a one-epoch run would otherwise end warming up).
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total // 5)
    peak_lr = scaled_lr(cfg.optim, t.batch_size)
    spatial_dims = images.dim() - 2

    # --- model, optimiser, resume ----------------------------------------------------------
    method.to(device)
    if channels_last:
        method.to(memory_format=memory_format(spatial_dims))
    optimizer = build_optimizer(method, cfg.optim, peak_lr)
    start = 0
    ckpt = checkpoint.latest(run.checkpoints)
    if ckpt is not None:
        checkpoint.warn(ckpt)
        method.load_state_dict(ckpt.model)
        if channels_last:
            method.to(memory_format=memory_format(spatial_dims))
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        start = ckpt.step
    if not dist.all_equal(start):  # before any rank writes: a rank that sees other checkpoints stops all
        raise CheckpointError(f"{run.checkpoints}: the processes found different checkpoints to resume from "
                              f"(this one: step {start}); the run folder must be one folder every node reads")
    if ckpt is not None:
        if dist.is_main():
            run.truncate_metrics(start)
            if trackers is not None:
                trackers.resume_at(start)
    if start >= total:
        return FitResult(start, total, "finished", 0.0)
    model: nn.Module = method
    if world > 1:
        # Batch norm over the global batch on GPUs; PyTorch's SyncBatchNorm has no CPU kernel,
        # so CPU processes normalise over their own share of the batch.
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(method) if device.type == "cuda" else method
        ids = None  # CPU; on CUDA this process's GPU (dist.init_from_env chose it from LOCAL_RANK)
        if device.type == "cuda":
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        model = nn.parallel.DistributedDataParallel(synced, device_ids=ids)
    if t.compile:
        trunk(method).compile()
    reader = BatchReader(images, device, images_resident)
    if labels is not None:
        labels = labels.to(device)

    @functools.lru_cache(maxsize=2)  # this epoch's order and the next one's (read ahead at its edge)
    def order(e: int) -> list[torch.Tensor]:
        return batch_order(images, t.batch_size, t.seed, e)  # a mixture's weighted shares, else a shuffle

    def rows(s: int) -> torch.Tensor:
        """This process's rows of step s's global batch (CPU), (per_rank,)."""
        return order(s // steps_per_epoch)[s % steps_per_epoch][rank * per_rank:(rank + 1) * per_rank]

    def save(step: int) -> None:
        if dist.is_main():
            checkpoint.save(run.checkpoints, step, method, optimizer,
                            dict(epoch=step // steps_per_epoch, total_steps=total), keep=t.keep_checkpoints)

    # --- the loop ----------------------------------------------------------------------------
    # Losses stay on the device and are read back only every log_every steps and before each
    # checkpoint: one host sync per window instead of per step (it matters on a GPU). A
    # non-finite loss is found at the next read-back, before any checkpoint could hold it.
    wall0 = time.perf_counter()
    last_ckpt = time.perf_counter()
    window = _Window(start)
    status = "finished"
    step = start
    try:
        for step in range(start, total):
            epoch = step // steps_per_epoch
            index = rows(step)  # (per_rank,) on the CPU
            x = reader.read(index, rows(step + 1) if step + 1 < total else None)  # (per_rank, C, *S)
            # dropout, masking inside methods: seeded by this process's first slice (one slice
            # per process: what runs always did; several slices in one process draw for all of
            # them at once, so methods that draw here differ from one process per slice)
            torch.manual_seed(mix_seed(t.seed, step, my_shards[0], 1))
            views = _slice_views(recipe, x, per_shard, my_shards, t.seed, step, device)  # [(B, C, *S), ...]
            if channels_last:
                views = [v.contiguous(memory_format=memory_format(spatial_dims)) for v in views]
            lr = lr_at(step, total, warmup, peak_lr, cfg.optim.final_lr_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                out = model(views) if labels is None else model(views, labels[index.to(device)])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.optim.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            method.on_step_end(step, total)
            window.add(out.loss.detach(), out.logs)

            # --- bookkeeping -----------------------------------------------------------------
            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            due = (t.checkpoint_every and done % t.checkpoint_every == 0) or (not t.checkpoint_every and epoch_end)
            due = due or (t.checkpoint_seconds and time.perf_counter() - last_ckpt > t.checkpoint_seconds)
            over_budget = bool(t.time_budget_s) and time.perf_counter() - wall0 > t.time_budget_s
            stop = should_stop is not None and should_stop()
            over_budget, stop = dist.any_rank(over_budget, stop)  # every process stops after the same step
            save_now = bool(due or done == total or over_budget or stop)
            if save_now or done % t.log_every == 0:
                record = window.flush(run, done, steps_per_epoch, lr, t.batch_size, wall0)  # raises on NaN
                if dist.is_main():
                    run.log(record)
                    if trackers is not None:
                        trackers.log_metrics(record)
            if on_progress is not None:
                rate = (done - start) / max(time.perf_counter() - wall0, 1e-9)
                on_progress(Progress(done, total, epoch, window.last_loss, lr, rate * t.batch_size,
                                     (total - done) / max(rate, 1e-9)))
            if save_now:
                save(done)
                last_ckpt = time.perf_counter()
                if trackers is not None and dist.is_main():
                    trackers.flush()  # what a resume will not write again is on disk with the checkpoint
            if epoch_end and on_epoch_end is not None and dist.is_main():
                on_epoch_end(done // steps_per_epoch, done)
            if over_budget or stop:
                status = "budget" if over_budget else "stopped"
                break
    finally:
        reader.close()
    return FitResult(step + 1, total, status, time.perf_counter() - wall0)


def _slice_views(recipe: ViewRecipe, x: torch.Tensor, per_shard: int, shards: range, seed: int, step: int,
                 device: torch.device) -> list[torch.Tensor]:
    """The views of this process's rows ``x`` (len(shards) * per_shard, C, *S): slice j of ``x``
    is global slice ``shards[j]``, drawn with the generator seeded by (seed, step, shards[j]), and
    the slices' views are concatenated in order (row order kept), [(B, C, *S), ...]."""
    parts = []
    for j, k in enumerate(shards):
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, step, k))
        parts.append(recipe(x[j * per_shard:(j + 1) * per_shard], g))
    if len(parts) == 1:
        return parts[0]
    return [torch.cat(same_view) for same_view in zip(*parts)]


class _Window:
    """Per-step losses and logs kept on the device until the next read-back."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step  # step index of the first entry
        self.losses: list[torch.Tensor] = []
        self.logs: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.last_loss: float | None = None  # mean loss of the last window read back

    def add(self, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        self.losses.append(loss.float())
        self.logs.append(logs)

    def flush(self, run: RunDir, done: int, steps_per_epoch: int, lr: float, batch_size: int,
              wall0: float) -> dict[str, Any]:
        """Read the window back: a metrics record, or TrainingDiverged at the first bad step."""
        values = torch.stack(self.losses).cpu()  # the one host sync of the window
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step = self.first_step + int(bad[0])
            value = float(values[int(bad[0])])
            last = checkpoint.list_checkpoints(run.checkpoints)
            if dist.is_main():
                run.log(dict(step=step, event="diverged", loss=str(value)))
            raise TrainingDiverged(
                f"loss became {value} at step {step} (epoch {step // steps_per_epoch}); training stopped, "
                f"last good checkpoint: {last[-1] if last else 'none (diverged before the first)'}")
        elapsed = time.perf_counter() - self.t0
        # Each logged term is averaged over the steps that report it (a staged method such as
        # latent diffusion logs different terms before and after its stage switch).
        keys = dict.fromkeys(k for d in self.logs for k in d)
        extra = {k: _mean([float(d[k]) for d in self.logs if k in d]) for k in keys}
        record = dict(step=done, epoch=done / steps_per_epoch, loss=float(values.mean()), lr=lr,
                      images_per_s=len(values) * batch_size / max(elapsed, 1e-9),
                      time_s=time.perf_counter() - wall0, **extra)
        self.last_loss = record["loss"]
        self.first_step = done
        self.losses, self.logs, self.t0 = [], [], time.perf_counter()
        return record
