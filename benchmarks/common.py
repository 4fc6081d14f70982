"""What the benchmark scripts share beyond the calibration (calibrate.py): the result-folder
options, the small-batch recipe for pixel-space diffusion, and how memory is measured and shown.
Package facts (published rows, split sizes, config checks) come from `medlatent` itself.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

# Pixel-space diffusion is the slowest model per image: at batch 256 a few minutes are a few
# dozen optimiser steps. Batch 32 buys 8x more in the same minutes (lr 2e-4 at batch 32, given
# per batch 256 as the training loop expects).
SMALL_BATCH_DIFFUSION = ["--set", "train.batch_size=32", "--set", "optim.lr=1.6e-3"]


def parse_with_results(ap: argparse.ArgumentParser, out_dir: str) -> tuple[argparse.Namespace, Path]:
    """Add `--out-dir` (default `out_dir`) and `--table-only`, parse, and make the result folder."""
    ap.add_argument("--out-dir", default=out_dir)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_cell(r: dict, digits: int = 2) -> str:
    """A result's peak memory for a table: GPU memory where the run used a GPU, else host RSS."""
    if r.get("peak_gpu_gib"):
        return f"{r['peak_gpu_gib']:.{digits}f} GiB GPU"
    return f"{r['peak_rss_gib']:.{digits}f} GiB RSS"
