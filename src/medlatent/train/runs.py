"""A run folder: everything one training run writes, in one place.

::

    <run>/
        config.yaml         the resolved configuration (every default filled in)
        env.json            versions, hardware, precision and layout chosen
        data.json           data name, channels, size, per-channel mean/std used for inputs
        metrics.jsonl       one JSON object per logged step / epoch / event
        checkpoints/        see checkpoint.py
        encoder.safetensors the final encoder weights (MONAI parameter names)
        probe.json          results of `medlatent probe`
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlatent.config import PretrainConfig, from_dict, load_yaml, to_dict
from medlatent.errors import CheckpointError
from medlatent.train import checkpoint


@dataclass
class RunDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def encoder_file(self) -> Path:
        return self.path / "encoder.safetensors"

    def exists(self) -> bool:
        return self.config_file.is_file()

    def has_checkpoint(self) -> bool:
        return bool(checkpoint.list_checkpoints(self.checkpoints))

    def write_config(self, cfg: PretrainConfig) -> None:
        import yaml

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_name(".config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, self.config_file)

    def read_config(self) -> PretrainConfig:
        if not self.exists():
            raise CheckpointError(f"{self.path}: not a run folder (no config.yaml)")
        from medlatent.ssl.registry import upgrade_saved_options

        tree = load_yaml(self.config_file)
        if isinstance(tree, dict) and "method_options" in tree:  # options added since the run was written
            tree["method_options"] = upgrade_saved_options(tree.get("method"), tree["method_options"])
        return from_dict(PretrainConfig, tree, str(self.config_file))

    def write_json(self, name: str, data: Any) -> None:
        checkpoint.write_json_atomic(self.path / name, data)

    def read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p}: missing or unreadable ({e})") from None

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (JSON line), flushed at once."""
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metrics records past ``after_step`` (a resumed run writes them again)."""
        if not self.metrics_file.is_file():
            return
        keep = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        tmp = self.metrics_file.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]


def environment(extra: dict[str, Any]) -> dict[str, Any]:
    """Versions and hardware, for env.json."""
    import monai
    import numpy
    import torch

    from medlatent import __version__
    from medlatent.train.precision import cpu_flags

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(
        medlatent=__version__, python=platform.python_version(), torch=torch.__version__,
        monai=monai.__version__, numpy=numpy.__version__, platform=platform.platform(),
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        cpu_bf16=bool({"avx512_bf16", "amx_bf16"} & cpu_flags()),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    )
