from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from medlatent.data import download
from medlatent.data.catalogue import CATALOGUE, TASKS, get_info
from medlatent.data.medmnist import load_medmnist
from medlatent.errors import DataError


def test_catalogue_lists_every_medmnist_subset():
    two_d = {n for n, e in CATALOGUE.items() if e.spatial_dims == 2}
    three_d = {n for n, e in CATALOGUE.items() if e.spatial_dims == 3}
    assert len(two_d) == 12 and len(three_d) == 6
    for e in CATALOGUE.values():
        assert e.task in TASKS
        assert set(e.splits) == {"train", "val", "test"}
        assert all(len(m) == 32 for m in e.md5.values())
        assert e.url(28).startswith("https://zenodo.org/records/10519652/files/")
    assert get_info("BloodMNIST").filename(64) == "bloodmnist_64.npz"
    with pytest.raises(DataError, match="unknown MedMNIST subset 'nosuchmnist'"):
        get_info("nosuchmnist")


@pytest.mark.parametrize("name", ["bloodmnist", "pneumoniamnist", "breastmnist", "retinamnist"])
def test_shared_files_match_official_md5_and_sizes(real_data_dir: Path, name: str):
    ds = load_medmnist(name, data_dir=str(real_data_dir))
    info = CATALOGUE[name]
    for split, n in info.splits.items():
        s = ds.split(split)
        assert len(s) == n
        assert s.images.shape[1:] == (info.channels, 28, 28)
        assert s.labels.shape == (n, 1)
    assert ds.task == info.task


def test_wrong_md5_is_refused_with_both_checksums(tmp_path: Path, real_data_dir: Path):
    bad = tmp_path / "breastmnist.npz"
    data = bytearray((real_data_dir / "breastmnist.npz").read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        download.fetch(get_info("breastmnist"), 28, str(tmp_path))
    msg = str(e.value)
    assert str(bad) in msg and "750601b1f35ba3300ea97c75c52ff8f6" in msg
    assert hashlib.md5(bytes(data)).hexdigest() in msg and "\n" not in msg


def test_offline_download_names_file_url_md5_and_destination(tmp_path: Path, monkeypatch):
    _empty_home(tmp_path, monkeypatch)
    monkeypatch.setenv(download.MIRROR_VAR, (tmp_path / "no-such-mirror").as_uri())
    dest_dir = tmp_path / "data"
    with pytest.raises(DataError) as e:
        download.fetch(get_info("breastmnist"), 28, str(dest_dir))
    msg = str(e.value)
    assert "breastmnist.npz" in msg and "no-such-mirror/breastmnist.npz" in msg
    assert "750601b1f35ba3300ea97c75c52ff8f6" in msg and str(dest_dir / "breastmnist.npz") in msg
    assert not any(dest_dir.iterdir())  # nothing half-written


def test_download_from_mirror_verifies_and_writes_atomically(tmp_path: Path, real_data_dir: Path, monkeypatch):
    _empty_home(tmp_path, monkeypatch)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv(download.MIRROR_VAR, mirror.as_uri())
    # a truncated file on the mirror: refused, nothing left behind
    (mirror / "breastmnist.npz").write_bytes((real_data_dir / "breastmnist.npz").read_bytes()[:1000])
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        download.fetch(get_info("breastmnist"), 28, str(dest))
    assert list(dest.iterdir()) == []
    # the real file: downloaded, verified, usable
    shutil.copy(real_data_dir / "breastmnist.npz", mirror / "breastmnist.npz")
    path = download.fetch(get_info("breastmnist"), 28, str(dest))
    assert path == dest / "breastmnist.npz" and [p.name for p in dest.iterdir()] == ["breastmnist.npz"]
    assert len(load_medmnist("breastmnist", data_dir=str(dest)).split("train")) == 546


def test_data_root_order(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(download.ENV_VAR, str(tmp_path / "env"))
    assert download.data_root(None) == tmp_path / "env"
    assert download.data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.delenv(download.ENV_VAR)
    assert download.data_root(None) == Path.home() / ".cache" / "medlatent"


def _empty_home(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """No ~/.medmnist of the developer's: the lookup falls through to the download."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
