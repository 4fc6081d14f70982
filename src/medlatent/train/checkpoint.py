"""Checkpoints: safetensors weights plus JSON state, written so a kill never leaves a broken one.

Layout of one checkpoint (a folder under ``<run>/checkpoints/``)::

    step-00001200/
        model.safetensors      every tensor of the method (encoder.*, heads, teachers, buffers)
        optimizer.safetensors  optimiser tensors, keyed "<param index>.<name>"
        state.json             step, epoch, optimiser hyper-parameters and scalars, extras

The folder is written under a hidden temporary name, every file fsync'd, then renamed in one
atomic ``os.rename``; a folder named ``step-*`` is therefore always complete. Nothing is ever
unpickled: tensors come from safetensors, everything else from JSON.

A checkpoint can still be damaged after it was written (a disk error, a copy cut short, a
file edited by hand). :func:`latest` then falls back to the newest intact one and records
which it skipped and why (``Checkpoint.skipped``), and :func:`warn` tells the user.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medlatent.dist import process_alive
from medlatent.errors import CheckpointError

_NAME = re.compile(r"^step-(\d{8})$")
_TMP = re.compile(r"^\.step-\d{8}\.tmp-(\d+)$")
# What a damaged file raises: safetensors' own error (not a ValueError), JSON and OS errors.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)
log = logging.getLogger("medlatent")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    state: dict[str, Any]
    # Newer checkpoints that could not be read, newest first: (folder, reason).
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``step`` atomically and prune all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(_plain(model.state_dict()), tmp / "model.safetensors")
    body = dict(state, step=step)
    if optimizer is not None:
        tensors, meta = _split_optimizer(optimizer.state_dict())
        _save_tensors(tensors, tmp / "optimizer.safetensors")
        body["optimizer"] = meta
    _write_json(tmp / "state.json", body)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    prune(folder, keep)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name))


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and this process's temporary leftovers
    (and those of processes that no longer exist); another live process's are never touched."""
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not process_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
    for p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load(path: Path, with_optimizer: bool = True) -> Checkpoint:
    """Load one checkpoint folder.

    Raises:
        CheckpointError: a file is missing, truncated or corrupt (one line naming the folder).
    """
    try:
        state = json.loads((path / "state.json").read_text())
        step = int(state["step"])
        model = load_file(path / "model.safetensors")
        opt = None
        if with_optimizer and "optimizer" in state:
            opt = _join_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
    return Checkpoint(path, step, model, opt, state)


def latest(folder: Path, with_optimizer: bool = True) -> Checkpoint | None:
    """The newest intact checkpoint in ``folder``, or None when there is none at all.

    Damaged newer checkpoints are skipped and listed in ``Checkpoint.skipped``.

    Raises:
        CheckpointError: checkpoints exist but none of them can be read.
    """
    found = list_checkpoints(folder)
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            ckpt = load(path, with_optimizer)
        except CheckpointError as e:
            skipped.append((path, str(e).split(": ", 1)[-1]))
            continue
        ckpt.skipped = skipped
        return ckpt
    if skipped:
        raise CheckpointError(f"{folder}: none of its {len(found)} checkpoints can be read "
                              f"(newest: {skipped[0][0].name}, {skipped[0][1]})")
    return None


def warn(ckpt: Checkpoint) -> None:
    """Say on the ``medlatent`` logger which damaged checkpoints were skipped for ``ckpt``."""
    for path, why in ckpt.skipped:
        log.warning(f"{path}: skipped, {why}; using {ckpt.path.name} (step {ckpt.step})")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a one-line error if it is missing or corrupt."""
    try:
        return load_file(path)
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _save_tensors(_plain(tensors), tmp, metadata)
    os.replace(tmp, path)


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_json(tmp, data)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return _plain(tensors), dict(param_groups=sd["param_groups"], scalars=scalars)


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return dict(state=state, param_groups=meta["param_groups"])
