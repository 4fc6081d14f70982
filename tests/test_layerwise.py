"""Greedy layer-wise autoencoder pretraining (``method_options.layerwise``): the phase schedule,
frozen stages below the one in training, the stage loss against a naive recomputation, exact
resume in the middle of a greedy phase, and the plain autoencoder unchanged without it."""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medlatent import api
from medlatent.config import OptimConfig, from_dict
from medlatent.errors import ConfigError
from medlatent.methods.contract import BuildContext
from medlatent.methods.registry import get_method
from medlatent.nets.backbones import ResNetEncoder, ViTEncoder, build_encoder, encoder_stages
from medlatent.ssl import autoencoder
from medlatent.ssl.autoencoder import Autoencoder, layerwise_stage
from medlatent.train import checkpoint
from medlatent.train.optim import build_optimizer
from medlatent.train.runs import RunDir

from conftest import write_stripes_npz


def side(spatial_dims: int) -> int:
    return 16 if spatial_dims == 2 else 8  # 3-D: 8 px reach the last stage at 1 px


def build(spatial_dims: int = 2, name: str = "autoencoder", **options: object) -> Autoencoder:
    """A tiny autoencoder (quarter-width ResNet-18, 8 decoder channels) built as runs build it."""
    torch.manual_seed(0)
    size = side(spatial_dims)
    spec = get_method(name)
    o = from_dict(spec.options, dict(decoder_channels=8, **options), "method_options")
    encoder = build_encoder("resnet18-quarter", 1, size, spatial_dims)
    return spec.build(encoder, o, BuildContext(32, 8, size, 1, spatial_dims))


def images(spatial_dims: int = 2, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 1) + (side(spatial_dims),) * spatial_dims, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("total", [1, 2, 3, 7, 8, 12, 100, 1001])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_the_phase_of_a_step_follows_its_definition(total: int, fraction: float):
    greedy = max(1, round(fraction * total))  # the first G steps are greedy, G >= 1
    phases = [layerwise_stage(s, total, fraction) for s in range(total)]
    for s, phase in enumerate(phases):
        # stage k holds the steps with (k - 1) G / 4 <= s < k G / 4, in exact arithmetic
        expected = next(k for k in range(1, 5) if Fraction(s) < Fraction(k * greedy, 4)) if s < greedy else 5
        assert phase == expected, (s, total, fraction)
    assert phases[0] == 1 and phases == sorted(phases)  # starts greedy, never goes back
    counts = [phases.count(k) for k in range(1, 5)]
    assert sum(counts) == min(greedy, total) and max(counts) - min(counts) <= 1  # split evenly


def test_the_method_reads_its_phase_from_step_and_total():
    assert [layerwise_stage(s, 12, 0.5) for s in range(12)] == [1, 1, 2, 3, 3, 4, 5, 5, 5, 5, 5, 5]
    method = build(layerwise=True, layerwise_fraction=0.5)
    assert method.current_stage() == 1  # before the first step: step 0 of any run
    for step in range(12):
        assert method.current_stage() == layerwise_stage(step, 12, 0.5)
        method.on_step_end(step, 12)
    assert method.progress.tolist() == [12, 12]
    fresh = build(layerwise=True, layerwise_fraction=0.5)
    fresh.on_step_end(0, 12)
    fresh.load_state_dict(method.state_dict())  # a resume: the host copy follows the loaded buffer
    assert fresh.current_stage() == 5 and fresh._progress == (12, 12)


# --------------------------------------------------------------------- the stages


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("block,stem", [("basic", "cifar"), ("basic", "imagenet"), ("bottleneck", "cifar")])
def test_encoder_stages_compose_to_the_encoder(spatial_dims: int, block: str, stem: str):
    torch.manual_seed(0)
    encoder = ResNetEncoder(1, spatial_dims, width=4, layers=(1, 1, 1, 1), block=block, stem=stem).eval()
    size = 32 if stem == "imagenet" else 16
    x = torch.randn((2, 1) + (size,) * spatial_dims)
    stages = encoder_stages(encoder)
    h = x
    for stage in stages:
        assert h.shape[1] == stage.in_channels
        h = stage.module(h)
        assert h.shape[1] == stage.out_channels
    assert torch.allclose(encoder.avgpool(h).flatten(1), encoder(x), atol=1e-6)
    owned = {id(p) for p in encoder.parameters()}
    staged = [id(p) for s in stages for p in s.module.parameters()]
    assert len(staged) == len(owned) and set(staged) == owned  # every parameter in one stage, no copies
    with pytest.raises(TypeError, match="ViTEncoder has no convolutional stages"):
        encoder_stages(ViTEncoder(1, 16, 4, hidden_size=12, depth=1, num_heads=3))


def _state(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of ``module``'s parameters and buffers."""
    return [p.detach().clone() for p in module.parameters()], [b.clone() for b in module.buffers()]


def assert_frozen(module: nn.Module, before: tuple[list[torch.Tensor], list[torch.Tensor]],
                  grads: list[torch.Tensor | None], where: str) -> None:
    """No gradient (None, not zero: optimisers skip such parameters), parameters and buffers
    (batch-norm statistics) as they were."""
    params, buffers = _state(module)
    assert all(g is None for g in grads), f"{where}: a frozen parameter got a gradient"
    assert all(torch.equal(a, b) for a, b in zip(before[0], params)), f"{where}: a frozen parameter moved"
    assert all(torch.equal(a, b) for a, b in zip(before[1], buffers)), f"{where}: a frozen buffer changed"


def assert_trained(module: nn.Module, before: tuple[list[torch.Tensor], list[torch.Tensor]],
                   grads: list[torch.Tensor | None], where: str) -> None:
    """Every parameter has a gradient and moved, but for a bias before batch norm, which cancels
    it (a gradient ~1e-9: SGD and LARS steps then vanish in float32 rounding)."""
    params, _ = _state(module)
    assert all(g is not None for g in grads), f"{where}: a parameter in training got no gradient"
    for a, b, g in zip(before[0], params, grads):
        assert not torch.equal(a, b) or float(g.abs().max()) < 1e-6, f"{where}: a parameter did not move"


@pytest.mark.parametrize("spatial_dims,optimizer", [(2, "adamw"), (3, "adamw"), (2, "sgd"), (2, "lars")])
def test_greedy_phases_train_one_stage_and_freeze_the_ones_below(spatial_dims: int, optimizer: str):
    total = 8  # fraction 0.5: steps 0-3 train stages 1-4, steps 4-7 the whole autoencoder
    method = build(spatial_dims, layerwise=True, layerwise_fraction=0.5)
    head = nn.ModuleList([method.bottleneck, method.decoder])
    parts = {**{f"stage {i}": s for i, s in enumerate(method.stages, start=1)},
             **{f"decoder {j}": d for j, d in enumerate(method.stage_decoders, start=1)}, "head": head}
    opt = build_optimizer(method, OptimConfig(name=optimizer, weight_decay=0.1), lr=1e-2)  # decay on, as in runs
    x = images(spatial_dims)
    for step in range(total):
        k = method.current_stage()
        assert k == layerwise_stage(step, total, 0.5)
        before = {name: _state(m) for name, m in parts.items()}
        # one step exactly as train.loop.fit takes it
        out = method([x])
        assert out.logs == {"stage": float(k)}
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 5.0)
        grads = {name: [p.grad for p in m.parameters()] for name, m in parts.items()}
        opt.step()
        method.on_step_end(step, total)
        # greedy stage k: stage k and its decoder train; end to end (k = 5): stages and head train
        training = {f"stage {k}", f"decoder {k}"} if k <= 4 else {f"stage {i}" for i in range(1, 5)} | {"head"}
        for name, m in parts.items():
            check = assert_trained if name in training else assert_frozen
            check(m, before[name], grads[name], f"step {step} (stage {k}), {name}")
    assert method.current_stage() == 5


@pytest.mark.parametrize("name", ["autoencoder", "denoising-autoencoder"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_stage_loss_is_its_decoders_mse_against_its_detached_input(name: str, spatial_dims: int):
    method = build(spatial_dims, name=name, layerwise=True)
    x = images(spatial_dims)
    for k in range(1, 5):
        method._progress = ((k - 1) * 2, 16)  # 8 greedy steps, 2 per stage: step 2(k - 1) trains stage k
        reference = copy.deepcopy(method)  # the same weights and batch-norm statistics, before the step
        torch.manual_seed(k)
        loss = method([x]).loss
        # naive: corrupt as the method does, the encoder's layers below k in eval mode, stage k in training mode
        torch.manual_seed(k)
        noisy = x + method.noise_std * torch.randn_like(x) if method.noise_std else x
        e = reference.encoder
        layers = [nn.Sequential(e.conv1, e.bn1, e.act, e.layer1), e.layer2, e.layer3, e.layer4]  # CIFAR stem
        clean, corrupted = x, noisy
        with torch.no_grad():
            for layer in layers[:k - 1]:
                layer.eval()
                clean, corrupted = layer(clean), layer(corrupted)
        reference.train()
        h = layers[k - 1](corrupted)
        conv = reference.stage_decoders[k - 1].conv.conv
        up = F.interpolate(h, size=clean.shape[2:], mode="nearest")
        recon = (F.conv2d if spatial_dims == 2 else F.conv3d)(up, conv.weight, conv.bias, padding=1)
        expected = ((recon - clean) ** 2).mean()
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (k, float(loss), float(expected))
        assert recon.shape == clean.shape
        assert not clean.requires_grad  # the target is detached
    assert method.training and all(m.training for m in method.modules())  # frozen stages put back in training mode


# --------------------------------------------------------------------- resume, the plain autoencoder, refusals


def test_a_run_resumed_mid_greedy_phase_matches_an_uninterrupted_one(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "stripes.npz", n_train=48, n_val=8, n_test=8, size=16)
    cfg = dict(method="autoencoder", method_options=dict(layerwise=True, decoder_channels=8),
               data=dict(name=str(data)), backbone=dict(name="resnet18-quarter"),
               train=dict(epochs=4, batch_size=16, precision="fp32", checkpoint_every=1, keep_checkpoints=50,
                          log_every=1))  # 3 steps an epoch, 12 in all: 6 greedy, 6 end to end
    api.run_pretraining(cfg, tmp_path / "whole")
    polls = iter(range(100))
    _, first = api.run_pretraining(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 3)
    assert first.status == "stopped" and first.step == 4  # inside stage 3 (steps 3 and 4)
    assert layerwise_stage(3, 12, 0.5) == layerwise_stage(4, 12, 0.5) == 3
    api.run_pretraining(None, tmp_path / "cut", resume=True)
    a = checkpoint.latest(tmp_path / "whole" / "checkpoints")
    b = checkpoint.latest(tmp_path / "cut" / "checkpoints")
    assert a is not None and b is not None and a.step == b.step == 12
    assert a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.model["progress"].tolist() == [12, 12]
    whole = RunDir(tmp_path / "whole").read_metrics()
    assert [r["stage"] for r in whole if "step" in r] == [layerwise_stage(s, 12, 0.5) for s in range(12)]
    cut = [r for r in RunDir(tmp_path / "cut").read_metrics() if "step" in r]
    assert [(r["step"], r["stage"], r["loss"]) for r in cut] == [(r["step"], r["stage"], r["loss"]) for r in whole]


@pytest.mark.parametrize("name", ["autoencoder", "denoising-autoencoder"])
def test_without_layerwise_the_autoencoder_is_as_before(name: str):
    plain = build(name=name)
    layered = build(name=name, layerwise=True)
    assert not plain.stages and not hasattr(plain, "stage_decoders")
    assert all(k.split(".")[0] in ("encoder", "bottleneck", "decoder") for k in plain.state_dict())
    # the same initial weights either way; the layer-wise extras are only added
    shared = plain.state_dict()
    assert all(torch.equal(shared[k], layered.state_dict()[k]) for k in shared)
    x = images()
    torch.manual_seed(3)
    out = plain([x])
    assert out.logs == {}
    torch.manual_seed(3)
    noisy = x + plain.noise_std * torch.randn_like(x) if plain.noise_std else x
    expected = F.mse_loss(plain.decoder(plain.bottleneck(plain.encoder(noisy))), x)
    assert torch.allclose(out.loss, expected)
    # the end-to-end phase of a layer-wise run is the same loss
    layered.load_state_dict(plain.state_dict(), strict=False)
    layered._progress = (15, 16)
    torch.manual_seed(3)
    final = layered([x])
    assert final.logs == {"stage": 5.0} and torch.allclose(final.loss, out.loss)


def test_unusable_combinations_are_refused(monkeypatch: pytest.MonkeyPatch):
    spec = get_method("autoencoder")
    vit = ViTEncoder(1, 16, 4, hidden_size=12, depth=1, num_heads=3)
    with pytest.raises(ConfigError, match="method_options.layerwise: .* a ViTEncoder has none"):
        spec.build(vit, spec.options(layerwise=True), BuildContext(32, 8, 16, 1, 2))
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="method_options.layerwise_fraction"):
            from_dict(spec.options, dict(layerwise=True, layerwise_fraction=bad), "method_options")
    with pytest.raises(ConfigError, match="layerwise_fraction: 0.3 has no effect without method_options.layerwise"):
        build(layerwise_fraction=0.3)
    monkeypatch.setattr(autoencoder.dist, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="runs in one process"):
        build(layerwise=True)
    build()  # the plain autoencoder trains under torchrun as before
