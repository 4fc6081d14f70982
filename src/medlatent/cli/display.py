"""How progress is shown: a live bar in a terminal, plain lines in a log file.

Training reports a :class:`medlatent.train.loop.Progress` after every step
(:class:`ProgressLines`, :func:`progress_line`); other long work reports through
:mod:`medlatent.progress` (:class:`TaskProgress`).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Callable

import click

from medlatent.errors import ConfigError

PROGRESS_SECONDS = 30.0  # a plain progress line this often when stdout is not a terminal


def progress_line(p: Any) -> str:
    """``step 120/600 (20%), epoch 3, loss 4.1234, 250 img/s, ETA 0:01:32`` from a training
    Progress; ``loss -`` until the first logged window (the loss is that window's mean)."""
    pct = 100 * p.step / max(p.total_steps, 1)
    return (f"step {p.step}/{p.total_steps} ({pct:.0f}%), epoch {p.epoch + 1}, loss {_loss_text(p.loss)}, "
            f"{p.images_per_s:.0f} img/s, ETA {_eta_text(p.eta_s)}")


def _loss_text(loss: float | None) -> str:
    return "-" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"


def _eta_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) and seconds < 1e8 else "-"


def progress_seconds() -> float:
    """Seconds between plain progress lines: $MEDLATENT_PROGRESS_SECONDS, else 30."""
    raw = os.environ.get("MEDLATENT_PROGRESS_SECONDS", "").strip()
    if not raw:
        return PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"MEDLATENT_PROGRESS_SECONDS: {raw!r} is not a number of seconds >= 0")
    return value


class ProgressLines:
    """Progress as plain lines for a log file: the first logged window, then one line every
    ``every`` seconds, and the last step (:meth:`finish` prints it if the run stopped early)."""

    def __init__(self, every: float, echo: Callable[[str], None] = click.echo) -> None:
        self.every, self.echo = every, echo
        self.last_line: float | None = None  # when the last line was printed (or the first step came)
        self.logged = False  # a line with a loss has been printed
        self.pending: Any = None  # the newest Progress not yet printed

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if self.last_line is None:
            self.last_line = now
        first_window = p.loss is not None and not self.logged
        if first_window or p.step >= p.total_steps or now - self.last_line >= self.every:
            self.echo(progress_line(p))
            self.logged = self.logged or p.loss is not None
            self.last_line, self.pending = now, None
        else:
            self.pending = p

    def finish(self) -> None:
        if self.pending is not None:
            self.echo(progress_line(self.pending))
            self.pending = None


class TaskProgress:
    """Progress of work other than training (``medlatent.progress.report``: features,
    fine-tuning, sampling): in a terminal one line rewritten in place; otherwise a plain line
    when a task has run ``every`` seconds since its last line, and its end if a line was shown.
    Silent while a training bar or training lines are showing."""

    def __init__(self, every: float, terminal: bool, echo: Callable[[str], None] = click.echo) -> None:
        self.every, self.terminal, self.echo = every, terminal, echo
        self.muted = False
        self.task: str | None = None
        self.started = self.last = 0.0
        self.shown = False

    def __call__(self, task: str, done: int, total: int) -> None:
        if self.muted:
            return
        now = time.monotonic()
        if task != self.task or done <= 0:
            self.task, self.started, self.last, self.shown = task, now, now, False
        finished = done >= total
        line = f"{task}: {done}/{total} ({100 * done / max(total, 1):.0f}%), {now - self.started:.0f} s"
        if self.terminal:
            if now - self.started >= 1.0 or self.shown:
                self.echo(f"\r{line}\033[K", nl=finished)
                self.shown = True
        elif now - self.last >= self.every or (finished and self.shown):
            self.echo(line)
            self.last, self.shown = now, True
        if finished:
            self.task = None


TASKS = TaskProgress(PROGRESS_SECONDS, False)  # replaced by main() for the command being run
