"""The command line: every bad input is one 'error:' line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


from medlatent.config import PretrainConfig
from medlatent.train.runs import RunDir

from conftest import run_cli, write_stripes_npz




def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_help_is_fast():
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medlatent.cli.main", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - t < 1.5  # the process start included; the CLI itself imports no torch
    code = "import sys, medlatent.cli.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_wrong_md5(capsys, tmp_path: Path, real_data_dir: Path):
    data = bytearray((real_data_dir / "breastmnist.npz").read_bytes())
    data[5000] ^= 0x01
    (tmp_path / "breastmnist.npz").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "pretrain", "--data", "breastmnist", "--data-dir", str(tmp_path),
                           "--output", str(tmp_path / "run"))
    assert code == 1 and "md5 is" in one_error_line(err)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_truncated_npz(capsys, tmp_path: Path):
    good = write_stripes_npz(tmp_path / "s.npz", 64, 8, 8)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:3000])
    code, _, err = run_cli(capsys, "pretrain", "--data", str(bad), "--output", str(tmp_path / "run"))
    assert code == 1 and "truncated or corrupt" in one_error_line(err)


def test_unreadable_image_and_empty_folder(capsys, tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    code, _, err = run_cli(capsys, "pretrain", "--data", str(folder), "--output", str(tmp_path / "r1"))
    assert code == 1 and "no images found" in one_error_line(err)
    (folder / "scan.png").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "pretrain", "--data", str(folder), "--output", str(tmp_path / "r2"))
    assert code == 1 and "scan.png: cannot read as an image" in one_error_line(err)


def test_probe_without_checkpoint(capsys, tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.write_config(PretrainConfig())
    code, _, err = run_cli(capsys, "probe", str(run.path))
    assert code == 1 and "has no checkpoint yet" in one_error_line(err)
    code, _, err = run_cli(capsys, "probe", str(tmp_path / "nothing"))
    assert code == 1 and "not a run folder" in one_error_line(err)


def test_unknown_config_keys(capsys, tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 0.1\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(cfg))
    assert code == 1 and "optim.lrr is not a known key" in one_error_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--set", "method_options.temprature=0.1",
                           "--data", str(write_stripes_npz(tmp_path / "s.npz", 64, 8, 8)))
    assert code == 1 and "method_options.temprature is not a known key" in one_error_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--set", "train.epochs=many")
    assert code == 1 and "train.epochs: expected a number, got 'many'" in one_error_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--set", "train.batch_size=1.5")
    assert code == 1 and "train.batch_size: expected an integer, got 1.5" in one_error_line(err)
    cfg.write_text("train: [1, 2\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(cfg))
    assert code == 1 and "not valid YAML" in one_error_line(err)


def test_channel_mismatch_and_existing_run(capsys, tmp_path: Path, real_data_dir: Path):
    data = write_stripes_npz(tmp_path / "s.npz", 64, 16, 16)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "pretrain", "--data", str(data), "--epochs", "1.5", "--batch-size", "32",
                             "--output", str(run))
    assert code == 0, err
    assert json.loads((run / "encoder_step.json").read_text())["step"] == 3  # 1.5 epochs of 2 steps
    code, _, err = run_cli(capsys, "probe", str(run), "--data", "bloodmnist", "--data-dir", str(real_data_dir))
    assert code == 1 and "takes 1-channel images but" in one_error_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--data", str(data), "--output", str(run))
    assert code == 1 and "already holds a run" in one_error_line(err)
    code, out, err = run_cli(capsys, "embed", str(run), "--split", "val")
    assert code == 0 and "embeddings-val.npz" in out


def test_data_list_and_download_from_local(capsys, real_data_dir: Path):
    code, out, _ = run_cli(capsys, "data", "list", "--data-dir", str(real_data_dir))
    assert code == 0 and "bloodmnist" in out and "organmnist3d" in out and "CC BY-NC 4.0" in out
    code, out, _ = run_cli(capsys, "data", "download", "bloodmnist", "--data-dir", str(real_data_dir))
    assert code == 0 and "md5 ok" in out
