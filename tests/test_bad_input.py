"""A table of bad inputs (files, folders, configs, flags, run folders), each through the real
entry point: exit code 1, exactly one ``error:`` line on stderr naming the file or key, no
traceback, and nothing left that blocks the corrected re-run (no run folder is created)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from medlatent.train.runs import RunDir

from conftest import invoke, run_cli, write_stripes_npz




def npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def png(path: Path, size: int = 32, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


@dataclass
class Inputs:
    """Bad (and a few good) files and folders, written once for the whole table."""

    root: Path
    good: str  # a valid .npz
    run: Path  # a trained run (one checkpoint)

    def f(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("bad")
    good = str(write_stripes_npz(root / "good.npz", 64, 16, 16))
    x = np.zeros((8, 28, 28), np.uint8)
    y = np.zeros((8, 1), np.int64)
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    npz(root / "float300.npz", train_images=np.full((8, 28, 28), 300.0, np.float32))
    npz(root / "neglabels.npz", train_images=x, train_labels=-np.ones((8, 1), np.int64))
    npz(root / "fraclabels.npz", train_images=x, train_labels=np.full((8, 1), 0.5))
    npz(root / "fewlabels.npz", train_images=x, train_labels=y[:5])
    npz(root / "flat.npz", train_images=np.zeros((8, 28), np.uint8))
    npz(root / "nokeys.npz", pictures=x)
    npz(root / "emptytrain.npz", train_images=np.zeros((0, 28, 28), np.uint8), val_images=x)
    npz(root / "px32.npz", train_images=np.zeros((8, 32, 32), np.uint8))
    (root / "emptyfolder").mkdir()
    png(root / "mixed" / "stray.png")
    png(root / "mixed" / "benign" / "a.png")
    png(root / "badpng" / "a.png")
    (root / "badpng" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    png(root / "oneimage" / "a.png")
    png(root / "twoimages" / "a.png", 64, 10)
    png(root / "twoimages" / "b.png", 64, 200)
    png(root / "emptyval" / "train" / "a" / "x.png")
    (root / "emptyval" / "val").mkdir()
    (root / "broken.yaml").write_text("train: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unknown.yaml").write_text("optim:\n  lrr: 0.1\n")
    (root / "afile").write_text("not a folder\n")
    run = root / "run"
    code = invoke("pretrain", "--data", good, "--epochs", "1", "--batch-size", "32", "--output", str(run))
    assert code == 0
    nockpt = RunDir(root / "nockpt")
    nockpt.write_config(RunDir(run).read_config())
    damaged = root / "damaged"
    damaged.mkdir()
    for name in ("config.yaml", "data.json"):
        (damaged / name).write_bytes((run / name).read_bytes())
    (damaged / "checkpoints" / "step-00000002").mkdir(parents=True)
    (damaged / "checkpoints" / "step-00000002" / "state.json").write_text('{"step": 2}')
    (damaged / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"\x08\x00garbage")
    return Inputs(root, good, run)




@dataclass
class Case:
    name: str
    args: Callable[[Inputs, str], list[str]]  # (inputs, --output folder) -> argv after "medlatent"
    names: Callable[[Inputs], str]  # what the error line must contain (the file or key)


def pre(*extra: str) -> Callable[[Inputs, str], list[str]]:
    """``pretrain --data <good .npz> ... --output OUT`` with ``extra`` flags (``{x}`` = inputs.x)."""
    return lambda i, out: ["pretrain", "--data", i.good, *[e.format(i=i) for e in extra], "--output", out]


def on(data: str, *extra: str) -> Callable[[Inputs, str], list[str]]:
    """``pretrain --data <inputs.data> ... --output OUT``."""
    return lambda i, out: ["pretrain", "--data", i.f(data), *extra, "--output", out]


CASES = [
    # --- files
    Case("missing npz", lambda i, o: ["pretrain", "--data", i.root.as_posix() + "/nope.npz", "--output", o],
         lambda i: "nope.npz"),
    Case("corrupt npz", on("corrupt.npz"), lambda i: "corrupt.npz"),
    Case("float pixels outside [0, 1]", on("float300.npz"), lambda i: "train_images"),
    Case("negative labels", on("neglabels.npz"), lambda i: "train_labels"),
    Case("fractional labels", on("fraclabels.npz"), lambda i: "train_labels"),
    Case("fewer labels than images", on("fewlabels.npz"), lambda i: "train_labels"),
    Case("images without a spatial axis", on("flat.npz"), lambda i: "train_images"),
    Case("npz without image arrays", on("nokeys.npz"), lambda i: "nokeys.npz"),
    Case("empty train split", on("emptytrain.npz"), lambda i: "emptytrain.npz"),
    Case("npz size differs from --size", on("px32.npz"), lambda i: "px32.npz"),
    Case("unknown data name", lambda i, o: ["pretrain", "--data", "nosuchmnist", "--output", o],
         lambda i: "nosuchmnist"),
    # --- folders
    Case("empty folder", on("emptyfolder"), lambda i: "emptyfolder"),
    Case("stray image beside class folders", on("mixed"), lambda i: "stray.png"),
    Case("unreadable image", on("badpng", "--batch-size", "2"), lambda i: "b.png"),
    Case("one image", on("oneimage"), lambda i: "batch_size"),
    Case("empty split folder", on("emptyval"), lambda i: "emptyval/val"),
    Case("does not fit in memory", on("twoimages", "--batch-size", "2", "--size", "4000", "--set", "backbone.stem=cifar"),
         lambda i: "GiB"),
    # --- configs
    Case("missing config file", lambda i, o: ["pretrain", "--config", i.f("missing.yaml"), "--output", o],
         lambda i: "missing.yaml"),
    Case("malformed config file", lambda i, o: ["pretrain", "--config", i.f("broken.yaml"), "--output", o],
         lambda i: "broken.yaml"),
    Case("config is a list", lambda i, o: ["pretrain", "--config", i.f("list.yaml"), "--output", o],
         lambda i: "list.yaml"),
    Case("unknown config key", lambda i, o: ["pretrain", "--config", i.f("unknown.yaml"), "--output", o],
         lambda i: "optim.lrr"),
    Case("--set of the wrong type", pre("--set", "train.epochs=many"), lambda i: "train.epochs"),
    Case("--set value not YAML", pre("--set", "train.epochs=[1,"), lambda i: "train.epochs"),
    Case("--set without =", pre("--set", "train.epochs"), lambda i: "train.epochs"),
    Case("--set unknown key", pre("--set", "method_options.temprature=0.1"), lambda i: "temprature"),
    Case("negative lr", pre("--set", "optim.lr=-1"), lambda i: "optim.lr"),
    Case("log_every 0", pre("--set", "train.log_every=0"), lambda i: "train.log_every"),
    Case("temperature 0", pre("--set", "method_options.temperature=0"), lambda i: "method_options.temperature"),
    Case("epochs nan", pre("--set", "train.epochs=.nan"), lambda i: "train.epochs"),
    Case("epochs inf", pre("--set", "train.epochs=.inf"), lambda i: "train.epochs"),
    Case("crop scale reversed", pre("--set", "views.crop_scale=[0.9,0.1]"), lambda i: "views.crop_scale"),
    Case("probability above 1", pre("--set", "views.hflip=1.5"), lambda i: "views.hflip"),
    # --- flags
    Case("--epochs 0", pre("--epochs", "0"), lambda i: "--epochs"),
    Case("--epochs negative", pre("--epochs", "-1"), lambda i: "--epochs"),
    Case("--batch-size 0", pre("--batch-size", "0"), lambda i: "--batch-size"),
    Case("--batch-size above the split", pre("--batch-size", "1000"), lambda i: "batch_size"),
    Case("--size 0", pre("--size", "0"), lambda i: "--size"),
    Case("--size not a number", pre("--size", "abc"), lambda i: "--size"),
    Case("--lr negative", pre("--lr", "-0.1"), lambda i: "--lr"),
    Case("unknown method", pre("--method", "nosuch"), lambda i: "nosuch"),
    Case("unknown backbone", pre("--backbone", "nosuch"), lambda i: "nosuch"),
    Case("MAE on a ResNet", pre("--method", "mae"), lambda i: "ViT"),
    Case("--output is a file", lambda i, o: ["pretrain", "--data", i.good, "--output", i.f("afile")],
         lambda i: "afile"),
    Case("probe --label-fraction 0", lambda i, o: ["probe", str(i.run), "--label-fraction", "0"],
         lambda i: "--label-fraction"),
    Case("probe --k 0", lambda i, o: ["probe", str(i.run), "--k", "0"], lambda i: "--k"),
    Case("unknown generative model", lambda i, o: ["generate", "train", "--method", "nosuch", "--output", o],
         lambda i: "nosuch"),
    Case("bad threshold rule", lambda i, o: ["anomaly", "score", str(i.run), "--threshold", "mean+xstd"],
         lambda i: "--threshold"),
    # --- run folders
    Case("resume a folder that is no run", lambda i, o: ["pretrain", "--resume", o], lambda i: "no config.yaml"),
    Case("resume with a flag that changes the run", lambda i, o: ["pretrain", "--resume", str(i.run), "--lr", "0.1"],
         lambda i: "--lr"),
    Case("resume with --set", lambda i, o: ["pretrain", "--resume", str(i.run), "--set", "train.seed=3"],
         lambda i: "--set"),
    Case("output holds a run", lambda i, o: ["pretrain", "--data", i.good, "--output", str(i.run)],
         lambda i: str(i.run)),
    Case("probe a folder that is no run", lambda i, o: ["probe", o], lambda i: "not a run folder"),
    Case("probe a run without checkpoint", lambda i, o: ["probe", i.f("nockpt")], lambda i: "nockpt"),
    Case("probe a run whose checkpoints are all damaged", lambda i, o: ["probe", i.f("damaged")],
         lambda i: "damaged"),
    Case("embed a split that does not exist", lambda i, o: ["embed", str(i.run), "--split", "nosuch"],
         lambda i: "nosuch"),
]


def test_the_table_is_long_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, inputs: Inputs, capsys: pytest.CaptureFixture, tmp_path: Path):
    out = tmp_path / "out"
    run_before = sorted(p.name for p in (inputs.run / "checkpoints").iterdir())
    code, _, err = run_cli(capsys, *case.args(inputs, str(out)))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert case.names(inputs) in lines[0], lines[0]
    assert not out.exists(), f"{case.name}: left {sorted(p.name for p in out.rglob('*'))}"
    assert sorted(p.name for p in (inputs.run / "checkpoints").iterdir()) == run_before
    assert RunDir(inputs.run).read_config() is not None


def test_a_refused_output_can_be_reused(inputs: Inputs, capsys: pytest.CaptureFixture, tmp_path: Path):
    """A run refused (batch larger than the split) and one that failed before its first
    checkpoint (training diverged at once) leave the folder free for the corrected run."""
    out = str(tmp_path / "run")
    code, _, err = run_cli(capsys, "pretrain", "--data", inputs.good, "--batch-size", "1000", "--output", out)
    assert code == 1 and "batch_size" in err
    code, _, err = run_cli(capsys, "pretrain", "--data", inputs.good, "--set", "optim.lr=1e30",
                           "--epochs", "1", "--batch-size", "32", "--output", out)
    assert code == 1 and "loss became" in err, err
    assert not Path(out).exists()
    code, _, err = run_cli(capsys, "pretrain", "--data", inputs.good, "--epochs", "1", "--batch-size", "32",
                           "--output", out)
    assert code == 0, err
    assert RunDir(Path(out)).has_checkpoint()
