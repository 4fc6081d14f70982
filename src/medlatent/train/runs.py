"""A run folder: everything one training run writes, in one place.

::

    <run>/
        config.yaml         the resolved configuration (every default filled in)
        env.json            versions, hardware, precision and layout chosen
        data.json           data name, channels, size, per-channel mean/std used for inputs
                            (a mixture: each source's images, channels and batch share)
        metrics.jsonl       one JSON object per logged step / epoch / event
        checkpoints/        see checkpoint.py
        encoder.safetensors the final encoder weights (MONAI parameter names)
        probe.json          results of `medlatent probe` (a mixture run: probe-<source>.json)
        .lock               held (an OS file lock) by the one process training the run
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medlatent.config import PretrainConfig, from_dict, load_yaml, to_dict
from medlatent.errors import CheckpointError, RunInUse
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
        # as written; medlatent.methods.saved.read_config fills in options added since
        return from_dict(PretrainConfig, load_yaml(self.config_file), str(self.config_file))

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
        """Drop metrics records past ``after_step`` (a resumed run writes them again), and a
        line torn by a kill mid-write."""
        if not self.metrics_file.is_file():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        tmp = self.metrics_file.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics record; a line that is not a JSON object (torn by a kill) is skipped."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the run folder for the life of the block: an OS lock on ``<run>/.lock``, released
        by the kernel if the process dies, so two processes never write one run.

        Raises:
            RunInUse: another live process holds the folder (its pid is named).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        f = (self.path / ".lock").open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunInUse(self._in_use(holder)) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            f.close()  # closing releases the lock

    def check_not_in_use(self) -> None:
        """Raise :class:`RunInUse` if another process holds the folder (nothing is created)."""
        lock_file = self.path / ".lock"
        if not lock_file.is_file():
            return
        with lock_file.open("r") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise RunInUse(self._in_use(f.read().strip() or "unknown")) from None

    def _in_use(self, holder: str) -> str:
        return f"{self.path}: in use by process {holder}; wait for it to finish, stop it, or choose another --output"


def environment(extra: dict[str, Any]) -> dict[str, Any]:
    """Versions and hardware, for env.json."""
    import monai
    import numpy
    import torch

    from medlatent import __version__
    from medlatent.train.precision import cpu_flags, cpu_model

    return dict(
        medlatent=__version__, python=platform.python_version(), torch=torch.__version__,
        monai=monai.__version__, numpy=numpy.__version__, platform=platform.platform(),
        cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        cpu_bf16=bool({"avx512_bf16", "amx_bf16"} & cpu_flags()),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    )
