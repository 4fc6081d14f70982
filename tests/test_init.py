"""``pretrain --init``: starting an encoder from weights in timm, MONAI or medlatent-run layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, write_stripes_npz
from medlatent.adapt.external import init_encoder
from medlatent.errors import CheckpointError
from medlatent.nets.backbones import build_encoder


def _timm_layout(vit_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (MONAI-named) ViT state dict as timm writes it: timm names, a class-token position
    embedding of zeros in front of the patch positions, inside a ``module.`` wrapper."""
    out = {}
    for k, v in vit_state.items():
        k = k.replace("patch_embedding.patch_embeddings.", "patch_embed.proj.")
        k = k.replace(".attn.out_proj.", ".attn.proj.").replace(".mlp.linear1.", ".mlp.fc1.")
        k = k.replace(".mlp.linear2.", ".mlp.fc2.")
        if k == "patch_embedding.position_embeddings":
            k, v = "pos_embed", torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        out["module." + k] = v.clone()
    return out


def test_timm_layout_vit_loads_into_the_run_encoder(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_encoder("vit-tiny", 1, 28, depth=2)
    save_file(_timm_layout(source.state_dict()), str(tmp_path / "timm.safetensors"))
    torch.manual_seed(2)
    target = build_encoder("vit-tiny", 1, 28, depth=2)
    assert not torch.equal(target.blocks[0].mlp.linear1.weight, source.blocks[0].mlp.linear1.weight)
    report = init_encoder(target, tmp_path / "timm.safetensors")
    assert not report.missing, report.summary()
    for k, v in source.state_dict().items():
        assert torch.allclose(target.state_dict()[k], v), k
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(source.eval()(x), target.eval()(x), atol=1e-6)


def test_monai_resnet_state_dict_loads_and_rgb_stem_folds_for_grayscale(tmp_path: Path) -> None:
    from monai.networks.nets import ResNet

    grey = build_encoder("resnet18-quarter", 1, 28)
    kwargs = dict(grey.monai_kwargs, n_input_channels=3)
    torch.manual_seed(3)
    monai_net = ResNet(**kwargs)
    torch.save({"state_dict": {f"model.{k}": v for k, v in monai_net.state_dict().items()}}, tmp_path / "monai.pt")
    report = init_encoder(grey, tmp_path / "monai.pt")
    assert "conv1.weight" in report.loaded and "summed" in report.summary()
    assert torch.allclose(grey.conv1.weight, monai_net.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, monai_net.layer4[1].conv2.weight)


def test_unmatched_state_dict_is_one_clear_error(tmp_path: Path) -> None:
    save_file({"decoder.up.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: no tensor matches the encoder by name and shape"):
        init_encoder(build_encoder("resnet18-quarter", 1, 28), tmp_path / "other.safetensors")


def test_pretrain_init_from_a_run_starts_from_its_encoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_stripes_npz(tmp_path / "stripes.npz")
    common = ["--data", str(data), "--method", "simclr", "--epochs", "1", "--batch-size", "16"]
    code, _, err = run_cli(capsys, "pretrain", *common, "--output", str(tmp_path / "first"))
    assert code == 0, err
    # a learning rate of ~0: the second run's weights stay where they started
    code, out, err = run_cli(capsys, "pretrain", *common, "--lr", "1e-12", "--seed", "5",
                             "--init", str(tmp_path / "first"), "--output", str(tmp_path / "second"))
    assert code == 0, err
    assert f"init: {tmp_path / 'first'}:" in out and "tensors loaded" in out
    code, _, err = run_cli(capsys, "pretrain", *common, "--lr", "1e-12", "--seed", "5",
                           "--output", str(tmp_path / "fresh"))
    assert code == 0, err
    first, second, fresh = (load_file(str(tmp_path / r / "encoder.safetensors")) for r in ("first", "second", "fresh"))
    key = next(k for k in first if k.endswith("conv1.weight"))
    assert torch.allclose(second[key], first[key], atol=1e-6)
    assert not torch.allclose(fresh[key], first[key], atol=1e-3)
