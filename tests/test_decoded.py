"""Training from a CSV manifest without ``data prepare``: images decoded when indexed."""

from __future__ import annotations

import csv
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


def _csv(root: Path, n: int = 30) -> Path:
    a = np.asarray(Image.open(RETINA).convert("RGB"))
    rng = np.random.default_rng(1)
    rows = [["path", "label", "group"]]
    for i in range(n):
        y, x = rng.integers(0, a.shape[0] - 80, 2)
        Image.fromarray(a[y:y + 80, x:x + 80]).save(root / f"{i:02d}.png")
        rows.append([f"{i:02d}.png", "" if i % 3 == 0 else str(i % 2), f"pt{i // 2}"])
    with (root / "images.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "images.csv"


def test_csv_rows_decode_as_the_store_would(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    ds = load_dataset(DataConfig(name=str(path), size=24, workers=1))
    prepare(mf.read_csv(path, group_col="group"), tmp_path / "store", PrepareConfig(size=24))
    store = open_store(tmp_path / "store")
    assert {k: len(v) for k, v in ds.splits.items()} == {k: len(v) for k, v in store.splits.items()}
    for split in ds.splits:
        lazy, stored = ds.splits[split], store.splits[split]
        assert lazy.sources == stored.sources  # the same seeded, grouped split
        index = torch.arange(len(lazy)).flip(0)
        assert torch.equal(lazy.images[index], stored.images[index])
        assert torch.equal(lazy.labels, stored.labels)
    assert ds.splits["train"].images.shape == (len(ds.splits["train"]), 3, 24, 24)
    assert ds.splits["train"].images[2:5].shape == (3, 3, 24, 24)


def test_two_decode_workers_give_the_same_batch(tmp_path: Path) -> None:
    path = _csv(tmp_path, 12)
    one = load_dataset(DataConfig(name=str(path), size=16, workers=1)).splits["train"].images
    two = load_dataset(DataConfig(name=str(path), size=16, workers=2)).splits["train"].images
    index = torch.tensor([3, 0, 5, 1, 2])
    assert torch.equal(one[index], two[index])


def test_missing_file_in_the_csv_is_one_line_with_the_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, 6)
    (tmp_path / "03.png").unlink()
    with pytest.raises(DataError, match=r"images\.csv.*(row|line) 5.*03\.png"):
        load_dataset(DataConfig(name=str(path), size=16, workers=1))


def test_pretrain_and_probe_straight_from_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import run_cli

    path = _csv(tmp_path, 40)
    code, out, err = run_cli(capsys, "pretrain", "--data", str(path), "--size", "16", "--method", "simclr",
                             "--epochs", "1", "--batch-size", "8", "--set", "data.workers=1",
                             "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "(CSV manifest, decoded as read), 16 px" in out
    code, out, err = run_cli(capsys, "probe", str(tmp_path / "run"))
    assert code == 0 and "linear" in out, err
