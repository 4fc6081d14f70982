"""SimCLR trains, the loop guards against NaN, and probing reads the run back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlatent import api
from medlatent.config import PretrainConfig
from medlatent.errors import TrainingDiverged
from medlatent.nets.backbones import build_encoder
from medlatent.methods.contract import StepOutput
from medlatent.methods.registry import METHODS, get_method
from medlatent.train import checkpoint

from conftest import write_stripes_npz


def tiny_config(data: Path, epochs: int = 1, **train) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.data.name = str(data)
    cfg.train.epochs = epochs
    cfg.train.batch_size = 32
    cfg.train.precision = "fp32"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def small_encoder(needs_vit: bool, size: int, spatial_dims: int) -> torch.nn.Module:
    from medlatent.nets.backbones import ViTEncoder

    if needs_vit:
        return ViTEncoder(1, size, 4, hidden_size=48, depth=2, num_heads=3, spatial_dims=spatial_dims)
    return build_encoder("resnet18-quarter", 1, size, spatial_dims)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_each_method_trains_two_steps(name: str, spatial_dims: int):
    from medlatent.augment.views import ViewRecipe
    from medlatent.config import ViewConfig
    from medlatent.methods.contract import BuildContext

    torch.manual_seed(0)
    spec = get_method(name)
    size = 28 if spatial_dims == 2 else 16
    enc = small_encoder(spec.needs_vit, size, spatial_dims)
    options = spec.options()
    method = spec.build(enc, options, BuildContext(64, 8, size, 1, spatial_dims))
    recipe = ViewRecipe(spec.views(ViewConfig(), size, options), [0.5], [0.25])
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    trainable = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in method.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1) + (size,) * spatial_dims, dtype=torch.uint8)
    for step in range(2):
        out = method(recipe(images, g))
        assert isinstance(out, StepOutput) and torch.isfinite(out.loss), name
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.on_step_end(step, 2)
    params = dict(method.named_parameters())
    unchanged = [n for n, v in trainable.items() if torch.equal(v, params[n])]
    assert unchanged == [], f"{name}: trainable parameters did not change: {unchanged[:5]}"
    teachers = [n for n, v in frozen.items() if not torch.equal(v, params[n])]
    if any(k in n for n in frozen for k in ("teacher", "key_", "momentum_", "target_")):
        assert teachers, f"{name}: the EMA teacher did not move"


def test_pretrain_then_probe(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", n_train=256, n_val=64, n_test=64)
    run = api.pretrain(tiny_config(data, epochs=2), output=tmp_path / "run")
    for name in ("config.yaml", "env.json", "data.json", "metrics.jsonl", "encoder.safetensors"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["autocast"] == "fp32" and env["torch"].startswith("2.")
    result = api.probe(run, label_fractions=(0.1, 1.0), seeds=(0, 1))
    test_rows = [r for r in result["summary"] if r["split"] == "test" and r["fraction"] == 1.0]
    assert {r["protocol"] for r in test_rows} == {"knn", "linear"}
    assert all(r["acc"] > 0.75 for r in test_rows)  # stripes: orientation is easy to tell apart
    assert any(r["n_seeds"] == 2 for r in result["summary"] if r["fraction"] == 0.1)
    assert json.loads((run / "probe.json").read_text())["encoder_step"] == 16
    emb = api.embed(run, "test")
    import numpy as np

    z = np.load(emb)
    encoder, _, _ = api.load_encoder(run)
    assert z["embeddings"].shape == (64, encoder.out_dim) and z["labels"].shape == (64, 1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch):
    from medlatent.ssl import simclr

    data = write_stripes_npz(tmp_path / "s.npz", n_train=128)
    real_forward = simclr.SimCLR.forward
    calls = {"n": 0}

    def poisoned(self, views):  # noqa: ANN001, ANN202
        calls["n"] += 1
        out = real_forward(self, views)
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(simclr.SimCLR, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        api.pretrain(tiny_config(data, epochs=2, checkpoint_every=2), output=tmp_path / "run")
    assert "loss became nan at step 3" in str(e.value) and "step-00000002" in str(e.value)
    kept = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000002"]
    assert all(torch.isfinite(v.float()).all() for v in checkpoint.load(kept[0]).model.values())
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_time_budget_stops_with_a_checkpoint(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", n_train=128)
    run, result = api.run_pretraining(tiny_config(data, epochs=50, time_budget_s=1e-9), output=tmp_path / "run")
    assert result.status == "budget" and result.step == 1
    assert checkpoint.latest(run / "checkpoints").step == 1


def test_warmup_never_takes_the_whole_run(tmp_path: Path):
    """Two warm-up epochs in a one-epoch run: the warm-up is capped at a fifth of the steps, so
    the learning rate reaches its peak (it used to stop at half of it)."""
    data = write_stripes_npz(tmp_path / "s.npz", n_train=256, n_val=64, n_test=64)
    cfg = tiny_config(data, epochs=1, log_every=1)
    assert cfg.optim.warmup_epochs == 2.0
    run = api.pretrain(cfg, output=tmp_path / "run")
    lrs = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    peak = cfg.optim.lr * cfg.train.batch_size / 256
    assert len(lrs) == 8 and max(lrs) == pytest.approx(peak, rel=0.05)


def test_fractional_epochs_end_mid_epoch(tmp_path: Path):
    """1.5 epochs of 4 steps each is a 6-step schedule: the last checkpoint is step 6, the one at
    the end of epoch 1 is step 4, and the cosine schedule spans the 6 steps (warm-up capped at 1)."""
    from medlatent.train.optim import lr_at

    data = write_stripes_npz(tmp_path / "s.npz", n_train=128)
    cfg = tiny_config(data, epochs=1.5, log_every=1)  # 128 images / batch 32 = 4 steps an epoch
    run, result = api.run_pretraining(cfg, output=tmp_path / "run")
    assert (result.status, result.step, result.total_steps) == ("finished", 6, 6)
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-00000004", "step-00000006"]
    lrs = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    peak = cfg.optim.lr * cfg.train.batch_size / 256
    assert lrs == pytest.approx([lr_at(s, 6, 1, peak, cfg.optim.final_lr_fraction) for s in range(6)])
    assert lrs[-1] < 0.11 * peak  # the decay is complete, not cut off at 1 epoch's worth
