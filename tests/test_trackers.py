"""Experiment trackers (train.log / --log): TensorBoard and MLflow runs inside the run folder hold
the same scalars as metrics.jsonl, the config as parameters, final metrics and figures; a resumed
run appends to the same tracker run; a missing package is one error line naming the extra."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from medlatent.train import trackers

from conftest import invoke, run_cli, write_stripes_npz

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

TINY = ["--epochs", "2", "--batch-size", "32", "--precision", "fp32", "--set", "train.log_every=2"]


@pytest.fixture(autouse=True, scope="module")
def local_store() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the readers below open the run's file store
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stripes_npz(tmp_path_factory.mktemp("data") / "stripes.npz", n_train=128, n_val=32, n_test=32)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """One tiny pretraining run logged with --log tensorboard --log mlflow (and embedding maps)."""
    run = tmp_path_factory.mktemp("logged") / "run"
    assert invoke("pretrain", "--data", str(data), *TINY, "--set", "train.map_every=1",
                  "--log", "tensorboard", "--log", "mlflow", "--output", str(run)) == 0
    return run


def jsonl_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]


def tensorboard_events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def tensorboard_params(ea) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in hp.items()}


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    memo = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    return client, memo["run_id"]


def assert_same(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in logged] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(logged, expected):
        assert math.isclose(a, b, rel_tol=1e-6), (a, b)  # TensorBoard keeps float32


def test_tensorboard_holds_the_metrics_the_config_and_the_figures(logged: Path):
    run = logged
    ea = tensorboard_events(run)
    expected = jsonl_losses(run)
    assert [s for s, _ in expected] == [2, 4, 6, 8]
    assert_same([(e.step, e.value) for e in ea.Scalars("loss")], expected)
    assert {"lr", "epoch", "images_per_s", "final/loss", "final/steps"} <= set(ea.Tags()["scalars"])
    assert ea.Scalars("final/steps")[-1].value == 8
    params = tensorboard_params(ea)
    assert params["optim.lr"] == pytest.approx(2e-3) and params["train.batch_size"] == 32
    assert params["method"] == "simclr" and params["train.log"] == '["tensorboard", "mlflow"]'
    assert {"maps/epoch-0000", "maps/epoch-0002", "training_curves"} <= set(ea.Tags()["images"])


def test_mlflow_holds_the_metrics_the_config_and_the_figures(logged: Path, data: Path):
    run = logged
    client, run_id = mlflow_run(run)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert_same(history, jsonl_losses(run))
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    params = info.data.params
    assert params["optim.lr"] == "0.002" and params["train.batch_size"] == "32" and params["data.name"] == str(data)
    assert info.data.metrics["final/steps"] == 8 and "final/wall_s" in info.data.metrics
    assert info.data.metrics["final/loss"] == pytest.approx(jsonl_losses(run)[-1][1])
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/maps", "figures/training_curves.png"]
    assert [a.path for a in client.list_artifacts(run_id, "figures/maps")] == \
        [f"figures/maps/epoch-000{i}.png" for i in range(3)]


def test_resumed_run_appends_to_the_same_tracker_runs(tmp_path: Path, data: Path):
    from medlatent import api

    run = tmp_path / "run"
    cfg = dict(data=dict(name=str(data)), train=dict(epochs=2, batch_size=32, precision="fp32", log_every=1,
                                                     checkpoint_every=2, keep_checkpoints=50,
                                                     log=["tensorboard", "mlflow"]))
    polls = iter(range(100))
    _, first = api.run_pretraining(cfg, run, should_stop=lambda: next(polls) >= 4)  # stops after step 5
    assert first.status == "stopped" and first.step == 5
    client, run_id = mlflow_run(run)
    assert client.get_run(run_id).info.status == "KILLED"
    n_params = len(client.get_run(run_id).data.params)
    # As if killed after logging step 5 but before its checkpoint: the resume starts at step 4.
    shutil.rmtree(run / "checkpoints" / "step-00000005")
    _, result = api.run_pretraining(None, run, resume=True, overrides={"train.time_budget_s": 600.0})
    assert result.status == "finished" and result.step == 8

    expected = jsonl_losses(run)
    assert [s for s, _ in expected] == list(range(1, 9))
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == run_id
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert_same(history, expected)  # step 5 once: the point logged past the checkpoint was dropped
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and len(after.data.params) == n_params
    assert after.data.params["train.time_budget_s"] == "0.0"  # as created; MLflow parameters never change
    ea = tensorboard_events(run)
    assert_same([(e.step, e.value) for e in ea.Scalars("loss")], expected)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one log dir, appended


def test_missing_package_is_one_line_naming_the_extra(tmp_path: Path, data: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), *TINY, "--log", "mlflow", "--output", str(run))
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["error: train.log: mlflow needs the mlflow package: pip install 'medlatent[track]'"]
    assert not run.exists()  # refused before anything was written


def test_unknown_tracker_is_refused_by_key(tmp_path: Path, data: Path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), *TINY, "--set", "train.log=[wandb]",
                           "--output", str(tmp_path / "run"))
    assert code == 1 and "train.log[0]: 'wandb' is not one of 'tensorboard', 'mlflow'" in err
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), "--log", "wandb")
    assert code != 0 and "wandb" in err and "--log" in err


def test_log_is_refused_on_resume(tmp_path: Path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--resume", str(tmp_path), "--log", "tensorboard")
    assert code == 1 and "--log would change the run" in err


def test_flatten_names_nested_keys_with_dots():
    flat = trackers.flatten(dict(optim=dict(lr=0.1, betas=[0.9, 0.99]), method="simclr", method_options={},
                                 data=dict(classes=None, size=28)))
    assert flat == {"optim.lr": 0.1, "optim.betas": "[0.9, 0.99]", "method": "simclr", "method_options": "{}",
                    "data.classes": "null", "data.size": 28}
    assert trackers.scalars(dict(step=3, loss=1.5, event="x", ok=True, bad=float("nan"))) == {"loss": 1.5}


def test_only_the_main_process_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(trackers.dist, "is_main", lambda: False)
    tracked = trackers.Trackers.open(["tensorboard", "mlflow"], tmp_path, {}, "x")
    assert not tracked
    tracked.log_metrics(dict(step=1, loss=1.0))
    tracked.close()
    assert list(tmp_path.iterdir()) == []


def test_finetune_reports_metrics_to_a_callback(tmp_path: Path, data: Path):
    import torch

    from medlatent.config import DataConfig
    from medlatent.data.sources import load_dataset
    from medlatent.eval.finetune import FinetuneConfig, finetune
    from medlatent.nets.backbones import build_encoder

    ds = load_dataset(DataConfig(name=str(data)))
    tracked = trackers.Trackers.open(["tensorboard"], tmp_path, {}, "ft")
    records: list[dict] = []

    def both(record: dict) -> None:
        records.append(record)
        tracked.metrics_callback("finetune/")(record)

    cfg = FinetuneConfig(epochs=1, min_steps=4, batch_size=32, eval_every=2)
    torch.manual_seed(0)
    finetune(build_encoder("resnet18-quarter", 1, 28), ds.split("train"), ds.split("val"), ds.task, ds.n_classes,
             [0.5], [0.25], ds.name, cfg, torch.device("cpu"), on_metrics=both)
    tracked.close()
    assert not (tmp_path / "mlruns").exists()  # only the tracker asked for
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "val_acc", "val_auc"} <= set(records[0]) and all(math.isfinite(r["loss"]) for r in records)
    ea = tensorboard_events(tmp_path)
    assert [(e.step, round(e.value, 5)) for e in ea.Scalars("finetune/val_acc")] == \
        [(r["step"], round(r["val_acc"], 5)) for r in records]
