"""Progress a person can follow: plain lines when stdout is a file (the first logged window, every
N seconds, the end), the loss shown is the last logged window's mean, never nan or None."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medlatent.cli import display
from medlatent.train.loop import Progress, _Window

from conftest import run_cli, write_stripes_npz

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\), epoch (\d+), loss (-|\d+\.\d{4}), (\d+) img/s, ETA (\d+:\d\d:\d\d)$")


def progress(step: int, loss: float | None, total: int = 600, eta: float = 92.4) -> Progress:
    return Progress(step, total, 2, loss, 1e-3, 250.2, eta)


def test_line_reads_like_the_issue():
    assert display.progress_line(progress(120, 4.12341)) == \
        "step 120/600 (20%), epoch 3, loss 4.1234, 250 img/s, ETA 0:01:32"
    assert display.progress_line(progress(1, None)) == "step 1/600 (0%), epoch 3, loss -, 250 img/s, ETA 0:01:32"
    assert "loss -" in display.progress_line(progress(1, float("nan")))
    assert display.progress_line(progress(1, 1.0, eta=float("inf"))).endswith("ETA -")


def test_lines_at_first_window_every_n_seconds_and_at_the_end(monkeypatch: pytest.MonkeyPatch):
    clock = [100.0]
    monkeypatch.setattr(display.time, "monotonic", lambda: clock[0])
    printed: list[str] = []
    lines = display.ProgressLines(30.0, printed.append)

    def at(t: float, step: int, loss: float | None) -> None:
        clock[0] = 100.0 + t
        lines(progress(step, loss, total=50))

    at(0, 1, None)  # before the first window: nothing yet
    at(1, 9, None)
    at(2, 10, 4.5)  # the first window closes: printed at once
    at(20, 20, 4.2)
    at(33, 25, 4.2)  # 31 s after the last line
    at(40, 30, 4.0)
    assert [LINE.match(s).group(1) for s in printed] == ["10", "25"]
    at(41, 50, 3.9)  # the last step
    assert LINE.match(printed[-1]).group(1) == "50"
    lines.finish()  # nothing pending
    assert len(printed) == 3

    stopped: list[str] = []
    early = display.ProgressLines(30.0, stopped.append)
    clock[0] = 0.0
    early(progress(5, None, total=50))
    clock[0] = 31.0
    early(progress(6, None, total=50))  # a slow first window: a line every N seconds says "loss -"
    clock[0] = 32.0
    early(progress(7, None, total=50))
    early.finish()  # a run that stopped early ends with its last step
    assert [LINE.match(s).group(1) for s in stopped] == ["6", "7"] and all("loss -" in s for s in stopped)


def test_progress_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MEDLATENT_PROGRESS_SECONDS", raising=False)
    assert display.progress_seconds() == 30.0
    monkeypatch.setenv("MEDLATENT_PROGRESS_SECONDS", "2.5")
    assert display.progress_seconds() == 2.5
    monkeypatch.setenv("MEDLATENT_PROGRESS_SECONDS", "soon")
    with pytest.raises(display.ConfigError, match="MEDLATENT_PROGRESS_SECONDS: 'soon'"):
        display.progress_seconds()


def test_bad_progress_seconds_is_one_line_before_anything_is_written(tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDLATENT_PROGRESS_SECONDS", "-1")
    data = write_stripes_npz(tmp_path / "s.npz", n_train=64, n_val=16, n_test=16)
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), "--batch-size", "32", "--output",
                           str(tmp_path / "run"))
    assert code == 1 and err.strip() == "error: MEDLATENT_PROGRESS_SECONDS: '-1' is not a number of seconds >= 0"
    assert not (tmp_path / "run").exists()


def test_window_loss_is_none_until_read_back_then_the_window_mean(tmp_path: Path):
    from medlatent.train.runs import RunDir

    window = _Window(0)
    assert window.last_loss is None
    for value in (1.0, 2.0, 6.0):
        window.add(torch.tensor(value), {})
    record = window.flush(RunDir(tmp_path), 3, 10, 1e-3, 8, time.perf_counter())
    assert record["loss"] == window.last_loss == 3.0


def test_pretrain_to_a_file_prints_plain_progress_lines(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "stripes.npz", n_train=128, n_val=32, n_test=32)
    run, log = tmp_path / "run", tmp_path / "log.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDLATENT_PROGRESS_SECONDS="0")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medlatent.cli.main", "pretrain", "--data", str(data),
                                 "--epochs", "4", "--batch-size", "32", "--precision", "fp32",
                                 "--set", "train.log_every=4", "--output", str(run)],
                                stdout=out, stderr=subprocess.PIPE, env=env, text=True)
        seen_while_running = False
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if not seen_while_running and "step " in log.read_text():
                seen_while_running = proc.poll() is None
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert seen_while_running, "no progress line reached the file before the run ended (buffered?)"
    text = log.read_text()
    assert "nan" not in text and "None" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), lines
    steps = [int(m.group(1)) for m in parsed]
    assert steps == list(range(1, 17)) and all(int(m.group(2)) == 16 for m in parsed)
    assert parsed[-1].group(3) == "100" and parsed[-1].group(4) == "4"
    # the loss shown is the mean of the last logged window (as in metrics.jsonl), '-' before the first
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    windows = {r["step"]: r["loss"] for r in records if "loss" in r}
    for step, m in zip(steps, parsed):
        done = [s for s in windows if s <= step]
        assert m.group(5) == (f"{windows[max(done)]:.4f}" if done else "-"), (step, m.group(0))
    assert text.splitlines()[-2].startswith("run: ")
