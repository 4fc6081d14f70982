"""Progress of non-training work (features, fine-tuning, sampling) reaches the user: reported by
the library through medlatent.progress, shown by the CLI as plain lines in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medlatent import progress
from medlatent.cli.display import TaskProgress

from conftest import run_cli, write_stripes_npz


def test_reports_reach_listeners_only_inside_the_block():
    seen: list[tuple[str, int, int]] = []
    progress.report("features", 1, 2)  # no listener: nothing happens
    with progress.listening(lambda *a: seen.append(a)):
        progress.report("features", 1, 2)
    progress.report("features", 2, 2)
    assert seen == [("features", 1, 2)]


def test_plain_lines_every_n_seconds_and_the_end(monkeypatch: pytest.MonkeyPatch):
    clock = iter([0.0, 1.0, 5.0, 6.0, 12.0, 100.0, 100.5])
    monkeypatch.setattr("medlatent.cli.display.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    tasks = TaskProgress(5.0, terminal=False, echo=lines.append)
    for done in (1, 2, 3, 4, 5):  # at t = 0, 1, 5, 6, 12
        tasks("features", done, 5)
    assert lines == ["features: 3/5 (60%), 5 s", "features: 5/5 (100%), 12 s"]
    tasks("sampling", 1, 2)  # t = 100: a new task starts its own clock
    tasks("sampling", 2, 2)  # t = 100.5: ends before any line was due: nothing
    assert len(lines) == 2
    tasks.muted = True
    tasks("features", 1, 1)
    assert len(lines) == 2


def test_probe_into_a_log_file_shows_feature_progress(tmp_path: Path, capsys: pytest.CaptureFixture):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), "--epochs", "0.5", "--batch-size", "32",
                           "--precision", "fp32", "--output", str(run))
    assert code == 0, err
    log = tmp_path / "probe.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDLATENT_PROGRESS_SECONDS="0")
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "medlatent.cli.main", "probe", str(run)], stdout=f,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("features: ")]
    assert lines and lines[-1].startswith("features: 16/16 (100%)")
    assert "\r" not in log.read_text()
