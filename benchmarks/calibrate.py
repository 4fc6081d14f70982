"""Fit a training run's whole learning-rate schedule into a wall-clock budget.

A short budgeted run measures images per second; the epochs are then chosen so the cosine
schedule ends inside the budget (8 % margin for checkpoints and evaluation). Shared by the
benchmark scripts that drive `medlatent ... train/fit` commands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str) -> str:
    """Run `medlatent ARGS`; exit with its last error lines if it fails."""
    res = subprocess.run([sys.executable, "-m", "medlatent.cli.main", *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"medlatent {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def images_per_second(train_args: list[str], tmp: Path, seconds: float = 25.0) -> float:
    """Median img/s of a `seconds`-long run of `medlatent TRAIN_ARGS` (first log window dropped)."""
    shutil.rmtree(tmp, ignore_errors=True)
    run_cli(*train_args, "--epochs", "1000", "--time-budget", str(seconds), "--output", str(tmp),
            "--set", "train.log_every=2")
    ips = median_images_per_second(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return ips


def median_images_per_second(run: Path) -> float:
    """Median img/s over a run's logged windows, the first (warm-up) window dropped."""
    rates = [json.loads(x).get("images_per_s") for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r][1:] or [r for r in rates if r]
    return sorted(rates)[len(rates) // 2]


def epochs_for_budget(images_per_s: float, n_train: int, budget_s: float) -> float:
    """Epochs (to a hundredth; `train.epochs` may be fractional) that fill 92 % of the budget.

    Whole epochs used to be rounded down, which left a run with 2.9 epochs' worth of time
    training for 2: up to half of a short budget unused, and unequal between methods."""
    return max(0.05, round(0.92 * budget_s * images_per_s / n_train, 2))
