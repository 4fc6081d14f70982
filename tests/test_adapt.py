"""Adapting encoders: LoRA, adapters, AdaptFormer, prompts, adapter files, external weights, MIL."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medlatent import api
from medlatent.adapt.adapters import AdaptFormerMLP
from medlatent.adapt.external import to_monai_names, vit_from_weights
from medlatent.adapt.files import load_adapter_into, read_adapter, save_adapter, weights_hash
from medlatent.adapt.lora import LoRALinear, LoRAQKV, merge_lora, unmerge_lora
from medlatent.adapt.mil import AttentionMIL, evaluate_mil, make_bags, train_mil
from medlatent.adapt.prompts import PromptedViT
from medlatent.adapt.strategies import STRATEGIES, AdaptConfig, adapt, count_parameters
from medlatent.config import PretrainConfig
from medlatent.errors import CheckpointError, ConfigError
from medlatent.eval.finetune import Classifier
from medlatent.nets.backbones import ViTEncoder, build_encoder

from conftest import write_stripes_npz
from test_cli import one_error_line, run_cli

D, DEPTH, R = 192, 2, 4


@pytest.fixture()
def vit() -> ViTEncoder:
    torch.manual_seed(0)
    return build_encoder("vit-tiny", 1, 28, depth=DEPTH).eval()


def x_batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def randomise(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Give zero-initialised adapter weights random values (as after training)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.normal_(0, 0.05)


def test_zero_initialised_updates_leave_outputs_unchanged(vit: ViTEncoder):
    x = x_batch()
    for strategy in ("lora", "adapter", "adaptformer", "bias", "linear", "finetune"):
        assert torch.allclose(adapt(vit, AdaptConfig(strategy=strategy, rank=R)).eval()(x), vit(x), atol=1e-6), strategy


def test_lora_matches_the_formula_and_merges_exactly(vit: ViTEncoder):
    model = adapt(vit, AdaptConfig(strategy="lora", rank=R, alpha=8.0)).eval()
    randomise(model, ("lora_B",))
    layer: LoRAQKV = model.blocks[0].attn.qkv
    h = torch.randn(2, 5, D)
    w, b = vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.bias
    naive = h @ w.T + b
    s = 8.0 / R
    naive[..., :D] += s * h @ layer.lora_A[0].T @ layer.lora_B[0].T  # q
    naive[..., 2 * D:] += s * h @ layer.lora_A[1].T @ layer.lora_B[1].T  # v (k untouched)
    assert torch.allclose(layer(h), naive, atol=1e-5)

    x = x_batch()
    unmerged_out = model(x)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRAQKV))
    assert torch.allclose(model(x), unmerged_out, atol=1e-5)  # merged == unmerged outputs
    assert not torch.allclose(model.blocks[0].attn.qkv.qkv.weight, before["blocks.0.attn.qkv.qkv.weight"])
    unmerge_lora(model)
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-6), n  # merge then unmerge restores the weights


def test_lora_on_every_linear_matches_the_formula_counts_and_merges(vit: ViTEncoder):
    cfg = AdaptConfig(strategy="lora", rank=R, alpha=8.0, lora_targets="all")
    x = x_batch()
    assert torch.allclose(adapt(vit, cfg).eval()(x), vit(x), atol=1e-6)  # B = 0: no change at start
    model = adapt(vit, cfg).eval()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 * DEPTH  # qkv, attention output, MLP in and out, per block
    mlp = vit.blocks[0].mlp.linear1.out_features
    per_block = R * (D + 3 * D) + R * (D + D) + R * (D + mlp) + R * (mlp + D)  # r (D_in + D_out) each
    assert count_parameters(model)[0] == DEPTH * per_block
    randomise(model, ("lora_B",))
    layer: LoRALinear = model.blocks[1].mlp.linear2
    h = torch.randn(2, 5, mlp)
    w, b = vit.blocks[1].mlp.linear2.weight, vit.blocks[1].mlp.linear2.bias
    assert torch.allclose(layer(h), h @ w.T + b + (8.0 / R) * h @ layer.lora_A.T @ layer.lora_B.T, atol=1e-5)
    out = model(x)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    merge_lora(model)
    assert all(m.merged for m in layers) and torch.allclose(model(x), out, atol=1e-5)
    unmerge_lora(model)
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.state_dict().items())
    with pytest.raises(ConfigError, match="unknown lora_targets 'k'"):
        adapt(vit, AdaptConfig(strategy="lora", lora_targets="k"))  # type: ignore[arg-type]


def test_adaptformer_and_prompts_match_their_definitions(vit: ViTEncoder):
    model = adapt(vit, AdaptConfig(strategy="adaptformer", rank=R, scale=0.1)).eval()
    randomise(model, ("adapter.up",))
    block, base = model.blocks[0], vit.blocks[0]
    assert isinstance(block.mlp, AdaptFormerMLP) and isinstance(block.norm2, torch.nn.Identity)
    t = torch.randn(2, 5, D)
    a = block.mlp.adapter
    h = t + base.attn(base.norm1(t))
    naive = h + base.mlp(base.norm2(h)) + 0.1 * a.up(F.relu(a.down(h)))  # x + MLP(LN(x)) + s * adapter(x)
    assert torch.allclose(block(t), naive, atol=1e-5)

    deep = adapt(vit, AdaptConfig(strategy="prompt", prompts=3, deep=True)).eval()
    assert isinstance(deep, PromptedViT) and deep.tokens(x_batch()).shape == (3, 1 + 3 + 49, D)
    x = x_batch()
    out = deep(x)
    with torch.no_grad():
        deep.prompts[1] += 1.0  # the second block's own prompts matter in VPT-deep
    assert not torch.allclose(deep(x), out)
    shallow = adapt(vit, AdaptConfig(strategy="prompt", prompts=3, deep=False))
    assert shallow.prompts.shape == (1, 3, D)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_the_strategy_parameters_train(vit: ViTEncoder, strategy: str):
    model = adapt(vit, AdaptConfig(strategy=strategy, rank=R, prompts=3))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    bottleneck = D * R + R + R * D + D
    expected = {
        "linear": 0,
        "finetune": sum(p.numel() for n, p in vit.named_parameters() if "norm_cross_attn" not in n),
        "bias": sum(p.numel() for n, p in vit.named_parameters() if n.endswith(".bias") and "norm_cross" not in n),
        "lora": DEPTH * 2 * (R * D + D * R),
        "adapter": DEPTH * 2 * bottleneck,
        "adaptformer": DEPTH * bottleneck,
        "prompt": DEPTH * 3 * D,
    }[strategy]
    assert sum(trainable.values()) == expected == count_parameters(model)[0]
    marker = {"lora": "lora_", "adapter": "adapter.", "adaptformer": "adapter.", "prompt": "prompts",
              "bias": ".bias"}.get(strategy)
    if marker:
        assert all(marker in n for n in trainable), sorted(trainable)
    assert all(p.requires_grad for n, p in vit.named_parameters() if "norm_cross" not in n)  # the base is untouched


def test_cnn_strategies_and_refusals():
    resnet = build_encoder("resnet18-quarter", 1, 28)
    assert count_parameters(adapt(resnet, AdaptConfig(strategy="bias")))[0] > 0
    with pytest.raises(ConfigError, match="needs a ViT"):
        adapt(resnet, AdaptConfig(strategy="lora"))
    with pytest.raises(ConfigError, match="unknown strategy"):
        adapt(resnet, AdaptConfig(strategy="magic"))  # type: ignore[arg-type]


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_adapter_file_round_trips_and_refuses_another_base(vit: ViTEncoder, tmp_path: Path, targets: str):
    cfg = AdaptConfig(strategy="lora", rank=R, lora_targets=targets)  # type: ignore[arg-type]
    model = Classifier(adapt(vit, cfg), 3)
    randomise(model, ("lora_B",))
    x = x_batch()
    expected = model.eval()(x)
    weights, meta = save_adapter(tmp_path / "a", model, cfg, weights_hash(vit), dict(n_outputs=3))
    assert weights.stat().st_size < 0.1 * sum(p.numel() * 4 for p in vit.parameters())  # only the trained part
    cfg2, info, state = read_adapter(tmp_path / "a")
    assert cfg2 == cfg
    fresh = Classifier(adapt(vit, cfg2), 3)
    load_adapter_into(fresh, state, info, vit, tmp_path / "a")
    assert torch.equal(fresh.eval()(x), expected)  # exact round trip

    other = copy.deepcopy(vit)
    with torch.no_grad():
        other.blocks[1].mlp.linear1.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="another base encoder"):
        load_adapter_into(Classifier(adapt(other, cfg2), 3), state, info, other, tmp_path / "a")
    (tmp_path / "b.json").write_text("{not json")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="b.json"):
        read_adapter(tmp_path / "b")


def timm_state_dict(vit: ViTEncoder, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our ViT's weights written in timm's naming, with a class-token position embedding."""
    sd, out = vit.state_dict(), {}
    cls_pos = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(2)) * 0.02
    for k, v in sd.items():
        if "norm_cross_attn" in k:
            continue
        k = (k.replace("patch_embedding.patch_embeddings", "patch_embed.proj").replace("attn.out_proj", "attn.proj")
             .replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"))
        if k == "patch_embedding.position_embeddings":
            k, v = "pos_embed", torch.cat([cls_pos, v], dim=1)
        out[prefix + k] = v.clone()
    out[prefix + "cls_token"] = sd["cls_token"] - cls_pos  # timm adds cls_pos back
    out[prefix + "head.weight"] = torch.zeros(5, D)
    return out


@pytest.mark.parametrize("prefix", ["", "model.", "module.backbone."])
def test_timm_layout_weights_load_with_equal_outputs(vit: ViTEncoder, tmp_path: Path, prefix: str):
    torch.save({"model": timm_state_dict(vit, prefix)}, tmp_path / "w.pth")
    loaded, report = vit_from_weights(tmp_path / "w.pth", 1, 28)
    x = x_batch()
    assert torch.allclose(loaded(x), vit(x), atol=1e-5)
    assert report.unexpected == ["head.weight"] and report.missing == []
    assert "folded" in report.summary()
    bigger, report = vit_from_weights(tmp_path / "w.pth", 1, 56)  # position embeddings interpolated 7x7 -> 14x14
    assert bigger.patch_embedding.position_embeddings.shape == (1, 196, D) and "interpolated" in report.summary()
    assert set(to_monai_names(timm_state_dict(vit, prefix))) >= {"blocks.0.attn.out_proj.weight", "norm.weight"}
    with pytest.raises(CheckpointError, match="does not tile"):
        vit_from_weights(tmp_path / "w.pth", 1, 30)


def test_rgb_weights_on_grayscale_sum_the_patch_kernel(tmp_path: Path):
    torch.manual_seed(0)
    rgb = build_encoder("vit-tiny", 3, 28, depth=1).eval()
    torch.save(timm_state_dict(rgb), tmp_path / "rgb.pth")
    gray, report = vit_from_weights(tmp_path / "rgb.pth", 1, 28)
    x = x_batch()
    assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)  # gray image == 3 equal channels
    assert "summed" in report.summary()


def test_attention_mil_formula_bags_and_learning():
    torch.manual_seed(0)
    mil = AttentionMIL(8, hidden=6)
    h = torch.randn(2, 5, 8)
    logits, a = mil(h)
    gate = torch.tanh(h @ mil.V.weight.T + mil.V.bias) * torch.sigmoid(h @ mil.U.weight.T + mil.U.bias)
    a_naive = torch.softmax((gate @ mil.w.weight.T + mil.w.bias)[..., 0], dim=1)
    z = (a_naive[..., None] * h).sum(1)
    assert torch.allclose(a, a_naive, atol=1e-6) and torch.allclose(a.sum(1), torch.ones(2))
    assert torch.allclose(logits, (z @ mil.classifier.weight.T + mil.classifier.bias)[:, 0], atol=1e-6)

    labels = torch.arange(400).remainder(4)[:, None]
    idx, bag_y, positive = make_bags(labels, 3, n_bags=60, bag_size=8)
    assert bag_y.sum() == 30 and positive.shape == (60, 8)
    assert all(positive[i].any() == bool(bag_y[i]) for i in range(60))  # positive iff it holds a class-3 image
    assert torch.equal(make_bags(labels, 3, 60, 8)[0], idx)  # reproducible by seed

    # Instances: class 3 has a distinctive embedding direction; MIL should find it and attend to it.
    emb = torch.randn(400, 8) * 0.5
    emb[labels[:, 0] == 3, 0] += 3.0
    train_mil(mil, emb[idx], bag_y, steps=300, lr=1e-2)
    test_idx, test_y, test_pos = make_bags(labels, 3, n_bags=40, bag_size=8, seed=1)
    result = evaluate_mil(mil, emb[test_idx], test_y, test_pos)
    assert result["auc"] > 0.95 and result["attention_on_positives"] > 2 * result["uniform_share"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("vitrun")
    cfg = PretrainConfig()
    cfg.method = "mae"
    cfg.backbone.name, cfg.backbone.depth = "vit-tiny", 2
    cfg.data.name = str(write_stripes_npz(tmp / "s.npz", n_train=128, n_val=64, n_test=64))
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision = 1, 32, "fp32"
    return api.pretrain(cfg, output=tmp / "run")


def test_adapt_command_trains_saves_and_reloads(capsys, vit_run: Path, tmp_path: Path):
    from medlatent.adapt.run import load_adapted, load_base
    from medlatent.eval.features import predict_scores

    code, out, err = run_cli(capsys, "adapt", str(vit_run), "--strategy", "lora", "--rank", "4", "--epochs", "1",
                             "--min-steps", "15", "--lora-targets", "all", "--out", str(tmp_path / "lora"))
    assert code == 0, err
    assert "trainable parameters" in out and "test ACC" in out
    base = load_base(vit_run, device="cpu")
    model = load_adapted(base, tmp_path / "lora")
    scores = predict_scores(model, base.data.split("test").images, base.mean, base.std, torch.device("cpu"), False)
    cfg, info, _ = read_adapter(tmp_path / "lora")
    assert cfg.lora_targets == "all" and cfg.rank == 4
    assert (scores.argmax(1) == base.data.split("test").labels[:, 0].numpy()).mean() == pytest.approx(info["test"]["acc"])

    code, _, err = run_cli(capsys, "adapt", str(vit_run), "--strategy", "magic")
    assert code == 1 and "unknown strategy" in one_error_line(err)


def test_adapt_external_weights_and_mil_commands(capsys, vit_run: Path, tmp_path: Path):
    vit, _, _ = api.load_encoder(vit_run)
    torch.save(timm_state_dict(vit), tmp_path / "ext.pth")
    data = str(vit_run.parent / "s.npz")
    code, out, err = run_cli(capsys, "adapt", str(tmp_path / "ext.pth"), "--data", data, "--strategy", "bias",
                             "--epochs", "1", "--min-steps", "10")
    assert code == 0 and "folded" in out and (tmp_path / "ext" / "adapters").is_dir(), err
    code, _, err = run_cli(capsys, "adapt", str(tmp_path / "ext.pth"), "--strategy", "bias")
    assert code == 1 and "need --data" in one_error_line(err)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "adapt", str(tmp_path / "junk.pth"), "--data", data)
    assert code == 1 and "junk.pth" in one_error_line(err)

    code, out, err = run_cli(capsys, "mil", str(vit_run), "--positive-class", "1", "--bag-size", "6", "--bags", "40",
                             "--steps", "20", "--out", str(tmp_path / "mil.png"))
    assert code == 0 and "bag AUC" in out and (tmp_path / "mil.png").is_file(), err
    code, out, err = run_cli(capsys, "mil", str(vit_run), "--positive-class", "1", "--bag-size", "4", "--bags", "8",
                             "--prompts", "2", "--steps", "2", "--out", str(tmp_path / "pmil.png"))
    assert code == 0 and "Prompt-MIL" in out, err
