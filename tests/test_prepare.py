"""``data prepare``: manifests decoded into a memory-mapped store, reused, refused, read by row."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlatent.config import DataConfig
from medlatent.data import manifest as mf
from medlatent.data.prepare import PrepareConfig, prepare
from medlatent.data.sources import load_dataset
from medlatent.data.store import open_store
from medlatent.errors import DataError

RETINA = Path(__file__).resolve().parents[2] / "shared" / "data" / "other" / "retina.jpg"


def _crops(n: int, side: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Real content: random crops of a fundus photograph (RGB uint8)."""
    a = np.asarray(Image.open(RETINA).convert("RGB"))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, a.shape[0] - side, 2)
        out.append(a[y:y + side, x:x + side])
    return out


def _folder(root: Path, n: int = 24) -> Path:
    for i, img in enumerate(_crops(n)):
        cls = "normal" if i % 2 else "lesion"
        (root / cls / f"p{i // 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"p{i // 4}" / f"{i:03d}.png")
    return root


def _resize_like_prepare(img: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def test_folder_store_rows_labels_splits_and_pixels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    m = mf.read_folder(root, group_by="parent")
    store = prepare(m, tmp_path / "store", PrepareConfig(size=32))
    assert store.count == 24 and store.size == 32 and store.channels == 3 and not store.reused
    ds = open_store(tmp_path / "store")
    assert sum(len(s) for s in ds.splits.values()) == 24 and set(ds.splits) == {"train", "val", "test"}
    assert ds.class_names == ("lesion", "normal") and ds.task == "binary-class"
    images = np.load(tmp_path / "store" / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (24, 3, 32, 32)
    # each split is a slice of the one memory map, not a copy
    train = ds.splits["train"].images
    assert train.untyped_storage().data_ptr() == ds.splits["val"].images.untyped_storage().data_ptr()
    # pixels and labels follow the file each row names
    for split in ds.splits.values():
        for i in range(len(split)):
            path = Path(split.sources[i])
            expected = _resize_like_prepare(np.asarray(Image.open(path)), 32)
            assert np.array_equal(split.images[i].numpy(), expected)
            assert ds.class_names[int(split.labels[i, 0])] == path.parent.parent.name
    # patients never span splits
    rows = list(csv.DictReader((tmp_path / "store" / "manifest.csv").open()))
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {r["height"] for r in rows} == {"96"} and all(len(r["checksum"]) == 32 for r in rows)
    # the stored statistics are those of the train rows
    x = train.float() / 255
    assert np.allclose(ds.stats[0], x.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)


def test_same_inputs_reuse_other_inputs_refused_overwrite_replaces(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 8)
    out = tmp_path / "store"
    prepare(mf.read_folder(root), out, PrepareConfig(size=16))
    stamp = (out / "images.npy").stat().st_mtime_ns
    again = prepare(mf.read_folder(root), out, PrepareConfig(size=16))
    assert again.reused and (out / "images.npy").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"store: holds a store prepared from other .*--overwrite"):
        prepare(mf.read_folder(root), out, PrepareConfig(size=24))
    first = sorted(root.rglob("*.png"))[0]
    Image.fromarray(_crops(1, seed=9)[0]).save(first)  # a source file changed after prepare
    os.utime(first, ns=(stamp + 10**9, stamp + 10**9))
    with pytest.raises(DataError, match="other files"):
        prepare(mf.read_folder(root), out, PrepareConfig(size=16))
    replaced = prepare(mf.read_folder(root), out, PrepareConfig(size=16), overwrite=True)
    assert not replaced.reused and not list(tmp_path.glob(".store.*"))


def test_csv_with_unlabelled_rows_and_groups(tmp_path: Path) -> None:
    imgs = _crops(12)
    rows = [["file", "dx", "patient"]]
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", "" if i >= 4 else ("a" if i % 2 else "b"), f"pt{i // 3}"])
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    m = mf.read_csv(tmp_path / "labels.csv", path_col="file", label_col="dx", group_col="patient")
    prepare(m, tmp_path / "store", PrepareConfig(size=16, split=(0.5, 0.25, 0.25)))
    ds = open_store(tmp_path / "store")
    labels = torch.cat([s.labels for s in ds.splits.values()])
    assert int((labels >= 0).sum()) == 4 and int((labels == -1).sum()) == 8
    train = ds.splits["train"]
    assert len(train.labelled()) == int((train.labels >= 0).sum())
    assert json.loads((tmp_path / "store" / "store.json").read_text())["labelled"] == 4


def test_unreadable_file_refused_with_row_and_report_or_skipped(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 8)
    bad = root / "normal" / "p0" / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "store"
    with pytest.raises(DataError, match=r"broken\.png .*cannot read.*1 unreadable file.*--skip-bad") as e:
        prepare(mf.read_folder(root), out, PrepareConfig(size=16))
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))
    report = list(csv.DictReader((tmp_path / "store.unreadable.csv").open()))
    assert [Path(r["path"]).name for r in report] == ["broken.png"]
    kept = prepare(mf.read_folder(root), out, PrepareConfig(size=16, skip_bad=True))
    assert kept.count == 8 and [Path(p).name for _, p, _ in kept.skipped] == ["broken.png"]
    ds = open_store(out)
    assert all("broken" not in p for s in ds.splits.values() for p in s.sources)
    assert np.load(out / "images.npy", mmap_mode="r").shape[0] == 8


def test_mixed_channels_refused_unless_converted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 6)
    grey = root / "normal" / "p0" / "zz_grey.png"
    Image.fromarray(_crops(1)[0][..., 1]).save(grey)
    with pytest.raises(DataError, match=r"zz_grey\.png .*1 channel\(s\), the store has 3.*--channels 3"):
        prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16))
    store = prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16, channels=3))
    assert store.count == 7 and store.channels == 3


def test_full_disk_refused_before_writing_and_while_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "imgs", 4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DataError, match=r"needs 0\.00 GiB and the disk has 0\.00 GiB free"):
        prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16))
    monkeypatch.undo()

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DataError, match="writing the store failed \\(No space left on device\\); nothing was kept"):
        prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16))
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store*"))


def test_changed_store_file_refused_on_open(tmp_path: Path) -> None:
    prepare(mf.read_folder(_folder(tmp_path / "imgs", 4)), tmp_path / "store", PrepareConfig(size=16))
    path = tmp_path / "store" / "images.npy"
    a = np.load(path, mmap_mode="r+")
    a[0, 0, 0, 0] ^= 0xFF
    a.flush()
    del a
    with pytest.raises(DataError, match=r"images\.npy: changed after it was prepared .*prepare` again"):
        open_store(tmp_path / "store")


def test_stale_build_folder_of_a_killed_prepare_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".store.tmp-999999999"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    prepare(mf.read_folder(_folder(tmp_path / "imgs", 4)), tmp_path / "store", PrepareConfig(size=16))
    assert not stale.exists()


def test_sixteen_bit_percentiles_and_dicom_header_window(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = tmp_path / "ct"
    root.mkdir()
    hu = np.full((64, 64), 40, np.int16)  # window centre: mid grey after windowing
    hu[:, :32] = -1000  # air: black
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.save_as(root / "slice.dcm", enforce_file_format=True)
    nopix = ds.copy()
    del nopix.PixelData
    nopix.save_as(root / "nopixels.dcm", enforce_file_format=True)
    wide = (1000 + np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) // 2)  # 1000..3047 of 65535
    Image.fromarray(wide).save(root / "wide.png")  # 16-bit PNG

    m = mf.read_folder(root)
    with pytest.raises(DataError, match=r"nopixels\.dcm .*cannot read"):
        prepare(m, tmp_path / "store", PrepareConfig(size=32, split=(1.0, 0.0, 0.0)))
    store = prepare(m, tmp_path / "store", PrepareConfig(size=32, split=(1.0, 0.0, 0.0), skip_bad=True))
    ds_ = open_store(tmp_path / "store")
    by_name = {Path(p).name: ds_.splits["train"].images[i] for i, p in enumerate(ds_.splits["train"].sources)}
    ct = by_name["slice.dcm"][0].float()
    assert store.count == 2
    assert abs(ct[:, 24:].mean().item() - 127.5) < 2 and ct[:, :8].max().item() == 0
    png = by_name["wide.png"][0]
    assert png.min().item() <= 5 and png.max().item() >= 250  # percentiles stretch the used range, not 0..65535


def test_volumes_make_a_five_dimensional_store(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "vols"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            v = np.random.default_rng(i).random((20, 24, 22)).astype(np.float32) * (1 + (cls == "b"))
            nib.save(nib.Nifti1Image(v, np.eye(4)), root / cls / f"{i}.nii.gz")
    store = prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16, spatial_dims=3))
    ds = open_store(tmp_path / "store")
    assert store.count == 6 and ds.spatial_dims == 3 and ds.splits["train"].images.shape[1:] == (1, 16, 16, 16)
    rows = list(csv.DictReader((tmp_path / "store" / "manifest.csv").open()))
    assert (rows[0]["depth"], rows[0]["height"], rows[0]["width"]) == ("20", "24", "22")


def _dicom_slice(path: Path, hu: np.ndarray, instance: int, window: tuple[int, int] | None = (40, 400)) -> None:
    """One CT slice as a DICOM file: stored values hu + 1024, RescaleIntercept -1024."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *hu.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(instance)]
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_series_folders_become_volumes_in_instance_order(tmp_path: Path) -> None:
    """With spatial_dims=3 the .dcm slices of one folder are one (1, D, H, W) volume, slices in
    InstanceNumber order (not file-name order), windowed by the header; a CSV row may name the
    series folder; changing one slice changes the store's fingerprint and checksum."""
    root = tmp_path / "ct"
    for cls, patients in (("a", ("p1", "p2")), ("b", ("p3",))):
        for p in patients:
            for z in range(8):  # slice z: -160 + 40 z HU -> 8 steps of 0.1 of the window (40, 400)
                hu = np.full((8, 8), -160 + 40 * z, np.int16)
                _dicom_slice(root / cls / p / f"img{7 - z:02d}.dcm", hu, instance=z + 1)  # names reversed
    store = prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=8, spatial_dims=3,
                                                                           split=(1.0, 0.0, 0.0)))
    ds = open_store(tmp_path / "store")
    images = ds.splits["train"].images
    assert store.count == 3 and images.shape == (3, 1, 8, 8, 8)
    levels = images[0, 0, :, 4, 4].float() / 255  # (D,): one value per slice
    assert torch.allclose(levels, torch.arange(8) * 0.1, atol=1 / 255)  # ordered by InstanceNumber
    rows = list(csv.DictReader((tmp_path / "store" / "manifest.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["p1", "p2", "p3"] and [r["label"] for r in rows] == ["a", "a", "b"]
    assert (rows[0]["depth"], rows[0]["height"], rows[0]["width"]) == ("8", "8", "8")

    table = tmp_path / "series.csv"
    table.write_text(f"path,label\n{root / 'a' / 'p1'},x\n{root / 'b' / 'p3'},y\n")
    prepare(mf.read_csv(table), tmp_path / "from_csv", PrepareConfig(size=8, spatial_dims=3, split=(1.0, 0.0, 0.0)))
    assert torch.equal(open_store(tmp_path / "from_csv").splits["train"].images[0], images[0])

    old = json.loads((tmp_path / "store" / "store.json").read_text())["fingerprint"]
    _dicom_slice(root / "a" / "p1" / "img00.dcm", np.full((8, 8), 0, np.int16), instance=8)
    with pytest.raises(DataError, match="other inputs|--overwrite"):
        prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=8, spatial_dims=3, split=(1.0, 0.0, 0.0)))
    prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=8, spatial_dims=3, split=(1.0, 0.0, 0.0)),
            overwrite=True)
    assert json.loads((tmp_path / "store" / "store.json").read_text())["fingerprint"] != old


def test_dicom_series_bad_input_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slices here")
    table = tmp_path / "t.csv"
    table.write_text(f"path,label\n{empty},x\n")
    with pytest.raises(DataError, match=r"row 2: .*is a folder without \.dcm files"):
        mf.read_csv(table)
    mixed = tmp_path / "mixed.csv"
    for z in range(2):
        _dicom_slice(tmp_path / "s" / f"{z}.dcm", np.zeros((8, 8), np.int16), instance=z + 1)
    mixed.write_text(f"path,label\n{tmp_path / 's' / '0.dcm'},x\n{tmp_path / 's' / '1.dcm'},y\n")
    with pytest.raises(DataError, match=r"one DICOM series, but row 2 has label 0 and row 3 has 1"):
        prepare(mf.read_csv(mixed), tmp_path / "st", PrepareConfig(size=8, spatial_dims=3))


def test_two_workers_write_the_same_store_as_one(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 70)  # more than two chunks
    prepare(mf.read_folder(root), tmp_path / "one", PrepareConfig(size=16))
    prepare(mf.read_folder(root), tmp_path / "two", PrepareConfig(size=16, workers=2))
    assert np.array_equal(np.load(tmp_path / "one" / "images.npy"), np.load(tmp_path / "two" / "images.npy"))


def test_load_dataset_reads_a_store_at_its_own_size(tmp_path: Path) -> None:
    prepare(mf.read_folder(_folder(tmp_path / "imgs", 4)), tmp_path / "store", PrepareConfig(size=16))
    assert load_dataset(DataConfig(name=str(tmp_path / "store"))).image_size == 16
    with pytest.raises(DataError, match="holds 16-px images, but data.size is 32"):
        load_dataset(DataConfig(name=str(tmp_path / "store"), size=32))


def test_cli_prepare_pretrain_probe_from_a_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from conftest import run_cli

    root = _folder(tmp_path / "imgs", 40)
    prep = ["data", "prepare", str(root), "--output", str(tmp_path / "s"), "--size", "32", "--group-by", "parent"]
    code, out, err = run_cli(capsys, *prep)
    assert code == 0 and "40 images at 32 px" in out, err
    assert "reused" in run_cli(capsys, *prep)[1]
    code, out, err = run_cli(capsys, "pretrain", "--data", str(tmp_path / "s"), "--method", "simclr", "--epochs", "1",
                             "--batch-size", "8", "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert f"data: {tmp_path / 's'} (store), 32 px, 3 channels; train" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["size"] == 32
    code, out, err = run_cli(capsys, "probe", str(tmp_path / "run"))
    assert code == 0 and "linear" in out, err


def test_volume_slices_make_a_two_dimensional_store(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "vols"
    root.mkdir()
    volumes = {}
    for i in range(2):
        v = np.random.default_rng(i).random((20, 24, 5 + i)).astype(np.float32)
        volumes[f"{i}.nii.gz"] = v
        nib.save(nib.Nifti1Image(v, np.eye(4)), root / f"{i}.nii.gz")
    store = prepare(mf.read_folder(root), tmp_path / "store", PrepareConfig(size=16, slices=True, split=(1.0, 0.0, 0.0)))
    assert store.count == 5 + 6
    rows = list(csv.DictReader((tmp_path / "store" / "manifest.csv").open()))
    assert [(Path(r["path"]).name, r["slice"]) for r in rows[:6]] == [("0.nii.gz", str(k)) for k in range(5)] + [("1.nii.gz", "0")]
    images = np.load(tmp_path / "store" / "images.npy")
    assert images.shape == (11, 1, 16, 16)
    # row 6 is slice 1 of the second volume, scaled by its own percentiles
    one = volumes["1.nii.gz"][:, :, 1]
    lo, hi = np.percentile(one, (0.5, 99.5))
    x = torch.from_numpy(np.clip((one - lo) / (hi - lo), 0, 1))[None, None]
    x = torch.nn.functional.interpolate(x[..., 2:22], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(images[6, 0].astype(int) - np.rint(x[0, 0].clamp(0, 1).numpy() * 255).astype(int)).max() <= 1
