"""Fine-tuning, label efficiency, maps, retrieval, the HTML report in a real browser, compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medlatent import api
from medlatent.config import PretrainConfig
from medlatent.data.medmnist import load_npz
from medlatent.eval.finetune import Classifier, FinetuneConfig, finetune, layer_index, param_groups
from medlatent.eval.retrieval import nearest, precision_at_k
from medlatent.eval.session import crossover
from medlatent.nets.backbones import build_encoder

from conftest import REPO, write_stripes_npz
from test_cli import one_error_line, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from check_report import check, find_chromium  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("suite")
    cfg = PretrainConfig()
    cfg.data.name = str(write_stripes_npz(tmp / "s.npz", n_train=256, n_val=64, n_test=64))
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision, cfg.train.map_every = 2, 32, "fp32", 1
    return api.pretrain(cfg, output=tmp / "run")


def test_maps_are_drawn_during_pretraining(tiny_run: Path):
    maps = sorted(p.name for p in (tiny_run / "maps").iterdir())
    assert maps == ["epoch-0000.png", "epoch-0001.png", "epoch-0002.png"]  # before training, then each epoch


def test_finetuning_from_scratch_beats_chance(tmp_path: Path):
    ds = load_npz(write_stripes_npz(tmp_path / "s.npz", n_train=128, n_val=64, n_test=8))
    enc = build_encoder("resnet18-quarter", 1, 28)
    model, val, steps = finetune(enc, ds.split("train"), ds.split("val"), ds.task, 2, [0.5], [0.25], "stripes",
                                 FinetuneConfig(epochs=5, min_steps=40, batch_size=32, eval_every=10),
                                 torch.device("cpu"), seed=0, encoder_lr_scale=1.0)
    assert val["acc"] > 0.75 and 40 <= steps  # two balanced classes: chance is 0.5
    assert not any(p.grad is None for p in model.head.parameters())


def test_layer_wise_decay_groups():
    model = Classifier(build_encoder("resnet18-quarter", 1, 28), 3)
    assert layer_index("encoder.conv1.weight", 4) == 0 and layer_index("encoder.layer3.0.conv1.weight", 4) == 3
    assert layer_index("head.weight", 4) == 5
    groups = param_groups(model, FinetuneConfig(layer_decay=0.5), 0.1)
    scales = sorted({g["lr_scale"] for g in groups})
    assert max(scales) == 1.0  # the head
    assert pytest.approx(min(scales)) == 0.1 * 0.5**5  # the stem: 0.1 * decay^(n + 1)


def test_retrieval_precision_matches_a_naive_count():
    g = torch.Generator().manual_seed(0)
    gal, gal_y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40, 1), generator=g)
    q, q_y = torch.randn(5, 8, generator=g), torch.randint(0, 3, (5, 1), generator=g)
    nb, sim = nearest(q, gal, 4)
    naive = 0.0
    for i in range(5):
        order = torch.nn.functional.cosine_similarity(q[i:i + 1], gal).argsort(descending=True)[:4]
        assert torch.equal(order, nb[i])
        naive += float((gal_y[order, 0] == q_y[i, 0]).float().mean()) / 5
    assert precision_at_k(q_y, gal_y, nb) == pytest.approx(naive)


def test_crossover_reports_where_each_protocol_wins_and_loses():
    s = [dict(protocol=p, split="test", fraction=f, acc=a) for p, f, a in [
        ("supervised", 0.01, 0.5), ("supervised", 0.1, 0.7), ("supervised", 1.0, 0.9),
        ("linear", 0.01, 0.6), ("linear", 0.1, 0.75), ("linear", 1.0, 0.85), ("finetune", 0.01, 0.4)]]
    c = crossover(s)
    assert [w["fraction"] for w in c["linear"]["wins"]] == [0.01, 0.1]
    assert [w["fraction"] for w in c["linear"]["losses"]] == [1.0]
    assert c["linear"]["losses"][0]["margin_points"] == pytest.approx(-5.0)
    assert c["finetune"]["wins"] == [] and c["finetune"]["losses"][0]["margin_points"] == pytest.approx(-10.0)


def test_label_efficiency_end_to_end(capsys, tiny_run: Path):
    code, out, err = run_cli(capsys, "efficiency", str(tiny_run), "--label-fraction", "0.1", "--label-fraction", "1",
                             "--seeds", "2", "--epochs", "1", "--min-steps", "20",
                             "--no-lr-search")  # the protocol before the search; the search is tested apart
    assert code == 0, err
    result = json.loads((tiny_run / "label_efficiency.json").read_text())
    protocols = {r["protocol"] for r in result["summary"]}
    assert protocols == {"knn", "linear", "finetune", "supervised"}
    ten = [r for r in result["summary"] if r["fraction"] == 0.1]
    assert all(r["n_seeds"] == 2 and r["n_labels"] == 26 for r in ten)  # ceil(10 %) of each class, ~128 + ~128
    assert (tiny_run / "label_efficiency.png").is_file() and "vs training from scratch" in out
    code, _, err = run_cli(capsys, "efficiency", str(tiny_run), "--protocol", "magic")
    assert code == 1 and "unknown protocol" in one_error_line(err)


def test_report_opens_in_a_real_browser(capsys, tiny_run: Path, tmp_path: Path):
    code, out, err = run_cli(capsys, "report", str(tiny_run))
    assert code == 0, err
    page = tiny_run / "report.html"
    text = page.read_text()
    for section in ("Frozen-encoder probes", "Embedding map", "Retrieval", "Confusion matrix", "Configuration"):
        assert section in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    for name in ("probe.json", "retrieval.json", "embedding_map_test.png", "training_curves.png"):
        assert (tiny_run / name).is_file()
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the page was written")
    ok, line = check(page, tmp_path / "shot.png")
    assert ok, line
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    ok, line = check(broken)
    assert not ok and "images loaded" in line  # the check can fail


def test_compare_and_map(capsys, tiny_run: Path, tmp_path: Path):
    code, out, err = run_cli(capsys, "compare", str(tiny_run), str(tiny_run), "--html", str(tmp_path / "c.html"))
    assert code == 0 and out.count("| run | method |") == 1 and out.count("| simclr |") == 2, err
    code, out, err = run_cli(capsys, "map", str(tiny_run), "--split", "val", "--out", str(tmp_path / "m.png"))
    assert code == 0 and (tmp_path / "m.png").is_file(), err


@pytest.mark.parametrize("task", ["multi-class", "binary-class"])
def test_confusion_matrix_counts_pairs(task: str):
    from medlatent.eval.metrics import confusion

    rng = np.random.default_rng(0)
    k = 2 if task == "binary-class" else 4
    y = rng.integers(0, k, size=(50, 1))
    scores = rng.dirichlet(np.ones(k), size=50)
    pred = (scores[:, -1] > 0.5).astype(int) if k == 2 else scores.argmax(-1)
    naive = np.zeros((k, k), dtype=int)
    for t, p in zip(y[:, 0], pred):
        naive[t, p] += 1
    assert np.array_equal(confusion(y, scores, task, k), naive)
    assert confusion(y, scores, "multi-label, binary-class", k) is None


def test_a_run_without_checkpoints_is_evaluated_from_its_exported_encoder(tiny_run: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "pruned"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "checkpoints")
    a, _, step_a = api.load_encoder(tiny_run)
    b, _, step_b = api.load_encoder(copy)
    assert step_a == step_b == 16 and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                              b.state_dict().values()))
    (copy / "encoder.safetensors").unlink()
    with pytest.raises(Exception, match="no checkpoint yet"):
        api.load_encoder(copy)
