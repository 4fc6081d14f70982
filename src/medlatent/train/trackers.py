"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and MLflow, written inside the run.

::

    <run>/tensorboard/      TensorBoard event files (`tensorboard --logdir <run>/tensorboard`)
    <run>/mlruns/           an MLflow file store (`mlflow ui --backend-store-uri <run>/mlruns`)
    <run>/mlflow_run.json   the MLflow run this run folder logs to (a resumed run appends to it)

Each tracker gets every numeric field of every metrics record (by step, under the record's own
key names), the resolved config as flattened hyper-parameters (``optim.lr``), the final metrics
and figures (embedding maps, training curves). The packages are optional (``pip install
'medlatent[track]'``) and imported only when a run asks for them. Only the main process writes.

A resumed run continues the same tracker run: TensorBoard writes into the same folder with a
purge event at the resume step (its readers drop the points past the checkpoint, as
``metrics.jsonl`` is truncated there); MLflow reopens the run named in ``mlflow_run.json`` and,
in a local file store, drops the points past the checkpoint (MLflow has no call for that).
``$MLFLOW_TRACKING_URI``, when set, sends MLflow records to that store instead of ``<run>/mlruns``.
MLflow 3 keeps its file store behind an opt-in, so this process sets ``MLFLOW_ALLOW_FILE_STORE``
(and ``MLFLOW_DISABLE_TELEMETRY``, which would write an id under ``~/.config``) unless they are set;
reading the store back (``mlflow ui``, ``MlflowClient``) needs ``MLFLOW_ALLOW_FILE_STORE=true`` too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from medlatent import dist
from medlatent.errors import ConfigError
from medlatent.train.checkpoint import write_json_atomic

TRACKERS = ("tensorboard", "mlflow")
_EXTRA = "pip install 'medlatent[track]'"
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def require(names: Iterable[str]) -> None:
    """Refuse, before anything is written, a tracker whose package is not installed.

    Raises:
        ConfigError: ``train.log: tensorboard needs the tensorboard package: pip install 'medlatent[track]'``.
    """
    import importlib.util

    for name in names:
        if name not in _MODULES:
            raise ConfigError(f"train.log: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"train.log: {name} needs the {_MODULES[name]} package: {_EXTRA}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"optim.lr": 0.002, ...}``; lists and None as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite fields of a metrics record except its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """Every tracker a run logs to; with none (or off the main process) each call does nothing."""

    def __init__(self, writers: list[Any] | None = None) -> None:
        self.writers = writers or []

    @classmethod
    def open(cls, names: Iterable[str], run_path: Path, params: Mapping[str, Any], name: str,
             experiment: str = "medlatent") -> Trackers:
        """Open (or reopen, for a resumed run) the named trackers of the run in ``run_path``.

        ``params``: the resolved config as a nested mapping, logged flattened when a tracker
        run is first created. Off the main process nothing is opened.
        """
        names = list(dict.fromkeys(names))
        if not names or not dist.is_main():
            return cls()
        require(names)
        flat = flatten(params)
        writers: list[Any] = []
        try:
            for n in names:
                writers.append(_TensorBoard(run_path, flat) if n == "tensorboard"
                               else _MLflow(run_path, flat, name, experiment))
        except BaseException:
            for w in writers:
                w.close("FAILED")
            raise
        return cls(writers)

    def __bool__(self) -> bool:
        return bool(self.writers)

    def resume_at(self, step: int) -> None:
        """Training goes on after the checkpoint of ``step``: drop what was logged past it."""
        for w in self.writers:
            w.resume_at(step)

    def log_metrics(self, record: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        """Every numeric field of ``record`` at ``step`` (default: ``record["step"]``)."""
        if not self.writers:
            return
        values = {prefix + k: v for k, v in scalars(record).items()}
        step = int(record["step"] if step is None else step)
        for w in self.writers:
            w.log_metrics(values, step)

    def metrics_callback(self, prefix: str = "") -> Callable[[Mapping[str, Any]], None]:
        """``record -> None`` logging each record's numeric fields under ``prefix`` (e.g. the
        ``on_metrics`` of :func:`medlatent.eval.finetune.finetune` with ``prefix="finetune/"``)."""
        return lambda record: self.log_metrics(record, prefix=prefix)

    def log_figure(self, path: Path, tag: str, step: int) -> None:
        """A PNG as an image (TensorBoard) and an artifact under ``figures/`` (MLflow)."""
        if not self.writers or not Path(path).is_file():
            return
        for w in self.writers:
            w.log_figure(Path(path), tag, step)

    def log_final(self, values: Mapping[str, Any], step: int) -> None:
        """The run's final metrics (``final/loss``, ``final/steps``, ...)."""
        self.log_metrics(values, step, prefix="final/")

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close; ``status`` (FINISHED, KILLED, FAILED) is the MLflow run's end state.
        A tracker that fails to close is named in a warning (it never hides why a run failed)."""
        writers, self.writers = self.writers, []
        for w in writers:
            try:
                w.close(status)
            except Exception as e:  # noqa: BLE001
                logging.getLogger("medlatent").warning(f"closing the {w.name} tracker failed: {e}")


FINAL_METRICS = ("final/loss", "final/steps", "final/total_steps", "final/wall_s")


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_path: Path, params: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise ConfigError(f"train.log: tensorboard needs the tensorboard package: {_EXTRA}") from None
        self.dir = run_path / "tensorboard"
        fresh = not any(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(self.dir), flush_secs=10)
        if fresh:  # hyper-parameters once, when the tracker run is created
            exp, ssi, sei = hparams({k: v for k, v in params.items()}, {k: 0.0 for k in FINAL_METRICS})
            for summary in (exp, ssi, sei):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def resume_at(self, step: int) -> None:
        # What SummaryWriter(purge_step=...) writes: readers drop earlier events at steps >= it.
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_figure(self, path: Path, tag: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_path: Path, params: dict[str, Any], name: str, experiment: str) -> None:
        # Nothing written outside the run folder by default: no usage telemetry (it keeps an
        # installation id in the home folder); the local file store needs MLflow 3's opt-in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.memo = run_path / "mlflow_run.json"
        remembered = _read_json(self.memo)
        # The store the run started in (a resumed run keeps it): $MLFLOW_TRACKING_URI, else the
        # run's own mlruns/ (remembered as null, so a moved run folder still finds it).
        given = remembered.get("tracking_uri") if remembered.get("run_id") else os.environ.get("MLFLOW_TRACKING_URI")
        uri = given or (run_path / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(f"train.log: mlflow needs the mlflow package: {_EXTRA}") from None
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = remembered.get("run_id")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            known = set(self.client.get_run(self.run_id).data.params)
        else:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name,
                                                 tags={"medlatent.run_dir": str(run_path.resolve())}).info.run_id
            write_json_atomic(self.memo, dict(tracking_uri=given or None, experiment_id=exp_id, run_id=self.run_id))
            known = set()
        self._log_params({k: v for k, v in params.items() if k not in known})

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def resume_at(self, step: int) -> None:
        if not self.uri.startswith("file:"):
            return  # a server keeps the points; the newer ones at a step come last
        from urllib.parse import unquote, urlparse

        info = self.client.get_run(self.run_id).info
        folder = Path(unquote(urlparse(self.uri).path)) / info.experiment_id / self.run_id / "metrics"
        for f in folder.rglob("*") if folder.is_dir() else []:
            if not f.is_file():
                continue
            lines = f.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines if len(ln.split()) < 3 or int(ln.split()[2]) <= step]
            if len(keep) != len(lines):
                tmp = f.with_name(f".{f.name}.tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, f)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_figure(self, path: Path, tag: str, step: int) -> None:
        folder = "/".join(["figures", *tag.split("/")[:-1]])
        self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self) -> None:
        pass  # every call is written at once

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
