"""A run folder is owned by one process; damaged checkpoints and torn metrics lines do not stop
evaluation or a resume; config values are range-checked; runs that cannot fit are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from medlatent.api import pretrain
from medlatent.config import PretrainConfig, check_ranges, from_dict
from medlatent.errors import CheckpointError, ConfigError, RunInUse
from medlatent.train import checkpoint, memory
from medlatent.train.runs import RunDir

from conftest import run_cli, write_stripes_npz




def tiny_config(data: Path, epochs: float = 2, seed: int = 0) -> PretrainConfig:
    return from_dict(PretrainConfig, {"data": {"name": str(data)}, "train": {
        "epochs": epochs, "batch_size": 32, "seed": seed, "precision": "fp32", "checkpoint_seconds": 0}})


# ------------------------------------------------------------------------ one process per run


def test_two_processes_never_write_one_run(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    out = tmp_path / "runs" / "c"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medlatent.cli.main", "pretrain", "--data", str(data), "--batch-size", "32",
           "--precision", "fp32", "--output", str(out)]
    first = subprocess.Popen([*cmd, "--epochs", "2000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints").is_dir() and time.time() < deadline:  # training has begun
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--epochs", "3", "--seed", "7"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines == [f"error: {out}: in use by process {first.pid}; wait for it to finish, stop it, "
                         f"or choose another --output"]
    finally:
        first.send_signal(signal.SIGTERM)  # asks the run to stop with a checkpoint
        first.wait(timeout=120)
    assert first.returncode == 130, first.stderr.read().decode()
    cfg = RunDir(out).read_config()
    assert cfg.train.epochs == 2000 and cfg.train.seed == 0  # the first process's config, untouched
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    ckpt = checkpoint.latest(out / "checkpoints")
    assert ckpt is not None and not ckpt.skipped


def test_lock_is_released_when_the_holder_dies(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from medlatent.train.runs import RunDir\n"
        f"with RunDir(Path({str(run.path)!r})).lock():\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"in use by process {holder.pid}"):
            with run.lock():
                pass
    finally:
        holder.kill()  # no clean-up code runs: the kernel releases the lock
        holder.wait()
    with run.lock():
        assert (run.path / ".lock").read_text() == str(os.getpid())


def test_prune_removes_only_its_own_temporaries(tmp_path: Path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    try:
        theirs = folder / f".step-00000004.tmp-{other.pid}"  # another live process is writing it
        stale = folder / f".step-00000003.tmp-{dead}"  # left by a process that died
        mine = folder / f".step-00000002.tmp-{os.getpid()}"
        for p in (theirs, stale, mine):
            p.mkdir()
        checkpoint.save(folder, 5, nn.Linear(2, 2), None, {})
        assert theirs.is_dir() and not stale.exists() and not mine.exists()
        assert [p.name for p in checkpoint.list_checkpoints(folder)] == ["step-00000005"]
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------- damaged checkpoints


def damage(path: Path) -> None:
    """Cut a safetensors file short, as a full disk or an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """A finished run (4 steps, checkpoints at steps 2 and 4) and its data."""
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    run = pretrain(tiny_config(data), tmp_path / "run")
    names = [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert names == ["step-00000002", "step-00000004"]
    return run, data


def test_safetensors_errors_are_one_line(tmp_path: Path, two_checkpoints: tuple[Path, Path]):
    run, _ = two_checkpoints
    newest = run / "checkpoints" / "step-00000004"
    damage(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match="step-00000004: unreadable checkpoint"):
        checkpoint.load(newest)
    damage(run / "encoder.safetensors")
    with pytest.raises(CheckpointError, match="encoder.safetensors: cannot read weights"):
        checkpoint.load_tensors(run / "encoder.safetensors")


def test_probe_embed_and_resume_fall_back_to_the_newest_intact_checkpoint(
        capsys: pytest.CaptureFixture, two_checkpoints: tuple[Path, Path]):
    run, _ = two_checkpoints
    (run / "encoder.safetensors").unlink()  # only the checkpoints are left to read
    damage(run / "checkpoints" / "step-00000004" / "model.safetensors")
    older = load_file(run / "checkpoints" / "step-00000002" / "model.safetensors")
    warning = (f"warning: {run / 'checkpoints' / 'step-00000004'}: skipped, unreadable checkpoint")

    code, out, err = run_cli(capsys, "probe", str(run), "--split", "test")
    assert code == 0, err
    assert err.startswith(warning) and "using step-00000002 (step 2)" in err
    assert json.loads((run / "probe.json").read_text())["encoder_step"] == 2

    code, out, err = run_cli(capsys, "embed", str(run), "--split", "val")
    assert code == 0 and err.startswith(warning)

    code, out, err = run_cli(capsys, "pretrain", "--resume", str(run))
    assert code == 0 and err.startswith(warning), err
    resumed = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")  # written again
    assert not torch.equal(resumed["encoder.conv1.weight"], older["encoder.conv1.weight"])


def test_all_checkpoints_damaged_is_one_line(capsys: pytest.CaptureFixture, two_checkpoints: tuple[Path, Path]):
    run, _ = two_checkpoints
    for p in checkpoint.list_checkpoints(run / "checkpoints"):
        damage(p / "model.safetensors")
    code, _, err = run_cli(capsys, "probe", str(run), "--split", "test")  # the final encoder file is intact
    assert code == 0, err
    (run / "encoder.safetensors").unlink()
    code, _, err = run_cli(capsys, "probe", str(run))
    assert code == 1
    assert err.strip().splitlines() == [f"error: {run / 'checkpoints'}: none of its 2 checkpoints can be read "
                                        f"(newest: step-00000004, unreadable checkpoint (" +
                                        err.split("unreadable checkpoint (", 1)[1].strip()]


def test_resume_after_a_torn_metrics_line_equals_the_uninterrupted_run(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    whole = pretrain(tiny_config(data, epochs=3), tmp_path / "whole")
    cut = RunDir(tmp_path / "cut")
    cfg = tiny_config(data, epochs=3)
    pretrain(cfg, cut.path, should_stop=lambda: True)  # stops (with a checkpoint) after step 1
    with cut.metrics_file.open("a") as f:
        f.write('{"step": 2, "loss": 4.1')  # killed in the middle of a line
    pretrain(None, cut.path, resume=True)
    a, b = load_file(whole / "encoder.safetensors"), load_file(cut.path / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = cut.metrics_file.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    # the record of the stop (step 1), then the same records as the uninterrupted run
    assert [r["step"] for r in cut.read_metrics()] == [1] + [r["step"] for r in RunDir(whole).read_metrics()]


# --------------------------------------------------------------------- resume and its flags


def test_resume_accepts_only_flags_that_cannot_change_the_run(capsys: pytest.CaptureFixture, tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    run = pretrain(tiny_config(data, epochs=1), tmp_path / "run")
    for flag in (["--batch-size", "16"], ["--seed", "3"], ["--size", "32"], ["--optimizer", "sgd"],
                 ["--precision", "bf16"], ["--compile"], ["--epochs", "2"]):
        code, _, err = run_cli(capsys, "pretrain", "--resume", str(run), *flag)
        assert code == 1 and flag[0].split("/")[0] in err and "would change the run" in err, (flag, err)
    code, out, err = run_cli(capsys, "pretrain", "--resume", str(run), "--device", "cpu", "--time-budget", "90")
    assert code == 0, err
    assert "resuming with train.device = cpu, train.time_budget_s = 90.0" in out
    assert RunDir(run).read_config().train.time_budget_s == 90.0


# ------------------------------------------------------------------------------- ranges


def test_api_configs_are_range_checked_before_anything_is_written(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    for section, key, value in (("train", "epochs", 0.0), ("train", "batch_size", 0), ("optim", "lr", -1.0),
                                ("train", "epochs", float("inf")), ("views", "crop_scale", (0.9, 0.1))):
        cfg = tiny_config(data)
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=f"config.{section}.{key}"):
            pretrain(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    cfg = tiny_config(data)
    cfg.train.batch_size = 65
    with pytest.raises(ConfigError, match="65 is larger than the 64 train images"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_range_messages_name_key_and_bound():
    with pytest.raises(ConfigError, match=r"^config.optim.final_lr_fraction: 2.0 is out of range \(must be >= 0 and <= 1\)$"):
        from_dict(PretrainConfig, {"optim": {"final_lr_fraction": 2}})
    assert from_dict(PretrainConfig, {"optim": {"lr": "1e-3"}}).optim.lr == 1e-3  # YAML reads 1e-3 as text
    check_ranges(PretrainConfig())  # every default is in range


# ------------------------------------------------------------------------------- memory


def test_activation_count_against_a_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    per_image = 4 * 64 + 4 * 64 + 4 * 64 + 10  # conv, relu, flatten, linear outputs
    assert memory.activation_bytes(net, 1, [8, 8], 2, batch_size=16) == 2 * per_image * 4 * 16
    params = sum(p.numel() for p in net.parameters())
    assert memory.step_bytes(net, net, 1, [8], 2, 16) == params * 16 + int(memory.STEP_MARGIN * per_image * 64)
    assert next(net.parameters()).device.type == "cpu"  # counting never moved the real model


def test_a_step_that_cannot_fit_is_refused_with_both_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2 ** 20)  # 64 MiB free
    with pytest.raises(ConfigError, match=r"one training step \(resnet18-quarter, batch 32, 2 views of up to "
                                          r"28 px\) needs about 0.\d GiB but 0.1 GiB of memory are available"):
        pretrain(tiny_config(data), tmp_path / "run")
    assert not (tmp_path / "run").exists()
