from __future__ import annotations

import pytest
import torch

from medlatent.errors import ConfigError
from medlatent.nets.backbones import ENCODERS, ViTEncoder, build_encoder, default_patch_size
from medlatent.nets.heads import LinearBlock, ProjectionHead, simclr_head


@pytest.mark.parametrize("name", ["resnet18-half", "vit-tiny"])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoders_2d(name: str, channels: int):
    enc = build_encoder(name, channels, 28)
    y = enc(torch.randn(2, channels, 28, 28))
    assert y.shape == (2, enc.out_dim) and enc.in_channels == channels


def test_resnet_widths_and_3d():
    assert build_encoder("resnet18", 1, 28).out_dim == 512
    assert build_encoder("resnet18-half", 1, 28).out_dim == 256
    enc = build_encoder("resnet18-half", 1, 16, spatial_dims=3)
    assert enc(torch.randn(2, 1, 16, 16, 16)).shape == (2, 256)


def test_vit_3d_and_patch_rule():
    enc = ViTEncoder(1, img_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, spatial_dims=3)
    assert enc(torch.randn(2, 1, 16, 16, 16)).shape == (2, 32) and enc.num_patches == 64
    assert [default_patch_size(s) for s in (28, 64, 224)] == [4, 8, 16]
    with pytest.raises(ConfigError, match="not a multiple"):
        ViTEncoder(1, img_size=30, patch_size=4)


def test_vit_weights_load_into_monai_vit():
    from monai.networks.nets import ViT

    ours = ViTEncoder(3, 28, 4, hidden_size=48, depth=2, num_heads=3)
    monai_vit = ViT(3, 28, 4, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=3, classification=True,
                    spatial_dims=2, qkv_bias=True)
    missing, unexpected = monai_vit.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("classification_head") for k in missing)
    # same tokens: MONAI's ViT exposes each block's output
    x = torch.randn(2, 3, 28, 28)
    _, hidden = monai_vit(x)
    ours.eval(), monai_vit.eval()
    assert torch.allclose(monai_vit.norm(hidden[-1])[:, 0], ours(x), atol=1e-5)


def test_vit_readout_from_the_run_config():
    """backbone.pool picks the ViT's output: the CLS token (default) or the mean of the patch
    tokens; a saved config with another value is refused by name."""
    from medlatent.config import PretrainConfig, from_dict
    from medlatent.nets.backbones import build_backbone

    x = torch.randn(2, 1, 28, 28)

    def encoder(pool: str | None) -> ViTEncoder:
        cfg = PretrainConfig(method="ijepa")
        cfg.backbone.name, cfg.backbone.depth = "vit-tiny", 1
        if pool is not None:
            cfg.backbone.pool = pool
        torch.manual_seed(0)
        return build_backbone(cfg.backbone, 1, 28, 2).eval()

    default, mean = encoder(None), encoder("mean")
    tokens = default.tokens(x)  # (B, 1 + L, D), same weights in both
    assert torch.allclose(default(x), tokens[:, 0], atol=1e-6)
    assert torch.allclose(mean(x), tokens[:, 1:].mean(1), atol=1e-6)
    assert not torch.allclose(default(x), mean(x), atol=1e-3)
    with pytest.raises(ConfigError, match="backbone.pool: 'auto' is not one of 'cls', 'mean'"):
        from_dict(PretrainConfig, {"backbone": {"pool": "auto"}})
    with pytest.raises(ConfigError, match="unknown read-out 'max'"):
        build_encoder("vit-tiny", 1, 28, depth=1, pool="max")


def test_unknown_encoder():
    with pytest.raises(ConfigError, match="unknown encoder 'resnet999'"):
        build_encoder("resnet999", 3, 28)
    assert "vit-small" in ENCODERS


def test_heads_are_built_from_blocks():
    head = simclr_head(256, 512, 128)
    assert head(torch.randn(4, 256)).shape == (4, 128)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    h = ProjectionHead([LinearBlock(8, 8, "layer", "gelu"), LinearBlock(8, 2, bias=False)])
    assert h(torch.randn(3, 8)).shape == (3, 2)
