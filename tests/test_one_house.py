"""One house: the CLI and the API build the same run.

Every training command family (pretrain, generate, anomaly, restore) turns its flags into a
mapping that :func:`medlatent.api.make_config` resolves with the method's own training
defaults (``MethodSpec.defaults``); ``medlatent adapt`` and :func:`medlatent.api.adapt` write
the same adapter description; a generative model added by ARCHITECTURE.md's recipe alone
trains through both; and the old flag names still work for one release, with one warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medlatent import api
from medlatent.cli import common
from medlatent.methods.registry import GENERATIVE
from medlatent.train.runs import RunDir

from conftest import invoke, run_cli, write_stripes_npz

TINY = {"epochs": 0.5, "batch_size": 32}  # 64 training images: a single optimiser step
TINY_FLAGS = ["--epochs", "0.5", "--batch-size", "32"]


def saved(run: Path) -> dict[str, Any]:
    """A run's config.yaml as the mapping it holds."""
    return yaml.safe_load((run / "config.yaml").read_text())


def deprecation_lines(err: str, old: str, new: str) -> list[str]:
    return [ln for ln in err.splitlines()
            if ln.strip() == f"warning: {old} is deprecated and will be removed; use {new}"]


@pytest.fixture
def data(tmp_path: Path) -> str:
    return str(write_stripes_npz(tmp_path / "stripes.npz", 64, 16, 16))


@pytest.fixture(scope="module")
def simclr_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The same SimCLR run built by ``medlatent pretrain`` (cli) and by ``api.pretrain`` (api)."""
    root = tmp_path_factory.mktemp("simclr")
    data = str(write_stripes_npz(root / "stripes.npz", 64, 16, 16))
    cli_run, api_run = root / "cli", root / "api"
    assert invoke("pretrain", "--data", data, *TINY_FLAGS, "--output", str(cli_run)) == 0
    tree = {"method": "simclr", "data": {"name": data}, "train": dict(TINY)}
    assert api.pretrain(api.make_config(tree), output=api_run) == api_run
    return cli_run, api_run, data


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The configs training commands hand to the trainer, without training."""
    configs: list[Any] = []
    monkeypatch.setattr(common, "run_training",
                        lambda cfg, output, resume, overrides=None: configs.append(cfg))
    return configs


# ------------------------------------------------------------ 1. every family: CLI == API


def test_pretrain_cli_and_api_write_the_same_config(simclr_runs):
    cli_run, api_run, _ = simclr_runs
    assert RunDir(cli_run).has_checkpoint() and RunDir(api_run).has_checkpoint()
    assert saved(cli_run) == saved(api_run)
    assert saved(cli_run)["method"] == "simclr" and saved(cli_run)["train"]["batch_size"] == 32


def test_generate_train_cli_and_api_write_the_same_config(capsys, tmp_path, data):
    small = {"width": 8, "latent_dim": 4}
    code, out, err = run_cli(capsys, "generate", "train", "--method", "vae", "--data", data, *TINY_FLAGS,
                             "--set", "method_options.width=8", "--set", "method_options.latent_dim=4",
                             "--output", str(tmp_path / "cli"))
    assert code == 0 and "generate sample" in out, err
    tree = {"method": "vae", "data": {"name": data}, "train": dict(TINY), "method_options": small}
    api.pretrain(api.make_config(tree), output=tmp_path / "api")
    cli, from_api = saved(tmp_path / "cli"), saved(tmp_path / "api")
    assert cli == from_api
    # the spec's defaults apply where no flag was given; the flag wins where one was
    assert cli["optim"]["lr"] == 2e-3 and cli["optim"]["clip_grad_norm"] == 100.0
    assert cli["train"]["batch_size"] == 32  # the spec says 128
    assert cli["method_options"]["width"] == 8 and cli["method_options"]["latent_dim"] == 4


def test_anomaly_fit_cli_and_api_write_the_same_config(capsys, tmp_path, data):
    # 27 of the 64 training images are of class 0: batch 16
    code, _, err = run_cli(capsys, "anomaly", "fit", "--method", "ae", "--normal", "0", "--data", data,
                           "--epochs", "0.5", "--batch-size", "16", "--output", str(tmp_path / "cli"))
    assert code == 0, err
    tree = {"method": "autoencoder", "data": {"name": data, "classes": [0]},
            "train": {"epochs": 0.5, "batch_size": 16}}
    api.pretrain(api.make_config(tree), output=tmp_path / "api")
    cli = saved(tmp_path / "cli")
    assert cli == saved(tmp_path / "api")
    assert cli["method"] == "autoencoder" and cli["data"]["classes"] == [0] and cli["train"]["batch_size"] == 16


def test_restore_train_cli_and_api_write_the_same_config(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, "restore", "train", "--method", "unet", "--task", "denoise", "--data", data,
                           *TINY_FLAGS, "--output", str(tmp_path / "cli"))
    assert code == 0, err
    tree = {"method": "restore", "method_options": {"task": "denoise"}, "data": {"name": data},
            "train": dict(TINY)}
    api.pretrain(api.make_config(tree), output=tmp_path / "api")
    cli = saved(tmp_path / "cli")
    assert cli == saved(tmp_path / "api")
    assert cli["method"] == "restore" and cli["method_options"]["task"] == "denoise"
    assert cli["train"]["epochs"] == 0.5  # the flag over the spec's 20
    assert cli["optim"]["lr"] == 2e-3 and cli["optim"]["clip_grad_norm"] is None  # the spec's


def test_spec_defaults_apply_on_both_paths_and_flags_override_them(capsys, captured, data):
    # GAN: DCGAN's betas and a constant learning rate, from the spec, on both paths
    gan = api.make_config({"method": "gan"})
    assert list(gan.optim.betas) == [0.5, 0.999] and gan.optim.final_lr_fraction == 1.0
    assert gan.optim.lr == 4e-4 and gan.train.batch_size == 128
    assert run_cli(capsys, "generate", "train", "--method", "gan", "--data", data)[0] == 0
    assert captured.pop() == api.make_config({"method": "gan", "data": {"name": data}})
    # a flag overrides a spec default, and leaves the others in place, on both paths
    code, _, err = run_cli(capsys, "generate", "train", "--method", "gan", "--data", data, "--lr", "1e-4",
                           "--batch-size", "64")
    assert code == 0, err
    cli = captured.pop()
    assert cli == api.make_config({"method": "gan", "data": {"name": data}, "optim": {"lr": 1e-4},
                                   "train": {"batch_size": 64}})
    assert cli.optim.lr == 1e-4 and cli.train.batch_size == 64
    assert list(cli.optim.betas) == [0.5, 0.999] and cli.optim.final_lr_fraction == 1.0
    # restore: 20 epochs unless --epochs says otherwise
    assert api.make_config({"method": "restore"}).train.epochs == 20
    assert run_cli(capsys, "restore", "train", "--data", data)[0] == 0
    cli = captured.pop()
    assert cli.train.epochs == 20 and cli == api.make_config(
        {"method": "restore", "method_options": {"task": "denoise"}, "data": {"name": data}})
    assert run_cli(capsys, "restore", "train", "--data", data, "--epochs", "3")[0] == 0
    assert captured.pop().train.epochs == 3
    # a method without training defaults gets the config's own
    assert api.make_config({"method": "simclr"}) == api.make_config()


# ------------------------------------------------------------------ 2. adapt: CLI == API


def test_adapt_cli_and_api_write_the_same_adapter_description(capsys, tmp_path, simclr_runs):
    from medlatent.api import AdaptConfig, FinetuneConfig

    run = str(simclr_runs[0])
    code, out, err = run_cli(capsys, "adapt", run, "--strategy", "bias", "--label-fraction", "0.5", "--epochs", "1",
                             "--min-steps", "1", "--out", str(tmp_path / "cli"))
    assert code == 0 and "bias:" in out, err
    r = api.adapt(run, AdaptConfig(strategy="bias"), label_fraction=0.5,
                  finetune=FinetuneConfig(feature_norm=True, epochs=1, min_steps=1), out=tmp_path / "api")
    # the JSON does not hold the fraction or the fine-tuning budget: what they decide is printed
    assert f"{r['n_labels']} labels, {r['steps']} steps" in out and 0 < r["n_labels"] < 64
    cli = json.loads((tmp_path / "cli.json").read_text())
    from_api = json.loads((tmp_path / "api.json").read_text())
    assert cli["adapt"]["strategy"] == "bias"
    # what describes the resolved configuration (the label fraction and seed are not stored)
    for key in ("adapt", "base_hash", "feature_norm", "n_outputs", "task", "data", "mean", "std", "base"):
        assert cli[key] == from_api[key], key
    assert cli["feature_norm"] is True


# --------------------------------------- 3. a new generative model by ARCHITECTURE.md alone


DUMMY = '''
"""A dummy generative model: one convolution from noise to images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent.generative.common import conv, whole_image_views
from medlatent.methods.contract import BuildContext, MethodSpec, StepOutput


@dataclass
class DummyConfig:
    """Sizes of the dummy."""

    # Channels of the noise the decoder turns into an image.
    noise_channels: int = 2


class Dummy(nn.Module):
    """Noise (B, K, *S) -> one convolution -> images (B, C, *S), MSE against the view."""

    def __init__(self, spatial_dims: int, channels: int, cfg: DummyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = conv(spatial_dims)(cfg.noise_channels, channels, 3, padding=1)
# ENCODER
    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        x = views[0]  # (B, C, *S) in [-1, 1]
        noise = torch.randn(len(x), self.cfg.noise_channels, *x.shape[2:], device=x.device)
        loss = F.mse_loss(self.decoder(noise).float(), x.float())
        return StepOutput(loss, {"mse": loss.detach()})

    def on_step_end(self, step: int, total_steps: int) -> None:
        pass

    @torch.no_grad()
    def generate(self, n: int, shape: tuple[int, ...], labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
        device = next(self.parameters()).device
        noise = torch.randn(n, self.cfg.noise_channels, *shape[1:], generator=generator, device=device)
        return self.decoder(noise).clamp(-1, 1)


def _build(encoder: nn.Module, o: DummyConfig, context: BuildContext) -> Dummy:
    return Dummy(context.spatial_dims, context.channels, o)


SPEC = MethodSpec("dummy", DummyConfig, _build, whole_image_views, "one convolution from noise (a test)",
                  uses_labels=True, pixel_range="symmetric", exports_encoder=False,
                  defaults={"optim": {"lr": 3.21e-3, "weight_decay": 0.0}, "train": {"batch_size": 16}})
'''


# The general method contract has an ``encoder``; the generative recipe does not list one, yet
# api._train reads ``method.encoder`` (channels_last; train.compile and train.map_every too).
ENCODER = '''
    @property
    def encoder(self) -> nn.Module:
        return self.decoder
'''


@pytest.mark.parametrize("with_encoder", [
    pytest.param(False, id="recipe"),
    pytest.param(True, id="recipe+encoder")])
def test_new_generative_model_by_the_recipe_trains_through_api_and_cli(capsys, tmp_path, data, monkeypatch,
                                                                      with_encoder):
    module = f"medlatent_test_dummy_gen_{int(with_encoder)}"
    (tmp_path / f"{module}.py").write_text(DUMMY.replace("# ENCODER\n", ENCODER if with_encoder else "\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(GENERATIVE, "dummy", module)  # the recipe's one line
    assert "dummy" in api.generative_models() and api.is_generative("dummy")

    run = api.pretrain({"method": "dummy", "data": {"name": data}, "train": {"epochs": 0.5}},
                       output=tmp_path / "api")
    code, out, err = run_cli(capsys, "generate", "train", "--method", "dummy", "--data", data, "--epochs", "0.5",
                             "--output", str(tmp_path / "cli"))
    assert code == 0 and "generate sample" in out, err
    for path in (run, tmp_path / "cli"):
        assert RunDir(path).has_checkpoint(), path
        assert not (path / "encoder.safetensors").exists()  # exports_encoder=False
        cfg = saved(path)
        assert cfg["method"] == "dummy" and cfg["method_options"] == {"noise_channels": 2}
        assert cfg["optim"]["lr"] == 3.21e-3 and cfg["train"]["batch_size"] == 16  # the spec's defaults
    assert saved(run) == saved(tmp_path / "cli")
    # generate sample covers it too
    code, out, err = run_cli(capsys, "generate", "sample", str(run), "--n", "4")
    assert code == 0 and "4 samples" in out, err


# ------------------------------------------------------ 4. old flag names, one release more


def test_deprecated_generate_and_anomaly_flags_warn_once_and_mean_the_same(capsys, captured, data):
    code, _, err = run_cli(capsys, "generate", "train", "--model", "vae", "--data", data, *TINY_FLAGS)
    assert code == 0 and len(deprecation_lines(err, "--model", "--method")) == 1, err
    old = captured.pop()
    code, _, err = run_cli(capsys, "generate", "train", "--method", "vae", "--data", data, *TINY_FLAGS)
    assert code == 0 and "deprecated" not in err, err
    assert captured.pop() == old and old.method == "vae"

    code, _, err = run_cli(capsys, "anomaly", "fit", "--detector", "ae", "--normal", "0", "--data", data, *TINY_FLAGS)
    assert code == 0 and len(deprecation_lines(err, "--detector", "--method")) == 1, err
    old = captured.pop()
    code, _, err = run_cli(capsys, "anomaly", "fit", "--method", "ae", "--normal", "0", "--data", data, *TINY_FLAGS)
    assert code == 0 and "deprecated" not in err, err
    assert captured.pop() == old and old.method == "autoencoder" and old.data.classes == [0]


def test_deprecated_efficiency_fraction_warns_once(capsys, simclr_runs):
    run = str(simclr_runs[1])
    code, out, err = run_cli(capsys, "efficiency", run, "--fraction", "0.5", "--protocol", "knn", "--seeds", "1")
    assert code == 0, err
    assert len(deprecation_lines(err, "--fraction", "--label-fraction")) == 1, err
    result = json.loads((Path(run) / "label_efficiency.json").read_text())
    assert {r["fraction"] for r in result["summary"]} == {0.5}
