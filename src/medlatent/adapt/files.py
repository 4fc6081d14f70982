"""Adapter files: only the trained parameters (safetensors) plus a JSON of what they are and
which base encoder they belong to (a hash of its weights), so an adapter is never applied to
the wrong encoder silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from medlatent.train.checkpoint import save_tensors, write_json_atomic
from medlatent.adapt.strategies import AdaptConfig
from medlatent.config import from_dict
from medlatent.errors import CheckpointError


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values, in name order).

    Values are hashed as their raw row-major bytes. Flattening first lets 0-dim tensors (BatchNorm's
    ``num_batches_tracked``) be viewed as bytes; for tensors of one or more dimensions the bytes,
    and so the hash, are the same as before, so existing adapter files still match their base."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapter weights, prompts, unfrozen biases, the head), and the
    head's buffers (feature-norm statistics)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.startswith("head.")})
    return state


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """``(path.safetensors, path.json)``; ``path`` names the adapter without suffix and may hold
    dots (``lora-bloodmnist-0.1``), or end in either suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def save_adapter(path: str | Path, model: nn.Module, cfg: AdaptConfig, base_hash: str,
                 extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json``; each under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = adapter_files(path)
    save_tensors(trainable_state(model), weights)
    write_json_atomic(meta, dict(adapt=dataclasses.asdict(cfg), base_hash=base_hash, **(extra or {})))
    return weights, meta


def read_adapter(path: str | Path) -> tuple[AdaptConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, the JSON's contents, the weights) of an adapter written by :func:`save_adapter`."""
    path = Path(path)
    weights, meta = adapter_files(path)
    for f in (weights, meta):
        if not f.is_file():
            raise CheckpointError(f"{f}: adapter file not found (an adapter is a .safetensors and a .json)")
    try:
        info = json.loads(meta.read_text())
        cfg = from_dict(AdaptConfig, info["adapt"], "adapt")
        return cfg, info, load_file(str(weights))
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{meta}: not an adapter description ({e})") from None
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable adapter weights ({e})") from None


def load_adapter_into(model: nn.Module, state: dict[str, torch.Tensor], info: dict[str, Any], base: nn.Module,
                      source: str | Path) -> nn.Module:
    """Load adapter weights into ``model`` (the base with the same strategy applied), after
    checking that ``base`` is the encoder the adapter was trained on."""
    found = weights_hash(base)
    if found != info["base_hash"]:
        raise CheckpointError(f"{source}: this adapter was trained on another base encoder "
                              f"(weights hash {info['base_hash'][:12]}..., this one {found[:12]}...)")
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise CheckpointError(f"{source}: adapter parameters do not match the strategy "
                              f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    return model
