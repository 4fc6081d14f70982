"""64-224 px (MedMNIST+): files the medmnist package downloaded, per-size md5s, encoders and
stems by size, ViT-S/16 at 224 px into MONAI's ViT and UNETR, and view recipes by size (28-px
views unchanged)."""

from __future__ import annotations

import dataclasses
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from medlatent.augment.views import ViewRecipe, blur_sigma, resolve
from medlatent.config import BackboneConfig, ViewConfig
from medlatent.data import download
from medlatent.data.catalogue import CATALOGUE, get_info
from medlatent.errors import ConfigError, DataError
from medlatent.nets.backbones import (ENCODERS, ResNetEncoder, SmallImageResNet, build_backbone, build_encoder,
                                      default_stem)

BREAST_MD5 = {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364"}


# --- data: ~/.medmnist and the MedMNIST+ sizes ---------------------------------------------------

@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home folder (Path.home and $HOME), an empty data folder in $MEDLATENT_DATA, no mirror."""
    h = tmp_path / "home"
    (h / ".medmnist").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: h))
    monkeypatch.setenv(download.ENV_VAR, str(tmp_path / "data"))
    monkeypatch.delenv(download.MIRROR_VAR, raising=False)
    return h


def _no_download(url: str, tmp: Path, timeout_s: float) -> str:
    raise AssertionError(f"tried to download {url}")


def test_fetch_finds_what_the_medmnist_package_downloaded(home: Path, real_data_dir: Path, monkeypatch):
    cached = home / ".medmnist" / "breastmnist.npz"
    shutil.copy(real_data_dir / "breastmnist.npz", cached)
    monkeypatch.setattr(download, "_download", _no_download)
    info = get_info("breastmnist")
    assert download.fetch(info, 28) == cached
    assert download.local_path(info, 28) == cached and download.is_present(info, 28)
    assert not (home.parent / "data").exists()  # nothing written to the data folder
    # the data folder comes first
    data = home.parent / "data"
    data.mkdir()
    shutil.copy(real_data_dir / "breastmnist.npz", data / "breastmnist.npz")
    assert download.fetch(info, 28) == data / "breastmnist.npz"


def test_a_wrong_md5_in_the_medmnist_cache_is_skipped(home: Path, real_data_dir: Path, monkeypatch):
    bad = home / ".medmnist" / "breastmnist.npz"
    bad.write_bytes((real_data_dir / "breastmnist.npz").read_bytes()[:1000])  # truncated
    info = get_info("breastmnist")
    assert not download.is_present(info, 28)
    assert download.local_path(info, 28) == home.parent / "data" / "breastmnist.npz"

    def offline(url: str, tmp: Path, timeout_s: float) -> str:
        raise urllib.error.URLError("network blocked")

    real = download._download
    monkeypatch.setattr(download, "_download", offline)
    with pytest.raises(DataError) as e:  # nothing else found: the skipped file is named
        download.fetch(info, 28)
    msg = str(e.value)
    assert f"skipped {bad}" in msg and "not the official file" in msg and "\n" not in msg
    assert str(home.parent / "data" / "breastmnist.npz") in msg
    # a download that works: the bad copy is ignored, the file goes to the data folder
    mirror = home.parent / "mirror"
    mirror.mkdir()
    shutil.copy(real_data_dir / "breastmnist.npz", mirror / "breastmnist.npz")
    monkeypatch.setenv(download.MIRROR_VAR, mirror.as_uri())
    monkeypatch.setattr(download, "_download", real)
    assert download.fetch(info, 28) == home.parent / "data" / "breastmnist.npz"


def test_catalogue_has_an_md5_per_medmnist_plus_size():
    for e in CATALOGUE.values():
        assert e.sizes == ((28, 64, 128, 224) if e.spatial_dims == 2 else (28, 64)), e.name
        assert all(len(m) == 32 and int(m, 16) >= 0 for m in e.md5.values())
    assert len({m for e in CATALOGUE.values() for m in e.md5.values()}) == 12 * 4 + 6 * 2  # all distinct
    # spot checks against medmnist 3.0's INFO["..."]["MD5_<size>"]
    assert CATALOGUE["bloodmnist"].md5[224] == "b718ff6835fcbdb22ba9eacccd7b2601"
    assert CATALOGUE["pathmnist"].md5[64] == "55aa9c1e0525abe5a6b9d8343a507616"
    assert CATALOGUE["breastmnist"].md5[128] == "363e4b3f8d712e9b5de15470a2aaadf1"
    assert CATALOGUE["organsmnist"].md5[224] == "b354719e553fbbb2513d5533f52a4cb1"
    assert get_info("chestmnist").filename(224) == "chestmnist_224.npz"


def test_offline_64_px_fetch_names_file_url_md5_and_destination(home: Path, monkeypatch):
    def blocked(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network blocked")

    monkeypatch.setattr(urllib.request, "urlopen", blocked)
    with pytest.raises(DataError) as e:
        download.fetch(get_info("breastmnist"), 64)
    msg = str(e.value)
    dest = home.parent / "data" / "breastmnist_64.npz"
    assert "breastmnist_64.npz" in msg and "https://zenodo.org/records/10519652/files/breastmnist_64.npz" in msg
    assert BREAST_MD5[64] in msg and str(dest) in msg and "network blocked" in msg and "\n" not in msg
    assert list(dest.parent.iterdir()) == []  # nothing half-written
    with pytest.raises(DataError, match="published at sizes 28, 64, 128, 224, not 96"):
        download.fetch(get_info("breastmnist"), 96)


# --- encoders: stems by size, resnet50, vit-base, ViT-S/16 at 224 px ------------------------------

def test_resnet_stem_follows_the_image_size_and_can_be_chosen():
    assert [default_stem(s) for s in (28, 64, 128, 224)] == ["cifar", "cifar", "imagenet", "imagenet"]
    enc = build_encoder("resnet18", 3, 224).eval()
    assert isinstance(enc, ResNetEncoder) and not isinstance(enc, SmallImageResNet) and enc.stem == "imagenet"
    assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2) and not enc.no_max_pool
    with torch.no_grad():
        y = enc(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 512)
    assert build_encoder("resnet18", 3, 224, stem="cifar").conv1.kernel_size == (3, 3)
    assert build_encoder("resnet18", 3, 28, stem="imagenet").conv1.stride == (2, 2)
    assert build_backbone(BackboneConfig(name="resnet18"), 3, 128, 2).stem == "imagenet"
    with pytest.raises(ConfigError, match="backbone.stem: unknown stem 'vgg' \\(known: cifar, imagenet\\)"):
        build_encoder("resnet18", 3, 224, stem="vgg")


def test_28_and_64_px_resnets_keep_their_layout():
    """Below 128 px every ResNet-18 is the SmallImageResNet of every earlier run: the same class
    (the MONAI export keys on it), MONAI keys and shapes."""
    from monai.networks.nets import ResNet

    for name, width in (("resnet18", 64), ("resnet18-half", 32), ("resnet18-quarter", 16)):
        for size in (28, 64):
            enc = build_encoder(name, 1, size)
            assert type(enc) is SmallImageResNet and enc.conv1.kernel_size == (3, 3)
            old = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[width, 2 * width, 4 * width, 8 * width],
                         spatial_dims=2, n_input_channels=1, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
                         feed_forward=False)
            shapes = {k: v.shape for k, v in old.state_dict().items()}
            assert {k: v.shape for k, v in enc.state_dict().items()} == shapes
    assert type(build_encoder("resnet18-half", 1, 28, spatial_dims=3)) is SmallImageResNet


def test_resnet_weights_load_into_monai_resnet_with_its_kwargs():
    from monai.networks.nets import ResNet, resnet50

    torch.manual_seed(0)
    enc = build_encoder("resnet50", 3, 224).eval()
    assert enc.out_dim == 2048 and [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert {"resnet50", "vit-base"} <= set(ENCODERS)
    net = ResNet(**enc.monai_kwargs).eval()
    net.load_state_dict(enc.state_dict(), strict=True)
    # the same keys and shapes as MONAI's own resnet50 with the ImageNet stem
    ref = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, feed_forward=False)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(net(x), enc(x)) and enc(x).shape == (1, 2048)


def test_vit_presets():
    base = build_encoder("vit-base", 3, 224, depth=1)
    block = base.blocks[0]
    assert (base.out_dim, block.attn.num_heads, block.mlp.linear1.out_features, base.patch_size) == (768, 12, 3072, 16)
    small = build_encoder("vit-small", 3, 224, depth=1)
    assert (small.out_dim, small.blocks[0].attn.num_heads, small.blocks[0].mlp.linear1.out_features) == (384, 6, 1536)
    assert len(build_encoder("vit-small", 3, 224).blocks) == 12


def test_vit_small_16_at_224_px_loads_into_monai_vit_and_unetr():
    """ViT-S/16 at 224 px: the MONAI export (strict, same features), MONAI ViT without a CLS token
    (``classification=False``) and UNETR's ViT take our weights and give our patch tokens."""
    from monai.networks.nets import UNETR, ViT

    from medlatent.export.monai_format import build, features, monai_network

    torch.manual_seed(0)
    vit = build_encoder("vit-small", 3, 224).eval()
    assert vit.patch_size == 16 and vit.num_patches == 196
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    class_path, kwargs, state, readout = monai_network(vit)
    net = build(class_path, kwargs).eval()
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(features(net, x, readout), vit(x), atol=1e-5)
        no_cls = {k: v for k, v in vit.state_dict().items() if k != "cls_token"}
        plain = ViT(in_channels=3, img_size=224, patch_size=16, hidden_size=384, mlp_dim=1536, num_layers=12,
                    num_heads=6, classification=False, qkv_bias=True, spatial_dims=2).eval()
        plain.load_state_dict(no_cls, strict=True)
        unetr = UNETR(in_channels=3, out_channels=2, img_size=224, hidden_size=384, mlp_dim=1536, num_heads=6,
                      spatial_dims=2, qkv_bias=True).eval()
        unetr.vit.load_state_dict(no_cls, strict=True)
        t = vit.embed(x)  # (1, 196, 384): our blocks on the patch tokens only, as UNETR runs them
        for block in vit.blocks:
            t = block(t)
        ours = vit.norm(t)
        for other in (plain, unetr.vit):
            out, _ = other(x)
            assert out.shape == (1, 196, 384) and torch.allclose(out, ours, atol=1e-5)


# --- views by size ---------------------------------------------------------------------------------

# sum and sum of |v| of every view, seed 1, for 4 images (seed 0), recorded before views were sized
VIEWS_28 = {
    "simclr-rgb": [(-3586.871657848358, 7511.483862400055), (-514.9990738630295, 3524.027947306633)],
    "simclr-gray": [(-25.620521187782288, 2239.7548843622208)],
    "byol": [(-3575.4989463090897, 7568.793410897255), (-892.3286037445068, 4875.635699272156)],
    "dino": [(-31.093941807746887, 2217.9553538560867), (-292.3150417804718, 1983.6158249378204),
             (-135.77494966983795, 339.6793323755264), (-35.73636996746063, 402.76625096797943),
             (16.766547799110413, 362.5709832906723), (153.01221001148224, 330.6975759267807),
             (94.55193972587585, 398.96551394462585), (158.17826163768768, 405.92662250995636)],
}


def _recipes(size: int) -> dict[str, tuple[int, list[tuple[ViewConfig, int]]]]:
    from medlatent.ssl import byol, dino

    rgb = resolve(ViewConfig(blur=0.5), "pathmnist")
    gray = resolve(ViewConfig(blur=0.5), "breastmnist")
    return {"simclr-rgb": (3, [(rgb, size), (rgb, size)]), "simclr-gray": (1, [(gray, size)]),
            "byol": (3, byol.SPEC.views(rgb, size, byol.BYOLConfig())),
            "dino": (1, dino.SPEC.views(gray, size, dino.DINOConfig()))}


def _views(c: int, views: list[tuple[ViewConfig, int]], size: int, n: int = 4) -> list[torch.Tensor]:
    x = (torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    return ViewRecipe(views, [0.5] * c, [0.25] * c)(x, torch.Generator().manual_seed(1))


def test_views_at_28_px_are_unchanged():
    for name, (c, views) in _recipes(28).items():
        got = [x for v in _views(c, views, 28) for x in (float(v.double().sum()), float(v.double().abs().sum()))]
        assert got == pytest.approx([x for pair in VIEWS_28[name] for x in pair], rel=1e-6), name


def test_blur_sigma_follows_the_side_and_keeps_28_px():
    # bit-identical to the range BYOL and DINO computed inline at 28 px: the same views
    assert blur_sigma(28) == (0.1 * 28 / 224 * 4, 2.0 * 28 / 224 * 4) == (0.05, 1.0)
    assert blur_sigma(64) == (0.05, 1.0) and blur_sigma(224) == (0.1, 2.0)
    assert blur_sigma(128) == pytest.approx((0.1 * 128 / 224, 2.0 * 128 / 224))
    cfg = resolve(ViewConfig(blur=1.0), "pathmnist")
    old = dataclasses.replace(cfg, blur_sigma=(0.1 * 28 / 224 * 4, 2.0 * 28 / 224 * 4))
    new = dataclasses.replace(cfg, blur_sigma=blur_sigma(28))
    assert torch.equal(_views(3, [(old, 28)], 28)[0], _views(3, [(new, 28)], 28)[0])
    for size in (64, 128, 224):  # a blurred view at each size: finite, the requested shape
        v = _views(3, [(dataclasses.replace(cfg, blur_sigma=blur_sigma(size)), size)], size, n=1)[0]
        assert v.shape == (1, 3, size, size) and torch.isfinite(v).all()
