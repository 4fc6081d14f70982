from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medlatent.config import DataConfig
from medlatent.data.folders import load_folder
from medlatent.data.medmnist import load_npz
from medlatent.data.sources import load_dataset
from medlatent.data.store import epoch_batches
from medlatent.errors import DataError

from conftest import write_stripes_npz


def test_npz_layout_gray_and_rgb(tmp_path: Path):
    gray = load_npz(write_stripes_npz(tmp_path / "g.npz", 40, 8, 8, channels=1))
    rgb = load_npz(write_stripes_npz(tmp_path / "c.npz", 40, 8, 8, channels=3))
    assert gray.split("train").images.shape == (40, 1, 28, 28) and gray.split("train").images.dtype == torch.uint8
    assert rgb.split("train").images.shape == (40, 3, 28, 28)
    assert gray.task == "binary-class" and gray.split("val").labels.shape == (8, 1)


def test_truncated_npz_is_one_clear_error(tmp_path: Path, stripes_npz: Path):
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(stripes_npz.read_bytes()[: stripes_npz.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_npz(bad)
    assert str(bad) in str(e.value) and "truncated or corrupt" in str(e.value)


def test_labels_that_do_not_match_images(tmp_path: Path):
    p = tmp_path / "mismatch.npz"
    np.savez(p, train_images=np.zeros((10, 28, 28), np.uint8), train_labels=np.zeros((9, 1), np.int64))
    with pytest.raises(DataError, match="train_labels has 9 entries for 10 images"):
        load_npz(p)


def test_npz_without_images(tmp_path: Path):
    p = tmp_path / "empty.npz"
    np.savez(p, something=np.zeros(3))
    with pytest.raises(DataError, match="no image arrays"):
        load_npz(p)


def test_unknown_data_name():
    with pytest.raises(DataError, match="not a MedMNIST subset"):
        load_dataset(DataConfig(name="definitely-not-here"))


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    a = epoch_batches(100, 32, seed=1, epoch=3)
    b = epoch_batches(100, 32, seed=1, epoch=3)
    c = epoch_batches(100, 32, seed=1, epoch=4)
    assert len(a) == 3 and all(len(x) == 32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert len(set(torch.cat(a).tolist())) == 96  # no repeats within an epoch


# ---------------------------------------------------------------------------------- folders


def test_real_microscopy_pathology_retina_images(other_images: Path, tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "gray").mkdir(parents=True)
    (root / "rgb").mkdir()
    shutil.copy(other_images / "cell.png", root / "gray")
    shutil.copy(other_images / "microaneurysms.png", root / "gray")
    shutil.copy(other_images / "ihc.png", root / "rgb")
    shutil.copy(other_images / "retina.jpg", root / "rgb")
    ds = load_folder(root, size=32, normalize="none")
    x = ds.split("train").images
    assert x.shape == (4, 3, 32, 32)  # grayscale promoted because the folder mixes both
    assert ds.class_names == ("gray", "rgb") and ds.split("train").labels.view(-1).tolist() == [0, 0, 1, 1]
    # a grayscale-only folder stays 1-channel
    gray = load_folder(root / "gray", size=32, normalize="percentile")
    assert gray.split("train").images.shape == (2, 1, 32, 32) and gray.task is None
    img = gray.split("train").images
    assert img.dtype == torch.float32 and 0 <= float(img.min()) and float(img.max()) <= 1


def test_16bit_tiff_keeps_its_precision(tmp_path: Path):
    tifffile = pytest.importorskip("tifffile")
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 4096 distinct levels
    tifffile.imwrite(tmp_path / "ramp16.tif", ramp)
    tifffile.imwrite(tmp_path / "ramp8.tif", (ramp >> 8).astype(np.uint8))
    ds = load_folder(tmp_path, size=64, normalize="none")
    x16, x8 = ds.split("train").images  # sorted by name: ramp16, ramp8
    assert x16.dtype == torch.float32
    assert len(torch.unique(x16)) > 1000  # 16-bit levels survive
    assert len(torch.unique(x8)) <= 256
    assert torch.allclose(x16.view(-1)[-1], torch.tensor(ramp[-1, -1] / 65535.0, dtype=torch.float32), atol=1e-6)


def test_dicom_files_shipped_with_pydicom(tmp_path: Path):
    pydicom_data = pytest.importorskip("pydicom.data")
    src = Path(pydicom_data.__file__).parent / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(src / name, tmp_path / name)
    ds = load_folder(tmp_path, size=28, normalize="window", window=(40, 400))
    x = ds.split("train").images
    assert x.shape == (2, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x[0].std()) > 0.05  # CT soft-tissue window shows structure


def test_nifti_files_shipped_with_nibabel(tmp_path: Path):
    nib = pytest.importorskip("nibabel")
    src = Path(nib.__file__).parent / "tests" / "data"
    shutil.copy(src / "anatomical.nii", tmp_path / "a.nii")
    shutil.copy(src / "example4d.nii.gz", tmp_path / "b.nii.gz")
    with pytest.raises(DataError, match="expected 2-D"):
        load_folder(tmp_path, size=16, spatial_dims=2)
    (tmp_path / "b.nii.gz").unlink()
    ds = load_folder(tmp_path, size=16, spatial_dims=3)
    assert ds.split("train").images.shape == (1, 1, 16, 16, 16) and ds.spatial_dims == 3


def test_unreadable_image_is_named(tmp_path: Path, other_images: Path):
    shutil.copy(other_images / "cell.png", tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=28)
    assert str(tmp_path / "broken.png") in str(e.value) and "cannot read" in str(e.value)


def test_empty_folder(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        load_folder(tmp_path, size=28)


def test_split_subfolders(tmp_path: Path, other_images: Path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            shutil.copy(other_images / "cell.png", d / "x.png")
    ds = load_folder(tmp_path, size=28)
    assert set(ds.splits) == {"train", "val"} and len(ds.split("val")) == 2
