"""Loaded encoders that know their input, and `medlatent export` to MONAI, timm, TorchScript,
ONNX and a MONAI bundle: each export is loaded back the way its ecosystem loads it and must give
the run's features on the same preprocessed batch (fp32, max abs diff < 1e-5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke, run_cli, write_stripes_npz
from medlatent import api
from medlatent.errors import DataError

TOL = 1e-5
# torch 2.9+ deprecates TorchScript (it still saves and loads); the bundle format runs it
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stripes_npz(tmp_path_factory.mktemp("export") / "s.npz")


def _pretrain(data: Path, out: Path, *extra: str) -> Path:
    code = invoke("pretrain", "--data", str(data), "--epochs", "0.5", "--batch-size", "32", "--output", str(out),
                  *extra)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def resnet_run(data: Path) -> Path:
    return _pretrain(data, data.parent / "resnet")


@pytest.fixture(scope="module")
def vit_run(data: Path) -> Path:
    return _pretrain(data, data.parent / "vit", "--backbone", "vit-tiny", "--set", "backbone.depth=2")


@pytest.fixture(scope="module")
def raw(data: Path) -> np.ndarray:
    return np.load(data)["test_images"]  # (N, 28, 28) uint8, as stored


def _x(run: Path, raw: np.ndarray, n: int = 8) -> torch.Tensor:
    return api.load_encoder(run).preprocess(raw[:n])


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------ the loaded encoder


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_embed_equals_what_medlatent_embed_writes(capsys, request, which: str, raw: np.ndarray, tmp_path: Path):
    run = request.getfixturevalue(f"{which}_run")
    code, _, err = run_cli(capsys, "embed", str(run), "--split", "test", "--out", str(tmp_path / "e.npz"))
    assert code == 0, err
    written = np.load(tmp_path / "e.npz")["embeddings"]
    enc = api.load_encoder(run)
    for images in (raw, raw[:, None], raw[..., None], torch.from_numpy(raw)):  # (N, H, W), (N, C, H, W), (N, H, W, C)
        z = enc.embed(images)
        assert z.shape == written.shape and _diff(z, written) < TOL
    d = _diff(enc.embed(raw), written)
    print(f"\n{which}: load_encoder(run).embed(raw) vs medlatent embed: max abs diff {d:.1e}")


def test_loaded_encoder_is_the_module_and_knows_its_input(resnet_run: Path, raw: np.ndarray):
    enc = api.load_encoder(resnet_run)
    meta = json.loads((resnet_run / "data.json").read_text())
    assert isinstance(enc, torch.nn.Module) and not enc.training
    assert (enc.image_size, enc.in_channels, enc.spatial_dims, enc.out_dim) == (28, 1, 2, 128)
    assert enc.mean == meta["mean"] and enc.std == meta["std"]
    assert (enc.run, enc.step, enc.method, enc.backbone, enc.data) == (resnet_run, 4, "simclr", "resnet18-quarter", "s")
    x = enc.preprocess(raw[:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    expected = (torch.from_numpy(raw[:5]).float()[:, None] / 255 - meta["mean"][0]) / meta["std"][0]
    assert _diff(x, expected) < 1e-5
    with torch.no_grad():
        assert torch.equal(enc(x), enc.encoder(x)) and _diff(enc(x), enc.embed(raw[:5], precision="fp32")) < TOL
    bare, meta2, step = enc  # old callers unpack (encoder, data.json, step)
    assert bare is enc.encoder and meta2 == meta and step == 4


def test_preprocess_resizes_like_image_folders_and_refuses_rgb_for_grayscale(resnet_run: Path, tmp_path: Path):
    from PIL import Image

    from medlatent.data.folders import prepare_image

    enc = api.load_encoder(resnet_run)
    img = np.random.default_rng(0).integers(0, 256, (36, 50), dtype=np.uint8)  # wider than tall, larger
    Image.fromarray(img).save(tmp_path / "a.png")
    folder = prepare_image(tmp_path / "a.png", 28, 2, "none", (40.0, 400.0), (0.5, 99.5))  # (1, 28, 28) uint8
    x = enc.preprocess(img[None])
    assert x.shape == (1, 1, 28, 28)
    step = 0.5 / 255 / enc.std[0] + 1e-6  # prepare_image rounds its result back to uint8
    assert _diff(x[0], enc.preprocess(folder[None])[0]) <= step
    with pytest.raises(DataError, match="3 channels but the encoder takes 1"):
        enc.preprocess(np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(DataError, match="not a batch of 2-D images"):
        enc.preprocess(np.zeros((28, 28), np.uint8))


# ------------------------------------------------------------------------------- the formats


def _export(capsys, run: Path, fmt: str, out: Path) -> dict:
    code, stdout, err = run_cli(capsys, "export", str(run), "--format", fmt, "--out", str(out))
    assert code == 0 and "max abs diff" in stdout, err
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == fmt and record["check"]["max_abs_diff"] < TOL
    assert record["preprocessing"]["mean"] == api.load_encoder(run).mean
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging folder left
    return record


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_monai_export_loads_into_the_monai_class(capsys, monkeypatch, request, which: str, raw: np.ndarray,
                                                 tmp_path: Path):
    run = request.getfixturevalue(f"{which}_run")
    record = _export(capsys, run, "monai", tmp_path / "monai")
    assert record["class"] == ("monai.networks.nets.ResNet" if which == "resnet" else "monai.networks.nets.ViT")
    x = _x(run, raw)
    monkeypatch.chdir(tmp_path / "monai")
    scope = {"x": x}
    exec(record["usage"], scope)  # the documented snippet, as a user runs it (strict load_state_dict)
    with torch.no_grad():
        d = _diff(scope["features"], api.load_encoder(run)(x))
    print(f"\nmonai {which}: max abs diff {d:.1e}")
    assert d < TOL


def test_timm_export_is_timm_layout_and_imports_back_exactly(capsys, vit_run: Path, resnet_run: Path,
                                                            raw: np.ndarray, tmp_path: Path):
    from safetensors.torch import load_file

    from medlatent.adapt.external import vit_from_weights

    record = _export(capsys, vit_run, "timm", tmp_path / "timm")
    state = load_file(str(tmp_path / "timm" / "model.safetensors"))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias",
            "blocks.1.mlp.fc2.weight", "norm.weight"} <= set(state)
    assert not any(k.startswith(("patch_embedding", "blocks.0.norm_cross")) for k in state)
    assert state["pos_embed"].shape == (1, 1 + 49, 192) and not state["pos_embed"][:, 0].any()
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "num_classes", "img_size", "patch_size", "embed_dim", "depth",
                                "num_heads", "in_chans", "global_pool")} == dict(
        architecture="vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=4, embed_dim=192, depth=2,
        num_heads=3, in_chans=1, global_pool="token")
    assert record["architecture"] == cfg["architecture"]

    enc = api.load_encoder(vit_run)
    back, report = vit_from_weights(tmp_path / "timm" / "model.safetensors", 1, 28)  # export -> import
    assert not report.missing and not report.unexpected
    ours = enc.encoder.state_dict()
    assert set(back.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in back.state_dict().items())  # the round trip is exact
    x = _x(vit_run, raw)
    with torch.no_grad():
        d = _diff(back.eval()(x), enc(x))
    print(f"\ntimm vit (export -> adapt.external import): max abs diff {d:.1e}")
    assert d == 0.0

    code, _, err = run_cli(capsys, "export", str(resnet_run), "--format", "timm", "--out", str(tmp_path / "t2"))
    line = one_error_line(err)
    assert code == 1 and "timm" in line and "ViT" in line and str(resnet_run) in line
    assert not (tmp_path / "t2").exists()


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_torchscript_export_runs_any_batch_size(capsys, request, which: str, raw: np.ndarray, tmp_path: Path):
    run = request.getfixturevalue(f"{which}_run")
    _export(capsys, run, "torchscript", tmp_path / "ts")
    model = torch.jit.load(str(tmp_path / "ts" / "model.ts"), map_location="cpu").eval()
    enc = api.load_encoder(run)
    d = 0.0
    with torch.no_grad():
        for n in (1, 5):
            x = _x(run, raw, n)
            d = max(d, _diff(model(x), enc(x)))
    print(f"\ntorchscript {which}: max abs diff {d:.1e}")
    assert d < TOL


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(capsys, vit_run: Path, raw: np.ndarray,
                                                              tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    record = _export(capsys, vit_run, "onnx", tmp_path / "onnx")
    path = tmp_path / "onnx" / "model.onnx"
    assert record["opset"] == 18 and any(o.domain in ("", "ai.onnx") and o.version == 18
                                         for o in onnx.load(str(path)).opset_import)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = api.load_encoder(vit_run)
    d = 0.0
    for n in (1, 4):
        x = _x(vit_run, raw, n)
        (out,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            d = max(d, _diff(out, enc(x)))
    print(f"\nonnx vit (onnxruntime CPU, batches 1 and 4): max abs diff {d:.1e}")
    assert d < TOL


def test_bundle_embeds_a_folder_of_pngs_with_monai_bundle_run(capsys, resnet_run: Path, raw: np.ndarray,
                                                              tmp_path: Path):
    pytest.importorskip("fire")  # MONAI's bundle CLI needs it (the export extra)
    from PIL import Image

    _export(capsys, resnet_run, "bundle", tmp_path / "bundle")
    b = tmp_path / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "models/model.pt",
                 "scripts/__init__.py", "docs/README.md"):
        assert (b / name).is_file(), name
    images = tmp_path / "pngs"
    images.mkdir()
    rng = np.random.default_rng(1)
    pngs = np.concatenate([rng.integers(0, 256, (3, 36, 42), dtype=np.uint8),  # larger, not square: crop + resize
                           np.stack([np.pad(r, ((4, 4), (6, 8)), mode="edge") for r in raw[:3]])])
    for i, a in enumerate(pngs):
        Image.fromarray(a).save(images / f"img{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--meta_file", "configs/metadata.json", "--bundle_root", ".", "--dataset_dir", str(images),
                           "--output_dir", str(tmp_path / "out")], cwd=b, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    z = np.load(tmp_path / "out" / "embeddings.npz")
    assert list(z["files"]) == [f"img{i}.png" for i in range(len(pngs))]
    read = np.stack([np.asarray(Image.open(images / f)) for f in z["files"]])
    expected = api.load_encoder(resnet_run).embed(read, precision="fp32")
    d = _diff(z["embeddings"], expected)
    print(f"\nbundle resnet (monai.bundle run on 6 PNGs vs load_encoder(run).embed): max abs diff {d:.1e}")
    assert z["embeddings"].shape == (6, 128) and d < TOL


def test_export_refusals_are_one_line_and_write_nothing(capsys, resnet_run: Path, data: Path, tmp_path: Path):
    code, _, err = run_cli(capsys, "export", str(resnet_run), "--format", "keras", "--out", str(tmp_path / "k"))
    line = one_error_line(err)
    assert code == 1 and "unknown export format 'keras'" in line and str(resnet_run) in line
    assert not (tmp_path / "k").exists()

    empty = tmp_path / "empty-run"  # a run that has not written its first checkpoint
    empty.mkdir()
    for name in ("config.yaml", "data.json"):
        shutil.copy(resnet_run / name, empty / name)
    code, _, err = run_cli(capsys, "export", str(empty), "--format", "torchscript")
    assert code == 1 and "no checkpoint yet" in one_error_line(err) and str(empty) in err
    assert not (empty / "export").exists()

    code, _, err = run_cli(capsys, "export", str(tmp_path), "--format", "monai")
    assert code == 1 and "not a run folder" in one_error_line(err)

    mine = tmp_path / "my-folder"  # a user's folder is never replaced
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "export", str(resnet_run), "--format", "monai", "--out", str(mine))
    assert code == 1 and "not an earlier export" in one_error_line(err)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
