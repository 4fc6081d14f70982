from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from medlatent.config import OptimConfig
from medlatent.train import checkpoint
from medlatent.train.optim import LARS, build_optimizer, lr_at, param_groups


def test_schedule_warmup_peak_and_cosine_end():
    total, warm, peak = 100, 10, 1.0
    assert lr_at(0, total, warm, peak, 0.0) == pytest.approx(0.1)
    assert lr_at(9, total, warm, peak, 0.0) == pytest.approx(1.0)
    assert lr_at(10, total, warm, peak, 0.0) == pytest.approx(1.0)
    assert lr_at(55, total, warm, peak, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, total, warm, peak, 0.01) == pytest.approx(0.01)


def test_param_groups_exclude_biases_and_norms():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    decay, no_decay = param_groups(m, 0.1)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0


def test_lars_step_uses_the_trust_ratio():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])  # ||g|| = 1
    opt = LARS([dict(params=[w], weight_decay=0.0, lars=True)], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    opt.step()
    # step = lr * eta * ||w|| / ||g|| * g = 0.005 * g
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.003, 4.0 - 0.004]))
    b = nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([0.5])
    LARS([dict(params=[b], weight_decay=0.0, lars=False)], lr=0.1, momentum=0.0).step()
    assert torch.allclose(b.detach(), torch.tensor([0.95]))  # plain SGD for excluded params


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path: Path):
    model = _model()
    opt = build_optimizer(model, OptimConfig(), 1e-2)
    for _ in range(3):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = checkpoint.save(tmp_path, 3, model, opt, dict(epoch=0))
    assert path.name == "step-00000003" and sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]
    ck = checkpoint.latest(tmp_path)
    model2 = _model()
    opt2 = build_optimizer(model2, OptimConfig(), 1e-2)
    model2.load_state_dict(ck.model)
    opt2.load_state_dict(ck.optimizer)
    x = torch.randn(16, 4)
    for m, o in ((model, opt), (model2, opt2)):
        loss = m(x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_pruning_and_leftovers(tmp_path: Path):
    model = _model()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, None, {}, keep=2)
    (tmp_path / ".step-00000005.tmp-999").mkdir()  # a write that was killed half-way
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(tmp_path).step == 4
    checkpoint.prune(tmp_path, 2)
    assert not (tmp_path / ".step-00000005.tmp-999").exists()
    assert math.isfinite(float(sum(v.float().sum() for v in checkpoint.latest(tmp_path).model.values())))
