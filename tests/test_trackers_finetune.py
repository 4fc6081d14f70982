"""Experiment trackers for adaptation and label efficiency (``adapt --log``, ``efficiency --log``):
the adapter's training scalars, its config as parameters and its final metrics in
``<adapter>.trackers/``; every fine-tuning / supervised training of ``efficiency`` under
``<protocol>/<fraction>/seed<n>/`` in the run's ``tensorboard/`` and ``mlruns/``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from medlatent import api

from test_trackers import tensorboard_params
from conftest import invoke, run_cli, write_stripes_npz

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

TINY_FT = dict(epochs=1, min_steps=4, batch_size=16, eval_every=2)


@pytest.fixture(autouse=True, scope="module")
def local_store() -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only waits on the first (put back after)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the readers below open the file store
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining run (quarter-width ResNet-18, SimCLR), no trackers of its own."""
    tmp = tmp_path_factory.mktemp("ftrack")
    data = write_stripes_npz(tmp / "stripes.npz", n_train=32, n_val=16, n_test=16)
    assert invoke("pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--precision", "fp32",
                  "--output", str(tmp / "run")) == 0
    return tmp / "run"


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def assert_close(logged: list[tuple[int, float]], records: list[dict], key: str) -> None:
    assert [s for s, _ in logged] == [r["step"] for r in records]
    for (_, a), r in zip(logged, records):
        assert math.isclose(a, r[key], rel_tol=1e-6), (a, r[key])  # TensorBoard keeps float32


def tiny_adapt(run: Path, out: Path, log: tuple[str, ...]) -> tuple[dict, list[dict]]:
    records: list[dict] = []
    result = api.adapt(run, api.AdaptConfig(strategy="bias"), label_fraction=0.5, seed=3,
                       finetune=api.FinetuneConfig(feature_norm=True, **TINY_FT), out=out, device="cpu",
                       log=log, on_metrics=records.append)
    assert [r["step"] for r in records] == [2, 4]
    return result, records


def test_adapt_logs_to_tensorboard_beside_the_adapter(run: Path, tmp_path: Path):
    result, records = tiny_adapt(run, tmp_path / "bias", ("tensorboard",))
    folder = tmp_path / "bias.trackers"
    assert result["trackers"] == str(folder) and sorted(p.name for p in folder.iterdir()) == ["tensorboard"]
    ea = events(folder / "tensorboard")
    for key in ("loss", "lr", "val_acc"):
        assert_close([(e.step, e.value) for e in ea.Scalars(key)], records, key)
    final = {t: ea.Scalars(t)[-1] for t in ea.Tags()["scalars"] if t.startswith("final/")}
    assert final["final/test_acc"].value == pytest.approx(result["test"]["acc"], rel=1e-6)
    assert final["final/trainable_params"].value == result["trainable_params"] and final["final/steps"].step == 4
    params = tensorboard_params(ea)
    assert params["adapt.strategy"] == "bias" and params["label_fraction"] == 0.5 and params["seed"] == 3
    assert params["finetune.min_steps"] == 4 and params["finetune.feature_norm"] == 1.0  # True as a number

    # The same adapter written again: its events are replaced, not appended.
    tiny_adapt(run, tmp_path / "bias", ("tensorboard",))
    assert [e.step for e in events(folder / "tensorboard").Scalars("loss")] == [2, 4]


def test_adapt_logs_to_mlflow_beside_the_adapter(run: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    result, records = tiny_adapt(run, tmp_path / "bias", ("mlflow",))
    folder = tmp_path / "bias.trackers"
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow_run.json", "mlruns"]
    run_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    for key in ("loss", "lr", "val_acc"):
        assert_close(sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)), records, key)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "bias"
    p = info.data.params
    assert p["adapt.strategy"] == "bias" and p["label_fraction"] == "0.5" and p["seed"] == "3"
    assert p["finetune.epochs"] == "1" and p["finetune.eval_every"] == "2" and p["base"] == str(run)
    m = info.data.metrics
    assert m["final/test_acc"] == pytest.approx(result["test"]["acc"]) and m["final/test_auc"] == pytest.approx(
        result["test"]["auc"])
    assert m["final/trainable_params"] == result["trainable_params"]


def test_adapt_cli_refuses_unknown_or_missing_trackers_before_training(run: Path, tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "a"
    code, _, err = run_cli(capsys, "adapt", str(run), "--strategy", "bias", "--log", "wandb", "--out", str(out))
    assert code == 1
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        ["error: train.log: unknown tracker 'wandb' (known: tensorboard, mlflow)"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    for args in (("adapt", str(run), "--strategy", "bias", "--out", str(out)), ("efficiency", str(run))):
        code, _, err = run_cli(capsys, *args, "--log", "mlflow")
        assert code == 1
        assert [ln for ln in err.splitlines() if ln.strip()] == \
            ["error: train.log: mlflow needs the mlflow package: pip install 'medlatent[track]'"]
    assert list(tmp_path.iterdir()) == [] and not (run / "label_efficiency.json").exists()


def test_efficiency_logs_each_training_under_its_prefix(run: Path, capsys):
    code, _, err = run_cli(capsys, "efficiency", str(run), "--protocol", "finetune", "--label-fraction", "0.5",
                           "--seeds", "1", "--epochs", "1", "--min-steps", "2", "--log", "tensorboard")
    assert code == 0, err
    ea = events(run / "tensorboard")
    tags = set(ea.Tags()["scalars"])
    assert {"finetune/0.5/seed0/loss", "finetune/0.5/seed0/lr", "finetune/0.5/seed0/val_acc",
            "finetune/0.5/seed0/test_acc", "final/finetune/0.5/test_acc"} <= tags
    assert not any(t.startswith("supervised/") for t in tags)
    result = json.loads((run / "label_efficiency.json").read_text())
    (row,) = [r for r in result["rows"] if r["protocol"] == "finetune"]
    assert [e.step for e in ea.Scalars("finetune/0.5/seed0/loss")] == [row["steps"]] == [2]
    assert ea.Scalars("finetune/0.5/seed0/test_acc")[-1].value == pytest.approx(row["acc"], rel=1e-6)
    assert tensorboard_params(ea)["efficiency.fractions"] == "[0.5]"  # the run had no events: params written


def test_label_efficiency_api_passes_records_with_their_prefix(run: Path, tmp_path: Path):
    seen: list[tuple[str, dict]] = []
    api.label_efficiency(run, (0.5,), (0,), ("supervised",), api.FinetuneConfig(**TINY_FT), device="cpu",
                         on_metrics=lambda prefix, record: seen.append((prefix, record)))
    assert [(p, r["step"]) for p, r in seen] == [("supervised/0.5/seed0/", 2), ("supervised/0.5/seed0/", 4),
                                                 ("supervised/0.5/seed0/", 4)]
    assert "loss" in seen[0][1] and "test_acc" in seen[-1][1]
