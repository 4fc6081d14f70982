"""Manifests: CSV and folder reading, the errors a user sees, drawn splits, the written round trip."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlatent.data.manifest import (Entry, Manifest, assign_splits, columns, read_csv, read_folder,
                                     read_manifest, read_prepared)
from medlatent.data.store import save_csv
from medlatent.errors import DataError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def touch_all(folder: Path, names: list[str]) -> None:
    for name in names:
        png(folder / name)


def synthetic(labels: list[int | None], groups: list[str | None] | None = None) -> Manifest:
    groups = groups or [None] * len(labels)
    entries = [Entry(f"/img/{i}.png", lab, None, g, i + 2) for i, (lab, g) in enumerate(zip(labels, groups))]
    return Manifest(entries, ("a", "b", "c"), "m.csv")


# -- CSV -------------------------------------------------------------------------------------


def test_custom_column_names_map_to_fields(tmp_path: Path) -> None:
    touch_all(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    f = write(tmp_path / "m.csv", "filename,diagnosis,fold,patient_id\n"
                                  "imgs/a.png,tumour,train,p1\nimgs/b.png,normal,Valid,p2\nimgs/c.png,,test,\n")
    m = read_csv(f, path_col="filename", label_col="diagnosis", split_col="fold", group_col="patient_id")
    assert m.class_names == ("normal", "tumour")
    assert m.source == str(f)
    a, b, c = m.entries
    assert a == Entry(str(tmp_path / "imgs" / "a.png"), 1, "train", "p1", 2)
    assert (b.label, b.split, b.group, b.row) == (0, "val", "p2", 3)
    assert (c.label, c.split, c.group, c.row) == (None, "test", None, 4)


def test_unlabelled_rows_are_kept_and_default_columns_may_be_absent(tmp_path: Path) -> None:
    touch_all(tmp_path, [f"{i}.png" for i in range(6)])
    few = write(tmp_path / "few.csv", "path,label\n0.png,cat\n" + "".join(f"{i}.png,\n" for i in range(1, 6)))
    m = read_csv(few)
    assert len(m.entries) == 6 and m.class_names == ("cat",)
    assert [e.label for e in m.entries] == [0, None, None, None, None, None]
    bare = read_csv(write(tmp_path / "bare.csv", "path\n0.png\n1.png\n"))
    assert bare.class_names == () and all(e.label is None and e.split is None for e in bare.entries)


def test_root_resolves_relative_paths(tmp_path: Path) -> None:
    png(tmp_path / "data" / "x.png")
    m = read_csv(write(tmp_path / "csvs" / "m.csv", "path\nx.png\n"), root=tmp_path / "data")
    assert m.entries[0].path == str(tmp_path / "data" / "x.png")


def test_integer_labels_are_indices_and_classes_fix_the_order(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a.png", "b.png", "c.png"])
    ints = read_csv(write(tmp_path / "i.csv", "path,label\na.png,2\nb.png,0\nc.png,\n"))
    assert ints.class_names == ("0", "1", "2") and [e.label for e in ints.entries] == [2, 0, None]
    named = read_csv(write(tmp_path / "n.csv", "path,label\na.png,normal\nb.png,abnormal\nc.png,1\n"),
                     classes=["normal", "abnormal"])
    assert named.class_names == ("normal", "abnormal") and [e.label for e in named.entries] == [0, 1, 1]
    grades = read_csv(write(tmp_path / "g.csv", "path,label\na.png,1\nb.png,3\n"), classes=["1", "2", "3"])
    assert [e.label for e in grades.entries] == [0, 2]  # names first, then indices


@pytest.mark.parametrize("text, kwargs, message", [
    ("file,label\na.png,x\n", {}, r"bad\.csv: no column 'path'; the file has columns: file, label"),
    ("path,label\na.png,x\n", {"label_col": "diagnosis"}, r"bad\.csv: no column 'diagnosis'; .*path, label"),
    ("path\na.png\n", {"split_col": "fold"}, r"bad\.csv: no column 'fold'"),
    ("path\na.png\n", {"group_col": "patient"}, r"bad\.csv: no column 'patient'"),
    ("path,label\na.png,cat\nb.png,dog\n", {"classes": ["cat"]}, r"bad\.csv: row 3: label 'dog' is not one of"),
    ("path,split\na.png,train\nb.png,holdout\n", {}, r"bad\.csv: row 3: split 'holdout'"),
    ("path\na.png\nmissing.png\n", {}, r"bad\.csv: row 3: 'missing\.png' not found \(looked at .*missing\.png\)"),
    ("path\na.png\nsub\n", {}, r"bad\.csv: row 3: 'sub' is a folder"),
    ("path\na.png\n\n./a.png\n", {}, r"bad\.csv: rows 2 and 4 both name .*a\.png"),
    ("path,label\na.png,x,y\n", {}, r"bad\.csv: row 2: has 3 cells, expected 2"),
    ("path,label\n,x\n", {}, r"bad\.csv: row 2: empty 'path' cell"),
    ("path,split,pid\na.png,train,p7\nb.png,val,p8\nc.png,test,p7\n", {"group_col": "pid"},
     r"bad\.csv: group 'p7' is in split 'train' \(row 2\) and 'test' \(row 4\)"),
    ("path\n", {}, r"bad\.csv: no rows below the header"),
    ("", {}, r"bad\.csv: empty file"),
])
def test_bad_csv_names_file_row_and_value(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    touch_all(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=message) as info:
        read_csv(write(tmp_path / "bad.csv", text), **kwargs)
    assert "\n" not in str(info.value)


def test_missing_csv_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_csv(tmp_path / "nope.csv")


# -- folders ---------------------------------------------------------------------------------


def test_folder_with_split_and_class_folders(tmp_path: Path) -> None:
    touch_all(tmp_path, ["train/cat/1.png", "train/dog/2.png", "val/cat/3.png", "test/dog/4.png"])
    m = read_folder(tmp_path)
    assert m.class_names == ("cat", "dog") and m.source == str(tmp_path)
    got = {Path(e.path).name: (e.split, e.label, e.group, e.row) for e in m.entries}
    assert got == {"1.png": ("train", 0, None, 0), "2.png": ("train", 1, None, 0),
                   "3.png": ("val", 0, None, 0), "4.png": ("test", 1, None, 0)}
    assert assign_splits(m) is m  # splits given by the folders are kept


def test_class_folders_group_by_parent(tmp_path: Path) -> None:
    touch_all(tmp_path, ["benign/p1/a.png", "benign/p1/b.png", "benign/p2/c.png",
                         "malignant/p3/s1/d.png", "malignant/e.png"])
    m = read_folder(tmp_path, group_by="parent")
    got = {Path(e.path).name: (e.split, e.label, e.group) for e in m.entries}
    assert got == {"a.png": (None, 0, "p1"), "b.png": (None, 0, "p1"), "c.png": (None, 0, "p2"),
                   "d.png": (None, 1, "p3/s1"), "e.png": (None, 1, None)}
    assert all(e.group is None for e in read_folder(tmp_path).entries)


def test_flat_folder_is_unlabelled_without_splits(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a.png", "b.png", ".hidden.png"])
    write(tmp_path / "README.txt", "not an image")
    m = read_folder(tmp_path)
    assert [Path(e.path).name for e in m.entries] == ["a.png", "b.png"]
    assert m.class_names == () and all(e.label is None and e.split is None for e in m.entries)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        read_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no images found"):
        read_folder(tmp_path)
    touch_all(tmp_path, ["train/cat/p1/a.png", "test/cat/p1/b.png"])
    with pytest.raises(DataError, match=r"group 'p1' is in split 'test' \(.*b\.png\) and 'train' \(.*a\.png\)"):
        read_folder(tmp_path, group_by="parent")
    with pytest.raises(DataError, match="group_by must be None or 'parent'"):
        read_folder(tmp_path, group_by="patient")


def test_flat_folder_with_labels_csv(tmp_path: Path) -> None:
    images = tmp_path / "images"
    touch_all(images, ["a.png", "b.png", "p9/c.png", "unlisted.png"])
    labels = write(tmp_path / "labels.csv",
                   "path,label,split,pid\na.png,cat,train,p1\np9/c.png,dog,test,p9\nb.png,,,\n")
    m = read_manifest(images, labels=labels, group_col="pid")
    assert m.class_names == ("cat", "dog") and m.source == str(labels)
    got = {Path(e.path).name: (e.label, e.split, e.group, e.row) for e in m.entries}
    assert got == {"a.png": (0, "train", "p1", 2), "c.png": (1, "test", "p9", 3), "b.png": (None, None, None, 4),
                   "unlisted.png": (None, None, None, 0)}
    gone = write(tmp_path / "gone.csv", "path,label\na.png,cat\ngone.png,dog\n")
    with pytest.raises(DataError, match=r"gone\.csv: row 3: 'gone\.png' not found"):
        read_manifest(images, labels=gone)


def test_read_manifest_dispatches_and_rejects_misplaced_arguments(tmp_path: Path) -> None:
    touch_all(tmp_path / "flat", ["a.png"])
    csv_file = write(tmp_path / "flat" / "m.csv", "path\na.png\n")
    assert read_manifest(csv_file).source == str(csv_file)
    assert read_manifest(tmp_path / "flat").source == str(tmp_path / "flat")
    with pytest.raises(DataError, match="no such file or folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(DataError, match="is a CSV; labels and group_by apply to folders"):
        read_manifest(csv_file, group_by="parent")
    touch_all(tmp_path / "split", ["train/a.png"])
    with pytest.raises(DataError, match=r"split: has split folders \('train'\)"):
        read_manifest(tmp_path / "split", labels=csv_file)


# -- splits ----------------------------------------------------------------------------------


def test_given_splits_are_kept_and_partial_splits_refused(tmp_path: Path) -> None:
    touch_all(tmp_path, ["a.png", "b.png", "c.png"])
    full = read_csv(write(tmp_path / "full.csv", "path,split\na.png,test\nb.png,train\nc.png,validation\n"))
    assert assign_splits(full, seed=5) is full
    assert [e.split for e in full.entries] == ["test", "train", "val"]
    part = read_csv(write(tmp_path / "part.csv", "path,split\na.png,test\nb.png,\nc.png,\n"))
    with pytest.raises(DataError, match=r"part\.csv: 1 rows have a split and 2 do not \(first without: row 3\)"):
        assign_splits(part)


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.2), (1.1, -0.1, 0.0), (0.5, 0.5)])
def test_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(DataError, match=re.escape(f"split fractions {fractions}")):
        assign_splits(synthetic([0, 1]), fractions)


def shares(m: Manifest, label: object = "all") -> dict[str, float]:
    splits = [e.split for e in m.entries if label == "all" or e.label == label]
    return {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}


def test_drawn_splits_follow_fractions_per_label() -> None:
    labels = [0] * 600 + [1] * 250 + [2] * 100 + [None] * 50
    m = assign_splits(synthetic(labels), (0.7, 0.2, 0.1), seed=1)
    assert [e.label for e in m.entries] == labels  # order and labels untouched
    for label in ("all", 0, 1, 2, None):
        got = shares(m, label)
        assert got == pytest.approx({"train": 0.7, "val": 0.2, "test": 0.1}, abs=0.02), (label, got)


def test_drawn_splits_keep_groups_whole() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 21, 200)
    groups = [f"p{g}" for g, n in enumerate(sizes) for _ in range(n)]
    labels = [int(g) % 3 for g, n in enumerate(sizes) for _ in range(n)]
    m = assign_splits(synthetic(labels, groups), seed=7)
    per_group: dict[str, set[str]] = {}
    for e in m.entries:
        per_group.setdefault(e.group, set()).add(e.split)
    assert len(per_group) == 200 and all(len(s) == 1 for s in per_group.values())
    assert shares(m) == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1}, abs=0.03)
    for label in (0, 1, 2):
        assert shares(m, label) == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1}, abs=0.05)


def test_drawn_splits_are_seeded_and_ignore_row_order() -> None:
    labels = [i % 3 for i in range(300)]
    m = synthetic(labels)
    a, b, c = (assign_splits(m, seed=s) for s in (0, 0, 1))
    assert [e.split for e in a.entries] == [e.split for e in b.entries]
    assert [e.split for e in a.entries] != [e.split for e in c.entries]
    shuffled = Manifest(m.entries[::-1], m.class_names, m.source)
    by_path = {e.path: e.split for e in assign_splits(shuffled, seed=0).entries}
    assert all(by_path[e.path] == e.split for e in a.entries)


def test_every_split_gets_an_image_when_possible() -> None:
    m = assign_splits(synthetic([None] * 4))
    assert Counter(e.split for e in m.entries) == {"train": 2, "val": 1, "test": 1}
    none_val = assign_splits(synthetic([0] * 10), (0.9, 0.0, 0.1))
    assert Counter(e.split for e in none_val.entries) == {"train": 9, "test": 1}


# -- written manifests -----------------------------------------------------------------------


def test_round_trip_through_save_csv(tmp_path: Path) -> None:
    touch_all(tmp_path / "imgs", [f"{i}.png" for i in range(6)])
    f = write(tmp_path / "m.csv", "file,dx,pid\n" + "".join(
        f"imgs/{i}.png,{['normal', 'abnormal', ''][i % 3]},{'p' + str(i // 2) if i < 4 else ''}\n" for i in range(6)))
    m = assign_splits(read_csv(f, path_col="file", label_col="dx", group_col="pid",
                               classes=["normal", "abnormal", "unused"]), seed=3)
    written = save_csv(tmp_path / "out" / "manifest.csv", columns(m))
    back = read_prepared(written, classes=m.class_names)
    assert back.class_names == m.class_names
    assert [(e.path, e.label, e.split, e.group) for e in back.entries] == \
           [(e.path, e.label, e.split, e.group) for e in m.entries]
    assert [e.row for e in back.entries] == list(range(2, 8))
