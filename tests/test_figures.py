"""Attention maps (DINO, ViT) and MAE reconstructions, from real runs, through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medlatent import api
from medlatent.config import PretrainConfig
from medlatent.nets.backbones import ViTEncoder
from medlatent.ssl.mae import MAE

from conftest import write_stripes_npz
from test_cli import one_error_line, run_cli


def tiny_vit_run(tmp_path: Path, method: str, name: str) -> Path:
    cfg = PretrainConfig()
    cfg.data.name = str(write_stripes_npz(tmp_path / f"{name}.npz", 64, 16, 16))
    cfg.method = method
    cfg.backbone.name = "vit-tiny"
    cfg.backbone.depth = 2
    cfg.train.epochs = 1
    cfg.train.batch_size = 32
    cfg.train.precision = "fp32"
    if method == "dino":
        cfg.method_options = dict(n_local_crops=2, out_dim=256)
    return api.pretrain(cfg, output=tmp_path / name)


def test_attention_maps_and_reconstructions(capsys, tmp_path: Path, other_images: Path):
    dino = tiny_vit_run(tmp_path, "dino", "dino")
    code, out, err = run_cli(capsys, "attention", str(dino), "--n", "3")
    assert code == 0, err
    png = dino / "attention.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    cell = tmp_path / "cell.png"
    shutil.copy(other_images / "cell.png", cell)
    code, out, err = run_cli(capsys, "attention", str(dino), "--images", str(cell), "--out", str(tmp_path / "a.png"))
    assert code == 0 and (tmp_path / "a.png").is_file(), err

    mae = tiny_vit_run(tmp_path, "mae", "mae")
    code, out, err = run_cli(capsys, "reconstruct", str(mae), "--n", "4")
    assert code == 0 and (mae / "reconstruction.png").is_file(), err
    code, _, err = run_cli(capsys, "reconstruct", str(dino))
    assert code == 1 and "need an MAE run" in one_error_line(err)


def test_attention_needs_a_vit(capsys, tmp_path: Path):
    cfg = PretrainConfig()
    cfg.data.name = str(write_stripes_npz(tmp_path / "s.npz", 64, 16, 16))
    cfg.train.epochs, cfg.train.batch_size = 1, 32
    run = api.pretrain(cfg, output=tmp_path / "run")
    code, _, err = run_cli(capsys, "attention", str(run))
    assert code == 1 and "need a 2-D ViT encoder" in one_error_line(err)


def test_mae_reconstruction_keeps_visible_patches_and_attention_sums_to_one():
    torch.manual_seed(0)
    enc = ViTEncoder(1, 28, 4, hidden_size=48, depth=2, num_heads=3)
    mae = MAE(enc, decoder_dim=32, decoder_depth=1).eval()
    x = torch.randn(2, 1, 28, 28)
    masked, recon = mae.reconstruct(x)
    visible = masked != 0
    assert torch.allclose(recon[visible], x[visible], atol=1e-5)
    assert 0.2 < float(visible.float().mean()) < 0.3  # 25 % of the patches stay visible
    attn = enc.last_attention(x)
    assert attn.shape == (2, 3, 49) and float(attn.sum(-1).min()) < 1.0 + 1e-5  # CLS itself takes the rest


def test_vit_takes_local_crops_of_another_size():
    enc = ViTEncoder(1, 28, 4, hidden_size=48, depth=1, num_heads=3)
    assert enc(torch.randn(2, 1, 12, 12)).shape == (2, 48)
    with pytest.raises(Exception):
        ViTEncoder(1, 30, 4)
