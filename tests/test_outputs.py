"""Outputs others can read: `medlatent embed` and `medlatent map` write ids (position in the
split, source file) beside embeddings, coordinates and labels, as .npz and CSV, and each row
belongs to the image it says it does."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, stripes, write_stripes_npz


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def features_of(run: Path, images: torch.Tensor) -> np.ndarray:
    """The run's encoder applied to ``images`` (N, C, H, W) on its own, one call per image."""
    from medlatent.eval.features import extract_features
    from medlatent.methods.saved import load_encoder

    encoder, meta, _ = load_encoder(run, torch.device("cpu"))
    return np.concatenate([extract_features(encoder, images[i:i + 1], meta["mean"], meta["std"],
                                            torch.device("cpu")).float().numpy() for i in range(len(images))])


def write_folder(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """root/{train,test}/{horizontal,vertical}/*.png; split -> [(file, class index)] in file order."""
    from PIL import Image

    files: dict[str, list[tuple[Path, int]]] = {}
    for s, (split, n) in enumerate((("train", 12), ("test", 8))):
        x, y = stripes(n, seed=s)
        for i in range(n):
            name = ("horizontal", "vertical")[int(y[i, 0])]
            (root / split / name).mkdir(parents=True, exist_ok=True)
            path = root / split / name / f"img{i:02d}.png"
            Image.fromarray(x[i]).save(path)
            files.setdefault(split, []).append((path, int(y[i, 0])))
    return {k: sorted(v, key=lambda t: (t[1], t[0].name)) for k, v in files.items()}  # class folders, then names


def pretrain(capsys, data: Path, run: Path) -> None:
    # fp32, so that features computed here one image at a time match the evaluation's closely
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), "--epochs", "0.5", "--batch-size", "4",
                           "--set", "train.precision=fp32", "--output", str(run))
    assert code == 0, err


def test_image_folder_embeddings_and_map_name_their_files(capsys, tmp_path: Path):
    from medlatent.data.folders import prepare_image

    root = tmp_path / "stripes"
    files = write_folder(root)
    run = tmp_path / "run"
    pretrain(capsys, root, run)

    code, out, err = run_cli(capsys, "embed", str(run), "--split", "test")
    assert code == 0, err
    z = np.load(run / "embeddings-test.npz", allow_pickle=False)
    n = len(files["test"])
    assert z["embeddings"].shape[0] == n and z["index"].tolist() == list(range(n))
    assert z["source"].tolist() == [str(p.absolute()) for p, _ in files["test"]]
    assert z["labels"][:, 0].tolist() == [c for _, c in files["test"]]
    # row i is the encoder's features of the file named in source i, read on its own
    one_by_one = torch.from_numpy(np.stack([prepare_image(Path(s), 28, 2, "percentile", (40.0, 400.0), (0.5, 99.5))
                                            for s in z["source"]]))
    np.testing.assert_allclose(z["embeddings"], features_of(run, one_by_one), rtol=1e-4, atol=1e-5)

    header, rows = read_csv(run / "embeddings-test.csv")
    d = z["embeddings"].shape[1]
    assert header == ["index", "source", "label"] + [f"d{j}" for j in range(d)]
    assert [int(r["index"]) for r in rows] == list(range(n))
    assert [r["source"] for r in rows] == z["source"].tolist()
    assert [int(r["label"]) for r in rows] == z["labels"][:, 0].tolist()
    values = np.array([[float(r[f"d{j}"]) for j in range(d)] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(values, z["embeddings"])  # float32 read back exactly

    code, out, err = run_cli(capsys, "map", str(run), "--split", "test")
    assert code == 0, err
    assert (run / "embedding_map_test.png").is_file()
    header, rows = read_csv(run / "embedding_map_test.csv")
    assert header == ["index", "x", "y", "label", "source"]
    assert sorted(int(r["index"]) for r in rows) == list(range(n))  # fewer than max_points: every image
    for r in rows:
        i = int(r["index"])
        assert r["source"] == z["source"][i] and int(r["label"]) == z["labels"][i, 0]
        assert np.isfinite([float(r["x"]), float(r["y"])]).all()


def test_npz_embeddings_and_map_carry_positions(capsys, tmp_path: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 16, 8, 10)
    run = tmp_path / "run"
    pretrain(capsys, data, run)
    out = tmp_path / "exports" / "test-embeddings.npz"
    code, _, err = run_cli(capsys, "embed", str(run), "--split", "test", "--out", str(out))
    assert code == 0, err
    z = np.load(out, allow_pickle=False)
    raw = np.load(data)
    assert "source" not in z.files and z["index"].tolist() == list(range(10))
    np.testing.assert_array_equal(z["labels"], raw["test_labels"])
    images = torch.from_numpy(raw["test_images"][:, None])  # (N, 1, H, W) uint8, as stored
    np.testing.assert_allclose(z["embeddings"], features_of(run, images), rtol=1e-4, atol=1e-5)
    header, rows = read_csv(out.with_suffix(".csv"))
    assert header[:2] == ["index", "label"] and "source" not in header
    assert [int(r["label"]) for r in rows] == raw["test_labels"][:, 0].tolist()

    code, _, err = run_cli(capsys, "map", str(run), "--split", "test", "--max-points", "8")
    assert code == 0, err
    header, rows = read_csv(run / "embedding_map_test.csv")
    assert header == ["index", "x", "y", "label"]
    index = [int(r["index"]) for r in rows]
    assert len(index) == 8 and len(set(index)) == 8 and all(0 <= i < 10 for i in index)
    assert [int(r["label"]) for r in rows] == raw["test_labels"][index, 0].tolist()


def test_sources_follow_subsets_and_label_columns():
    from medlatent.data.store import ImageSet, label_columns
    from medlatent.errors import DataError

    s = ImageSet(torch.zeros(4, 1, 2, 2), torch.tensor([[0], [1], [0], [1]]), ["a", "b", "c", "d"])
    assert s.subset(torch.tensor([3, 1])).sources == ["d", "b"]
    assert s.subset(torch.tensor([True, False, True, False])).sources == ["a", "c"]
    assert s.subset(torch.tensor([2])).labels.tolist() == [[0]] and s.to("cpu").sources == s.sources
    assert ImageSet(torch.zeros(2, 1, 2, 2)).subset(torch.tensor([1])).sources is None
    with pytest.raises(DataError, match="2 images but 1 source paths"):
        ImageSet(torch.zeros(2, 1, 2, 2), sources=["a"])
    multi = label_columns(torch.tensor([[1, 0], [0, 1]]), ("effusion", "mass"))
    assert list(multi) == ["label_effusion", "label_mass"] and multi["label_mass"].tolist() == [0, 1]
    assert label_columns(None, ()) == {}


def test_parquet_beside_csv_when_pyarrow_is_there(tmp_path: Path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from medlatent.data.store import save_parquet

    path = save_parquet(tmp_path / "e.parquet", {"index": np.arange(3), "source": ["a", "b", "c"],
                                                 "d0": np.array([0.5, 1.0, 2.0], np.float32)})
    assert pq.read_table(path).to_pydict()["source"] == ["a", "b", "c"]
