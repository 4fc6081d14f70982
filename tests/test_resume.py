"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from medlatent.train import checkpoint

from conftest import write_stripes_npz

ARGS = ["--backbone", "resnet18-half", "--epochs", "4", "--batch-size", "32", "--precision", "fp32",
        "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=50", "--set", "train.log_every=1",
        "--set", "views.blur=0.5", "--set", "views.noise=0.5"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medlatent.cli.main", *args]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "stripes.npz", n_train=256)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli("pretrain", "--data", str(data), "--output", str(full), *ARGS), check=True, env=env,
                   capture_output=True)

    proc = subprocess.Popen(cli("pretrain", "--data", str(data), "--output", str(killed), *ARGS), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-00000010"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended or timed out before its step-10 checkpoint"
    saved = checkpoint.list_checkpoints(killed / "checkpoints")
    assert saved[-1].name != "step-00000032"  # really killed mid-training
    for path in saved:  # every checkpoint that exists is complete and loadable
        ck = checkpoint.load(path)
        assert ck.optimizer is not None and all(torch.isfinite(v.float()).all() for v in ck.model.values())
    assert not (killed / "encoder.safetensors").exists()

    subprocess.run(cli("pretrain", "--resume", str(killed)), check=True, env=env, capture_output=True)
    a, b = load_file(full / "encoder.safetensors"), load_file(killed / "encoder.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    last_a = checkpoint.latest(full / "checkpoints").model
    last_b = checkpoint.latest(killed / "checkpoints").model
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # heads and BN statistics too
    # the metrics log has each step once
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 32
