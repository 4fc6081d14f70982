"""One encoder from many data sets: the union read by index, gray repeated to RGB, shares, evaluation per source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medlatent import api
from medlatent.config import DataConfig, PretrainConfig, ViewConfig, from_dict
from medlatent.data.mixture import MixedImages, batch_order, mix_datasets, mixture_batches, shares_counts
from medlatent.data.sources import describe_data, load_dataset
from medlatent.data.store import Dataset, ImageSet, channel_stats
from medlatent.errors import ConfigError, DataError
from medlatent.train.batches import BatchReader
from medlatent.train.runs import RunDir

from conftest import run_cli, write_stripes_npz


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def gray_and_rgb(tmp_path: Path) -> tuple[Path, Path]:
    """A 1-channel and a 3-channel data set in MedMNIST layout (stripes; 96 and 32 train images)."""
    return (write_stripes_npz(tmp_path / "gray.npz", 96, 32, 32, channels=1),
            write_stripes_npz(tmp_path / "rgb.npz", 32, 16, 16, channels=3))


def _store(root: Path, size: int, n: int = 10) -> Path:
    """A prepared (memory-mapped) store of ``n`` random RGB images at ``size`` px."""
    from medlatent.data import manifest as mf
    from medlatent.data.prepare import PrepareConfig, prepare

    rng = np.random.default_rng(0)
    folder = root / f"imgs{size}"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    prepare(mf.read_folder(folder), root / f"store{size}", PrepareConfig(size=size, workers=1))
    return root / f"store{size}"


def test_gray_source_is_repeated_to_rgb_rows_read_by_index(gray_and_rgb: tuple[Path, Path]):
    gray, rgb = gray_and_rgb
    mixed = load_dataset(DataConfig(mixture=[str(gray), str(rgb)]))
    g, c = load_dataset(DataConfig(name=str(gray))), load_dataset(DataConfig(name=str(rgb)))
    images = mixed.split("train").images
    assert isinstance(images, MixedImages) and images.shape == (128, 3, 28, 28) and images.dtype == torch.uint8
    assert images.parts[0].shape[1] == 1  # the gray source stays 1-channel in memory
    index = torch.tensor([100, 3, 96, 0, 127, 50])  # rows of both sources, interleaved
    for batch in (images[index], BatchReader(images, torch.device("cpu"), resident=False).read(index)):
        assert batch.shape == (6, 3, 28, 28)
        for row, i in zip(batch, index.tolist()):
            if i < 96:  # gray: the one channel three times, exactly
                assert torch.equal(row, g.split("train").images[i].expand(3, -1, -1))
            else:
                assert torch.equal(row, c.split("train").images[i - 96])
    assert images.source_ids()[index].tolist() == [1, 0, 1, 0, 1, 0]
    # each source keeps its labels; the mixture itself has none (no common label space)
    assert mixed.task is None and mixed.split("train").labels is None
    assert torch.equal(mixed.parts[0].split("train").labels, g.split("train").labels)
    assert set(mixed.splits) == {"train", "val", "test"} and len(mixed.split("test")) == 48
    assert describe_data(mixed, "train", 128) == (
        "data: mixture of 2 (files), 28 px, 3 channels; train 128 images: gray 96 (share 75.0%, 1 channel read "
        "as 3), rgb 32 (share 25.0%)")
    # channel statistics are the union's: equal to those of the union materialised
    mean, std = channel_stats(images[torch.arange(128)])
    assert mixed.stats[0] == pytest.approx(mean, abs=1e-4) and mixed.stats[1] == pytest.approx(std, abs=1e-4)


def test_a_memory_mapped_store_joins_without_being_copied(tmp_path: Path, gray_and_rgb: tuple[Path, Path]):
    store = _store(tmp_path, 28)
    mixed = load_dataset(DataConfig(mixture=[str(store), str(gray_and_rgb[0])]))
    images = mixed.split("train").images
    from medlatent.train.batches import is_file_backed, keep_on_device

    assert is_file_backed(images.parts[0]) and not keep_on_device(images, torch.device("cpu"))
    n_store = images.sizes[0]
    direct = load_dataset(DataConfig(name=str(store))).split("train").images
    assert torch.equal(images[torch.arange(n_store)], direct[:])


def test_proportional_default_is_every_image_once_per_epoch():
    images = MixedImages([torch.zeros(120, 1, 8, 8, dtype=torch.uint8), torch.zeros(40, 3, 8, 8, dtype=torch.uint8)],
                         ["a", "b"], 3)
    batches = batch_order(images, 16, seed=3, epoch=0)
    rows = torch.cat(batches)
    assert len(batches) == 10 and sorted(rows.tolist()) == list(range(160))  # each image once: shares 120 : 40
    assert torch.bincount(images.source_ids()[rows]).tolist() == [120, 40]


def test_weights_give_their_shares_and_the_order_is_a_function_of_seed_and_epoch():
    sizes, shares = [300, 50], [0.5, 0.5]
    assert shares_counts([0.2, 0.3, 0.5], 7) == [1, 2, 4] and sum(shares_counts([1 / 3] * 3, 10)) == 10
    ids = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    epochs = [mixture_batches(sizes, shares, 25, seed=0, epoch=e) for e in range(8)]
    per_batch = torch.tensor([float((ids[b] == 1).float().mean()) for bs in epochs for b in bs])  # 112 batches
    assert abs(float(per_batch.mean()) - 0.5) < 0.01  # the requested share, over many batches
    assert float(per_batch.std()) < 0.2  # and every batch near it (hypergeometric spread at 25 rows)
    assert all(torch.equal(a, b) for a, b in zip(epochs[2], mixture_batches(sizes, shares, 25, seed=0, epoch=2)))
    assert not torch.equal(epochs[0][0], mixture_batches(sizes, shares, 25, seed=1, epoch=0)[0])
    assert not torch.equal(epochs[0][0], epochs[1][0])
    first = torch.cat(epochs[0])
    assert int((ids[first] == 0).sum()) == 175 and len(first.unique()) < len(first)  # b repeats, a does not
    a_rows = [torch.cat(bs)[ids[torch.cat(bs)] == 0] for bs in epochs[:2]]
    assert len(a_rows[0].unique()) == 175  # the undersampled source: no image twice in an epoch,
    assert len(torch.cat(a_rows).unique()) == 300  # and the next epoch shows the images it left out
    b_rows = first[ids[first] == 1]
    assert torch.bincount(b_rows - 300, minlength=50).min() >= 3  # 175 draws of 50 images: all 3 or 4 times
    # a mixture's images carry their shares to the training loop's batch order
    images = MixedImages([torch.zeros(300, 1, 4, 4), torch.zeros(50, 1, 4, 4)], ["a", "b"], 1, shares)
    assert all(torch.equal(a, b) for a, b in zip(batch_order(images, 25, 0, 3), epochs[3]))


def test_pretrain_on_a_mixture_then_probe_each_source(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      gray_and_rgb: tuple[Path, Path]):
    gray, rgb = gray_and_rgb
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "pretrain", "--data", str(gray), "--data", str(rgb), "--batch-size", "32",
                             "--epochs", "0.5", "--precision", "fp32", "--set", "data.weights=[1, 1]",
                             "--output", str(run))
    assert code == 0, err
    assert out.splitlines()[0] == ("data: mixture of 2 (files), 28 px, 3 channels; train 128 images: gray 96 "
                                   "(share 50.0%, 1 channel read as 3), rgb 32 (share 50.0%)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert cfg["mixture"] == [str(gray), str(rgb)] and cfg["weights"] == [1.0, 1.0] and cfg["name"] == str(gray)
    meta = json.loads((run / "data.json").read_text())
    assert meta["channels"] == 3 and meta["n_images"] == 128 and json.loads((run / "encoder_step.json").read_text())["step"] == 2
    assert [(m["name"], m["n_images"], m["channels"], m["share"]) for m in meta["mixture"]] == [
        ("gray", 96, 1, 0.5), ("rgb", 32, 3, 0.5)]
    for source in (gray, rgb):
        result = api.probe(run, data=str(source), splits=("test",))
        assert result["data"] == source.stem and {r["protocol"] for r in result["summary"]} == {"knn", "linear"}
        assert Path(result["file"]) == run / f"probe-{source.stem}.json" and Path(result["file"]).is_file()
    eff = api.label_efficiency(run, fractions=(1.0,), seeds=(0,), protocols=("knn",), data=str(gray))
    assert (run / "label_efficiency-gray.json").is_file() and eff["summary"][0]["protocol"] == "knn"
    code, _, err = run_cli(capsys, "probe", str(run))
    assert code == 1 and "pretrained on a mixture" in one_error_line(err) and "--data" in err
    enc = api.load_encoder(run)  # the gray rule also holds for raw images given to the encoder
    assert enc.in_channels == 3 and enc.embed(np.zeros((2, 28, 28), np.uint8)).shape == (2, enc.out_dim)


def test_bad_mixtures_are_one_line_naming_the_key_or_source(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            gray_and_rgb: tuple[Path, Path]):
    gray, rgb = gray_and_rgb
    pair = ["pretrain", "--data", str(gray), "--data", str(rgb), "--output", str(tmp_path / "run")]
    for weights, expected in (("[1]", "data.weights: 1 weights for the 2 sources of data.mixture"),
                              ("[1, -1]", "data.weights: [1.0, -1.0] is out of range (must be > 0)"),
                              ("[1, 0]", "data.weights: [1.0, 0.0] is out of range (must be > 0)")):
        code, _, err = run_cli(capsys, *pair, "--set", f"data.weights={weights}")
        assert code == 1 and expected in one_error_line(err), err
    with pytest.raises(ConfigError, match="data.weights: needs data.mixture"):
        from_dict(PretrainConfig, {"data": {"weights": [1.0]}})
    with pytest.raises(ConfigError, match="data.mixture: gray.npz is named twice"):
        from_dict(DataConfig, {"mixture": ["gray.npz", "rgb.npz", "gray.npz"]}, "data")
    with pytest.raises(ConfigError, match="data.classes: selects classes of one data set"):
        from_dict(DataConfig, {"mixture": ["a", "b"], "classes": [0]}, "data")
    # a store of another size, named
    small = _store(tmp_path, 16, n=4)
    code, _, err = run_cli(capsys, "pretrain", "--data", str(gray), "--data", str(small), "--output", str(tmp_path / "r"))
    assert code == 1 and f"{small}: holds 16-px images, but the mixture runs at 28 px" in one_error_line(err)
    # volumes among images, named
    vol = tmp_path / "vol.npz"
    np.savez(vol, train_images=np.zeros((40, 8, 28, 28), np.uint8), train_labels=np.zeros((40, 1), np.int64))
    with pytest.raises(DataError, match=f"{vol}: has 3-D images, the mixture's first source {rgb} 2-D"):
        load_dataset(DataConfig(mixture=[str(rgb), str(vol)]))
    # channels that the gray -> RGB rule cannot join, named
    two = Dataset("two", None, (), {"train": ImageSet(torch.zeros(4, 2, 28, 28, dtype=torch.uint8))}, "two.tif")
    with pytest.raises(DataError, match="two.tif: has 2-channel images but the run takes 3 channels"):
        mix_datasets([load_dataset(DataConfig(name=str(rgb))), two])
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()  # nothing half-written


def test_view_defaults_apply_only_where_the_sources_agree():
    def ds(name: str) -> Dataset:
        return Dataset(name, None, (), {"train": ImageSet(torch.zeros(1, 3, 8, 8))})

    def mix(*names: str) -> Dataset:
        return Dataset("+".join(names), None, (), {}, parts=[ds(n) for n in names])

    both_free = api.resolve_views(ViewConfig(), mix("bloodmnist", "pathmnist"))
    assert (both_free.vflip, both_free.rot90) == (0.5, 0.5)  # every source orientation-free
    assert (both_free.color_jitter, both_free.grayscale) == (0.8, 0.2)  # only blood is colour-is-class
    with_xray = api.resolve_views(ViewConfig(), mix("bloodmnist", "pneumoniamnist"))
    assert (with_xray.vflip, with_xray.rot90, with_xray.color_jitter) == (0.0, 0.0, 0.8)
    assert api.resolve_views(ViewConfig(), mix("bloodmnist", "bloodmnist")).color_jitter == 0.0
    assert api.resolve_views(ViewConfig(vflip=0.3), mix("bloodmnist", "pneumoniamnist")).vflip == 0.3  # given: kept
    assert api.resolve_views(ViewConfig(), ds("bloodmnist")).color_jitter == 0.0  # one data set: as before


def test_an_old_single_source_config_loads_unchanged(tmp_path: Path):
    from medlatent.methods.saved import read_config

    old = {"data": {"name": "pneumoniamnist", "size": 28, "data_dir": None, "workers": 2, "split": "train",
                    "classes": None, "spatial_dims": 2, "normalize": "percentile", "window_center": 40.0,
                    "window_width": 400.0},
           "backbone": {"name": "resnet18-quarter", "stem": "cifar"}, "method": "simclr"}
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    run.config_file.write_text(yaml.safe_dump(old))
    cfg = read_config(run)
    assert cfg.data.name == "pneumoniamnist" and cfg.data.mixture == [] and cfg.data.weights is None
    assert {k: getattr(cfg.data, k) for k in old["data"]} == old["data"]
    assert api.default_output(cfg).name.startswith("pneumoniamnist-simclr-")
