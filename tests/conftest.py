"""Shared fixtures: real MedMNIST files from ../shared, and small synthetic sets in MedMNIST layout."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def medmnist_dir() -> Path:
    return Path(os.environ.get("MEDLATENT_DATA", SHARED / "medmnist"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = medmnist_dir()
    if not (d / "bloodmnist.npz").is_file():
        pytest.skip(f"MedMNIST files not found in {d} (set MEDLATENT_DATA)")
    return d


@pytest.fixture(scope="session")
def other_images() -> Path:
    d = SHARED / "other"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


def stripes(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes an encoder can tell apart: horizontal (0) vs vertical (1) stripes, random
    phase, period and brightness, plus noise. Returns (N, H, W[, 3]) uint8 and (N, 1) labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    coords = np.arange(size)
    period = rng.uniform(3, 7, n)[:, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None]
    wave = 0.5 + 0.4 * np.sin(2 * np.pi * coords[None] / period + phase)  # (N, size)
    img = np.where(y[:, None, None] == 0, wave[:, :, None], wave[:, None, :]) * np.ones((1, size, size))
    img = img * rng.uniform(0.6, 1.0, n)[:, None, None] + rng.normal(0, 0.05, img.shape)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if channels == 3:
        tint = rng.uniform(0.7, 1.0, (n, 1, 1, 3))
        img = (img[..., None] * tint).astype(np.uint8)
    return img, y[:, None].astype(np.int64)


def write_stripes_npz(path: Path, n_train: int = 256, n_val: int = 64, n_test: int = 64,
                      channels: int = 1, size: int = 28) -> Path:
    arrays = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        x, y = stripes(n, channels, size, seed=i)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(path, **arrays)
    return path


@pytest.fixture
def stripes_npz(tmp_path: Path) -> Path:
    return write_stripes_npz(tmp_path / "stripes.npz")


def invoke(*args: str) -> int:
    """Run ``medlatent ARGS`` through the real entry point in this process; its exit code.
    Signal handlers the command installs (Ctrl-C saves a checkpoint) are put back after."""
    from medlatent.cli.main import main

    old_argv, handlers = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = ["medlatent", *args]
    try:
        main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old_argv
        for s, h in handlers.items():
            signal.signal(s, h)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``medlatent ARGS``."""
    code = invoke(*args)
    out = capsys.readouterr()
    return code, out.out, out.err
