"""Fit a training run's whole learning-rate schedule into a wall-clock budget: the one throughput
calibration of the benchmark scripts.

A short run of the same config (`calibration_sets`: a long schedule cut after a few seconds,
logged often) measures images per second; the epochs are then chosen so the cosine schedule
ends inside the budget (8 % margin for checkpoints and evaluation). Scripts that drive
`medlatent ...` commands calibrate the command (`calibrated_epochs`); pretrain_probe.py, which
builds its config in process, calibrates that config (`config_images_per_second`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medlatent.data.catalogue import split_size

if TYPE_CHECKING:
    from medlatent.config import PretrainConfig

# Epoch length assumed for a data set the catalogue does not hold (an .npz file, a folder).
UNCATALOGUED_TRAIN_IMAGES = 10000


def run_cli(*args: str) -> str:
    """Run `medlatent ARGS`; exit with its last error lines if it fails."""
    res = subprocess.run([sys.executable, "-m", "medlatent.cli.main", *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"medlatent {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def calibration_sets(seconds: float) -> list[str]:
    """The overrides that turn a run into its calibration: stopped after `seconds`, long before
    its (1000-epoch) schedule ends, with img/s logged every 2 steps."""
    return ["train.epochs=1000", f"train.time_budget_s={seconds}", "train.log_every=2"]


def images_per_second(train_args: list[str], tmp: Path, seconds: float = 25.0) -> float:
    """Median img/s of a `seconds`-long run of `medlatent TRAIN_ARGS` (first log window dropped)."""
    sets = [a for s in calibration_sets(seconds) for a in ("--set", s)]
    return _measure(lambda run: run_cli(*train_args, *sets, "--output", str(run)), tmp, " ".join(train_args))


def config_images_per_second(config: PretrainConfig, tmp: Path, seconds: float = 25.0) -> float:
    """The same measurement, in this process, of a `PretrainConfig` built here."""
    from medlatent.api import run_pretraining
    from medlatent.config import PretrainConfig, apply_set, from_dict, to_dict

    tree = to_dict(config)
    for s in calibration_sets(seconds):
        apply_set(tree, s)
    return _measure(lambda run: run_pretraining(from_dict(PretrainConfig, tree), run), tmp, "the calibration run")


def _measure(train: Callable[[Path], object], tmp: Path, what: str) -> float:
    """Run `train(tmp)` in a fresh folder, read its median img/s, remove the folder."""
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp)
    ips = median_images_per_second(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if ips is None:
        raise SystemExit(f"{what}: no img/s logged while calibrating")
    return ips


def median_images_per_second(run: Path, skip_warmup: bool = True) -> float | None:
    """Median img/s over a run's logged windows (None: none logged); ``skip_warmup`` drops the
    first window (start-up, kernel selection) when there are others."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rates = [r for x in lines if (r := json.loads(x).get("images_per_s"))]
    if skip_warmup:
        rates = rates[1:] or rates
    return sorted(rates)[len(rates) // 2] if rates else None


def train_images(data: str) -> int:
    """Images in a data set's training split: the catalogue's count, else a stand-in."""
    return split_size(data) or UNCATALOGUED_TRAIN_IMAGES


def epochs_for_budget(images_per_s: float, n_train: int, budget_s: float) -> float:
    """Epochs (to a hundredth; `train.epochs` may be fractional) that fill 92 % of the budget.

    Whole epochs used to be rounded down, which left a run with 2.9 epochs' worth of time
    training for 2: up to half of a short budget unused, and unequal between methods."""
    return max(0.05, round(0.92 * budget_s * images_per_s / n_train, 2))


def calibrated_epochs(train_args: list[str], n_train: int, budget_s: float, tmp: Path,
                      seconds: float = 25.0) -> tuple[float, float]:
    """``(img/s, epochs)``: measure `medlatent TRAIN_ARGS` for `seconds`, then size its schedule
    of `n_train` images per epoch to `budget_s`."""
    ips = images_per_second(train_args, tmp, seconds)
    return ips, epochs_for_budget(ips, n_train, budget_s)


def run_budgeted(train_args: list[str], epochs: float, budget_s: float, run: Path) -> str:
    """`medlatent TRAIN_ARGS` for `epochs`, stopped at `budget_s`, into the run folder `run`."""
    return run_cli(*train_args, "--epochs", str(epochs), "--time-budget", str(budget_s), "--output", str(run))
