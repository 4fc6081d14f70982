"""medlatent: label-efficient learning on biomedical images, built on PyTorch and MONAI.

The package imports nothing heavy at import time (so ``medlatent --help`` is instant); the
public functions below are loaded on first use::

    import medlatent as ml
    data = ml.load_medmnist("bloodmnist")              # official file, md5-checked
    run = ml.pretrain(ml.PretrainConfig(), output="runs/blood")
    print(ml.probe(run))                                # k-NN and linear probe, ACC/AUC
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MONAI imports mlflow eagerly when it is installed (the optional `track` extra), and mlflow then
# reports usage over the network unless told not to: medlatent runs offline, so say no by default.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"  # the one place: pyproject.toml reads it; CITATION.cff must match (scripts/check_wheel.sh)

_LAZY = {
    "load_medmnist": "medlatent.data.medmnist",
    "load_dataset": "medlatent.data.sources",
    "load_folder": "medlatent.data.folders",
    "open_store": "medlatent.data.store",
    "prepare_store": "medlatent.api",
    "PretrainConfig": "medlatent.config",
    "pretrain": "medlatent.api",
    "probe": "medlatent.api",
    "embed": "medlatent.api",
    "load_encoder": "medlatent.api",
    "MedlatentError": "medlatent.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medlatent' has no attribute {name!r}")
