"""Bad or unusual input files: 16-bit and float .npz arrays, RGBA, labels that are not class
indices, and image folders whose layout is ambiguous. Each case is one clear DataError or a
correct load, never a crash later in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlatent.data.catalogue import get_info
from medlatent.data.folders import load_folder
from medlatent.data.medmnist import load_npz
from medlatent.errors import DataError


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------- .npz pixel values


@pytest.mark.parametrize("top", [4095, 65535])
def test_uint16_npz_spans_unit_range_without_saturating(tmp_path: Path, top: int):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, top + 1, (20, 16, 16)).astype(np.uint16)
    ds = load_npz(_npz(tmp_path / "u16.npz", train_images=raw))
    x = ds.split("train").images
    assert x.dtype == torch.float32 and x.shape == (20, 1, 16, 16)
    v = x.numpy().reshape(-1)
    assert v.min() >= 0 and v.max() <= 1
    assert v.min() < 0.01 and v.max() > 0.99  # spans [0, 1]
    assert (v == 1.0).mean() < 0.02  # not saturated
    assert len(np.unique(v)) > min(top, 2000)  # levels survive
    order = np.argsort(raw.reshape(-1), kind="stable")
    assert np.all(np.diff(v[order]) >= 0)  # same relative ordering


def test_signed_int16_npz_is_scaled_to_unit_range(tmp_path: Path):
    raw = np.random.default_rng(1).integers(-1024, 3072, (8, 16, 16)).astype(np.int16)  # CT-like
    v = load_npz(_npz(tmp_path / "ct.npz", train_images=raw)).split("train").images.numpy()
    assert v.min() >= 0 and v.max() <= 1 and v.min() < 0.01 and v.max() > 0.99


def test_npz_splits_share_one_intensity_mapping(tmp_path: Path):
    rng = np.random.default_rng(2)
    train = rng.integers(0, 4096, (20, 16, 16)).astype(np.uint16)
    test = rng.integers(0, 2048, (20, 16, 16)).astype(np.uint16)  # a darker split
    train[0, 0, 0] = test[0, 0, 0] = 1000
    ds = load_npz(_npz(tmp_path / "s.npz", train_images=train, test_images=test))
    a, b = ds.split("train").images, ds.split("test").images
    assert float(a.max()) <= 1 and float(b.max()) < 0.6  # the test split is not stretched on its own
    assert float(a[0, 0, 0, 0]) == float(b[0, 0, 0, 0])  # one value, one mapping


def test_rgba_npz_drops_alpha(tmp_path: Path):
    rgba = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 4), dtype=np.uint8)
    x = load_npz(_npz(tmp_path / "rgba.npz", train_images=rgba)).split("train").images
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(np.moveaxis(rgba[..., :3], -1, 1).copy()))


def test_bool_npz_becomes_0_1_float(tmp_path: Path):
    masks = np.random.default_rng(4).random((4, 8, 8)) > 0.5
    x = load_npz(_npz(tmp_path / "b.npz", train_images=masks)).split("train").images
    assert x.dtype == torch.float32 and set(torch.unique(x).tolist()) == {0.0, 1.0}


def test_float_npz_in_unit_range_is_kept(tmp_path: Path):
    a = np.random.default_rng(5).random((4, 8, 8)).astype(np.float64)
    x = load_npz(_npz(tmp_path / "f.npz", train_images=a)).split("train").images
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0], torch.from_numpy(a).float())


def test_float_npz_outside_unit_range_is_refused(tmp_path: Path):
    a = np.linspace(0, 300, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    p = _npz(tmp_path / "f300.npz", train_images=a)
    with pytest.raises(DataError) as e:
        load_npz(p)
    msg = _one_line(e)
    assert str(p) in msg and "train_images" in msg and "300" in msg and "[0, 1]" in msg


def test_float_npz_with_nan_is_refused(tmp_path: Path):
    a = np.full((4, 8, 8), 0.5, np.float32)
    a[1, 2, 3] = np.nan
    p = _npz(tmp_path / "nan.npz", val_images=a)
    with pytest.raises(DataError) as e:
        load_npz(p)
    msg = _one_line(e)
    assert str(p) in msg and "val_images" in msg and "NaN" in msg


# ------------------------------------------------------------------- .npz labels


def _labelled(path: Path, labels: np.ndarray, split: str = "train") -> Path:
    images = np.zeros((len(labels), 8, 8), np.uint8)
    return _npz(path, **{f"{split}_images": images, f"{split}_labels": labels})


def test_negative_labels_are_refused(tmp_path: Path):
    p = _labelled(tmp_path / "neg.npz", np.array([[0], [1], [-1], [2]]))
    with pytest.raises(DataError) as e:
        load_npz(p)
    msg = _one_line(e)
    assert str(p) in msg and "train_labels" in msg and "-1" in msg and "row 2" in msg


def test_fractional_float_labels_are_refused(tmp_path: Path):
    p = _labelled(tmp_path / "frac.npz", np.array([[0.0], [1.0], [0.5]]), split="val")
    with pytest.raises(DataError) as e:
        load_npz(p)
    msg = _one_line(e)
    assert str(p) in msg and "val_labels" in msg and "0.5" in msg and "integer" in msg


def test_integral_float_labels_are_accepted(tmp_path: Path):
    ds = load_npz(_labelled(tmp_path / "f.npz", np.array([0.0, 1.0, 2.0, 1.0])))
    y = ds.split("train").labels
    assert y.dtype == torch.int64 and y.view(-1).tolist() == [0, 1, 2, 1]


def test_label_outside_catalogue_classes_is_refused(tmp_path: Path):
    p = _labelled(tmp_path / "blood.npz", np.array([[0], [7], [8]], np.uint8), split="test")
    with pytest.raises(DataError) as e:
        load_npz(p, info=get_info("bloodmnist"))
    msg = _one_line(e)
    assert str(p) in msg and "test_labels" in msg and "8" in msg and "0..7" in msg


def test_catalogue_labels_in_range_are_accepted(tmp_path: Path):
    ds = load_npz(_labelled(tmp_path / "blood.npz", np.array([[0], [7], [3]], np.uint8)), info=get_info("bloodmnist"))
    assert ds.split("train").labels.view(-1).tolist() == [0, 7, 3]


def test_multi_label_with_a_2_is_refused(tmp_path: Path):
    p = _labelled(tmp_path / "ml.npz", np.array([[0, 1, 0], [1, 1, 0], [0, 2, 1]]))
    with pytest.raises(DataError) as e:
        load_npz(p)
    msg = _one_line(e)
    assert str(p) in msg and "train_labels" in msg and "2" in msg and "0 or 1" in msg


def test_catalogue_multi_label_needs_one_column_per_finding(tmp_path: Path):
    p = _labelled(tmp_path / "chest.npz", np.zeros((3, 5), np.uint8))
    with pytest.raises(DataError) as e:
        load_npz(p, info=get_info("chestmnist"))
    msg = _one_line(e)
    assert "train_labels" in msg and "5 columns" in msg and "14" in msg


# ------------------------------------------------------------------- folder layouts


def test_stray_image_next_to_class_folders_is_an_error(tmp_path: Path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "2.png")
    _png(tmp_path / "stray.png")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=8)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "stray.png" in msg and ("'a'" in msg or "'b'" in msg)
    assert "move" in msg


def test_stray_image_in_split_folder_is_an_error(tmp_path: Path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "train" / "b" / "2.png")
    _png(tmp_path / "train" / "stray.png")
    _png(tmp_path / "val" / "a" / "3.png")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=8)
    msg = _one_line(e)
    assert str(tmp_path / "train") in msg and "stray.png" in msg and ("'a'" in msg or "'b'" in msg)


def test_split_folder_next_to_class_folder_is_an_error(tmp_path: Path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "b" / "2.png")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=8)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "'train'" in msg and "'b'" in msg


def test_loose_image_next_to_split_folders_is_an_error(tmp_path: Path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "loose.png")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=8)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "loose.png" in msg and "'train'" in msg


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "2.png")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".thumbnails" / "3.png")
    (tmp_path / "labels.csv").write_text("file,label\n")
    (tmp_path / "README.txt").write_text("notes")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("no images in here")
    ds = load_folder(tmp_path, size=8)
    assert ds.class_names == ("a", "b") and len(ds.split("train")) == 2


def test_empty_split_folder_is_an_error(tmp_path: Path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "train" / "b" / "2.png")
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "notes.txt").write_text("nothing yet")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=8)
    msg = _one_line(e)
    assert str(tmp_path / "val") in msg and "no images" in msg


def test_folder_with_one_image_loads(tmp_path: Path):
    _png(tmp_path / "only.png")
    ds = load_folder(tmp_path, size=8)
    assert ds.split("train").images.shape == (1, 1, 8, 8) and ds.task is None
