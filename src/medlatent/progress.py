"""Progress of long work that is not a training loop: feature extraction, fine-tuning, sampling.

The library only reports (``report("features", done, total)``); whoever runs it decides what to
show by listening (:func:`listening`): the CLI draws a bar in a terminal and writes plain lines
to a log file. With no listener, reporting costs one empty loop and nothing is printed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Listener = Callable[[str, int, int], None]  # (task, done, total)
_listeners: list[Listener] = []


def report(task: str, done: int, total: int) -> None:
    """``done`` of ``total`` units of ``task`` are finished (``done == total`` ends the task)."""
    for listener in list(_listeners):
        listener(task, done, total)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Hand every :func:`report` made inside the block to ``listener``."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
