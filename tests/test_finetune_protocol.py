"""The trained label-efficiency protocols: the learning rate chosen on val, LP-FT, FixMatch."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from medlatent import api
from medlatent.config import PretrainConfig, from_dict
from medlatent.data.medmnist import load_npz
from medlatent.errors import ConfigError
from medlatent.eval.features import extract_features
from medlatent.eval.finetune import (Candidate, Classifier, FinetuneConfig, best_candidate, candidates, finetune,
                                     fit_on_val, patience_evals, probe_head, search_budget, tune)
from medlatent.eval.linear import linear_probe
from medlatent.eval.semi import SemiConfig, fixmatch, unlabelled_rows
from medlatent.eval.session import check_settings
from medlatent.losses.fixmatch import FixMatchLoss
from medlatent.nets.backbones import build_encoder

from conftest import run_cli, write_stripes_npz
from test_cli import one_error_line

CPU = torch.device("cpu")
TINY = dict(epochs=1, batch_size=32, eval_every=4, patience=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only waits on the first
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory: pytest.TempPathFactory):
    return load_npz(write_stripes_npz(tmp_path_factory.mktemp("fp") / "s.npz", n_train=96, n_val=48, n_test=8))


def run_finetune(ds, cfg: FinetuneConfig, scale: float, on_metrics=None, head=None, seed: int = 0):
    torch.manual_seed(0)
    enc = build_encoder("resnet18-quarter", 1, 28)
    return finetune(enc, ds.split("train"), ds.split("val"), ds.task, 2, [0.5], [0.25], "stripes", cfg, CPU, seed,
                    encoder_lr_scale=scale, on_metrics=on_metrics, head=head)


# --------------------------------------------------------------------------- the learning-rate grid


def test_the_grid_and_its_budget():
    cfg = FinetuneConfig()
    grid = candidates(cfg, 0.1)
    assert [(c.lr, c.encoder_lr_scale) for c in grid] == [(1e-4, 0.1), (1e-4, 1.0), (3e-4, 0.1), (3e-4, 1.0),
                                                          (1e-3, 0.1), (1e-3, 1.0)]
    # None: the single value of today's protocol (the scale a fresh encoder gets is the caller's)
    assert candidates(dataclasses.replace(cfg, lr_grid=None, encoder_lr_scale_grid=None), 1.0) == [Candidate(1e-3, 1.0)]
    short = search_budget(cfg)
    assert (short.epochs, short.min_steps) == (8, 75)  # a quarter of 30 epochs / 300 steps, rounded up
    assert search_budget(dataclasses.replace(cfg, epochs=1, min_steps=0)).epochs == 1


def stop_step(total: int, cfg: FinetuneConfig) -> int:
    """Steps ``fit_on_val`` takes when val ACC peaks at the first validation and never improves."""
    model = nn.Linear(1, 1)
    opt = torch.optim.AdamW([dict(params=model.parameters(), lr_scale=1.0)], lr=1e-3)
    scores = iter([0.9] + [0.5] * total)

    def score_val() -> dict[str, float]:
        return dict(acc=next(scores), auc=0.5)

    _, steps = fit_on_val(model, opt, lambda step: (model(torch.ones(1, 1)).sum(), {}), total, 1e-3,
                          cfg.eval_every, patience_evals(cfg, total), score_val, "test")
    return steps


def test_early_stopping_waits_a_quarter_of_a_long_run():
    cfg = FinetuneConfig()  # eval_every 50, patience 6, patience_fraction 0.25
    # up to 1200 steps: 6 validations without a better val ACC (300 steps after the best, step 50)
    assert [patience_evals(cfg, t) for t in (300, 690, 1080, 1200)] == [6, 6, 6, 6]
    assert stop_step(1200, cfg) == 50 + 6 * 50
    # a long run waits a quarter of its length: 2790 steps (BloodMNIST, every label) -> 14 validations
    assert patience_evals(cfg, 2790) == 14
    assert stop_step(2790, cfg) == 50 + 14 * 50
    # patience_fraction 0: the fixed patience alone, however long the run
    assert stop_step(2790, dataclasses.replace(cfg, patience_fraction=0.0)) == 50 + 6 * 50


def test_best_candidate_is_the_best_val_acc_and_ties_go_to_the_lower_lr():
    a, b, c = Candidate(1e-3, 1.0), Candidate(1e-4, 0.1), Candidate(3e-4, 0.1)
    assert best_candidate([(a, dict(acc=0.7, auc=0.5)), (b, dict(acc=0.8, auc=0.5)), (c, dict(acc=0.75, auc=0.9))]) == 1
    assert best_candidate([(a, dict(acc=0.8, auc=0.5)), (c, dict(acc=0.8, auc=0.5))]) == 1  # tie: lower lr
    assert best_candidate([(a, dict(acc=0.8, auc=0.6)), (c, dict(acc=0.8, auc=0.5))]) == 0  # AUC breaks an ACC tie
    assert best_candidate([(a, dict(acc=0.8, auc=float("nan"))), (c, dict(acc=0.8, auc=float("nan")))]) == 1


def test_tune_trains_each_candidate_short_then_the_winner_in_full():
    calls: list[tuple[float, float, int, int]] = []
    val_acc = {(1e-3, 1.0): 0.6, (1e-3, 0.1): 0.9, (1e-4, 1.0): 0.9, (1e-4, 0.1): 0.5}  # a tie: 1e-4 wins it

    def train(c: FinetuneConfig, scale: float, report):
        calls.append((c.lr, scale, c.epochs, c.min_steps))
        if report is not None:
            report(dict(step=1, lr=c.lr))
        return nn.Linear(1, 1), dict(acc=val_acc[(c.lr, scale)], auc=0.5), c.min_steps

    cfg = FinetuneConfig(epochs=8, min_steps=40, lr_grid=(1e-3, 1e-4), encoder_lr_scale_grid=(1.0, 0.1))
    seen: list[dict] = []
    tuned = tune(train, cfg, 0.1, seen.append)
    assert tuned.chosen == Candidate(1e-4, 1.0) and tuned.steps == 40 and tuned.val["acc"] == 0.9
    assert calls[:4] == [(1e-4, 0.1, 2, 10), (1e-4, 1.0, 2, 10), (1e-3, 0.1, 2, 10), (1e-3, 1.0, 2, 10)]
    assert calls[4:] == [(1e-4, 1.0, 8, 40)]  # the winner, full budget
    assert seen == [dict(step=1, lr=1e-4)]  # only the final training reports
    assert [s["val_acc"] for s in tuned.search] == [0.5, 0.9, 0.9, 0.6]
    calls.clear()
    kept = tune(train, dataclasses.replace(cfg, search_fraction=1.0), 0.1)
    assert len(calls) == 4 and kept.chosen == Candidate(1e-4, 1.0) and kept.steps == 40  # kept as trained


def test_the_grid_finds_the_learning_rate_that_learns(stripes):
    cfg = FinetuneConfig(**dict(TINY, patience=10), min_steps=24, lr_grid=(1e-7, 3e-3), encoder_lr_scale_grid=(1.0,),
                         search_fraction=0.5)

    def train(c: FinetuneConfig, scale: float, report):
        return run_finetune(stripes, c, scale, report)

    tuned = tune(train, cfg, 1.0)
    by_lr = {s["lr"]: s["val_acc"] for s in tuned.search}
    assert tuned.chosen.lr == 3e-3 and by_lr[3e-3] > by_lr[1e-7] + 0.1, by_lr
    assert tuned.steps == 24 and all(s["steps"] == 12 for s in tuned.search)


def test_a_one_value_grid_is_todays_finetune_exactly(stripes):
    cfg = FinetuneConfig(**TINY, min_steps=6)
    old_model, old_val, old_steps = run_finetune(stripes, cfg, 0.1)  # today's protocol: lr 1e-3, encoder 0.1x
    records: list[dict] = []
    one = dataclasses.replace(cfg, lr_grid=(1e-3,), encoder_lr_scale_grid=(0.1,))
    tuned = tune(lambda c, s, r: run_finetune(stripes, c, s, r), one, 0.1, records.append)
    assert tuned.search == [] and tuned.steps == old_steps and tuned.val == old_val
    new, old = tuned.model.state_dict(), old_model.state_dict()
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    assert [r["step"] for r in records] == [4, 6] and set(records[0]) == {"step", "loss", "lr", "val_acc", "val_auc",
                                                                           "val_balanced_acc"}


def test_finetune_config_ranges_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"finetune.lr_grid: \(0.1, -1.0\) is out of range"):
        check_settings(("finetune",), FinetuneConfig(lr_grid=(0.1, -1.0)))
    with pytest.raises(ConfigError, match="finetune.encoder_lr_scale_grid: an empty grid"):
        check_settings(("finetune",), FinetuneConfig(encoder_lr_scale_grid=()))
    with pytest.raises(ConfigError, match="finetune.patience_fraction: 1.5 is out of range"):
        check_settings(("finetune",), FinetuneConfig(patience_fraction=1.5))
    with pytest.raises(ConfigError, match="finetune.search_fraction: 0.0 is out of range"):
        check_settings(("finetune",), FinetuneConfig(search_fraction=0.0))
    with pytest.raises(ConfigError, match="finetune.lr_gird is not a known key"):
        from_dict(FinetuneConfig, dict(lr_gird=[1e-3]), "finetune")
    assert from_dict(FinetuneConfig, dict(lr_grid=[1e-3], encoder_lr_scale_grid=None), "finetune").lr_grid == (1e-3,)


# --------------------------------------------------------------------------- LP-FT


@pytest.mark.parametrize("feature_norm", [False, True])
def test_lpft_fine_tunes_from_the_linear_probes_head(stripes, feature_norm: bool):
    torch.manual_seed(0)
    enc = build_encoder("resnet18-quarter", 1, 28)
    train, val = stripes.split("train"), stripes.split("val")
    fx = extract_features(enc, train.images, [0.5], [0.25], CPU)
    probe = linear_probe(fx, train.labels[:, 0], extract_features(enc, val.images, [0.5], [0.25], CPU),
                         val.labels[:, 0], stripes.task, 2)
    head = probe_head(probe, feature_norm)
    start = Classifier(enc, 2, feature_norm, head).eval()
    assert torch.allclose(start.head(fx), probe.logits(fx), atol=1e-4)  # phase 2 starts at the probe
    # one step at a vanishing learning rate: the trained head is still the probe's
    cfg = FinetuneConfig(**TINY, min_steps=1, lr=1e-12, feature_norm=feature_norm)
    model, _, steps = run_finetune(stripes, cfg, 1.0, head=head)
    assert steps == 3
    for k, v in head.items():
        if k.endswith(("weight", "bias")):  # the BatchNorm's running statistics move with the batches, as they should
            assert torch.allclose(model.head.state_dict()[k], v, atol=1e-6), k


# --------------------------------------------------------------------------- FixMatch


def naive_fixmatch(weak: torch.Tensor, strong: torch.Tensor, tau: float) -> torch.Tensor:
    total = torch.zeros(())
    for w, s in zip(weak, strong):
        q = torch.softmax(w, 0)
        if q.max() >= tau:
            total = total - torch.log_softmax(s, 0)[q.argmax()]
    return total / len(weak)  # the mean over every unlabelled image, as the paper's 1 / (mu B)


def test_fixmatch_loss_matches_a_written_out_loop():
    g = torch.Generator().manual_seed(0)
    weak = torch.randn(12, 5, generator=g) * torch.tensor([8.0] * 6 + [0.5] * 6)[:, None]  # half confident
    strong = torch.randn(12, 5, generator=g)
    loss, mask = FixMatchLoss(0.95)(weak, strong)
    assert 0 < mask.sum() < 12
    assert torch.allclose(loss, naive_fixmatch(weak, strong, 0.95), atol=1e-6)
    assert torch.equal(mask, (torch.softmax(weak, 1).max(1).values >= 0.95).float())


def test_fixmatch_loss_is_zero_when_nothing_is_confident_and_pseudo_labels_carry_no_gradient():
    strong = torch.randn(6, 3, requires_grad=True)
    weak = torch.zeros(6, 3, requires_grad=True)  # uniform: max probability 1/3
    loss, mask = FixMatchLoss(0.95)(weak, strong)
    loss.backward()
    assert float(loss.detach()) == 0.0 and mask.sum() == 0 and torch.equal(strong.grad, torch.zeros(6, 3))
    weak = (torch.randn(6, 3) * 10).requires_grad_()
    strong = torch.randn(6, 3, requires_grad=True)
    FixMatchLoss(0.5)(weak, strong)[0].backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0  # the target is fixed; only the strong view learns
    with pytest.raises(ValueError, match="tau"):
        FixMatchLoss(1.5)


def test_fixmatch_trains_and_never_reads_the_unlabelled_labels(stripes):
    train = stripes.split("train")
    labelled = torch.arange(0, 96, 6)  # 16 labels, 80 unlabelled
    assert torch.equal(unlabelled_rows(96, labelled), torch.tensor([i for i in range(96) if i % 6]))
    assert torch.equal(unlabelled_rows(4, torch.arange(4)), torch.arange(4))  # 100 %: all of them, labels dropped
    cfg, semi = FinetuneConfig(**dict(TINY, eval_every=1), min_steps=2), SemiConfig(tau=0.5, mu=2)

    def run(images_labels):
        torch.manual_seed(0)
        records: list[dict] = []
        model, val, steps = fixmatch(build_encoder("resnet18-quarter", 1, 28), images_labels, labelled,
                                     stripes.split("val"), stripes.task, 2, [0.5], [0.25], "stripes", cfg, semi, CPU,
                                     seed=0, encoder_lr_scale=1.0, on_metrics=records.append)
        return model, records

    model, records = run(train)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss_u"]) for r in records)
    assert all(0 <= r["mask_rate"] <= 1 and r["loss"] == pytest.approx(r["loss_x"] + r["loss_u"], rel=1e-5)
               for r in records)
    scrambled = train.labels.clone()
    scrambled[unlabelled_rows(96, labelled)] = 1 - scrambled[unlabelled_rows(96, labelled)]
    other, _ = run(dataclasses.replace(train, labels=scrambled))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_semi_settings_are_checked():
    with pytest.raises(ConfigError, match=r"semi.tau: 1.5 is out of range \(must be > 0 and <= 1\)"):
        check_settings(("semi",), FinetuneConfig(), SemiConfig(tau=1.5))
    with pytest.raises(ConfigError, match="semi.mu: 0 is out of range"):
        check_settings(("semi",), FinetuneConfig(), SemiConfig(mu=0))
    with pytest.raises(ConfigError, match="unknown protocol.*semi-magic.*known: knn, linear, finetune, lpft"):
        check_settings(("semi-magic",), FinetuneConfig())


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("protocols")
    cfg = PretrainConfig()
    cfg.data.name = str(write_stripes_npz(tmp / "s.npz", n_train=160, n_val=48, n_test=48))
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision = 1, 32, "fp32"
    return api.pretrain(cfg, output=tmp / "run")


def test_efficiency_semi_lpft_end_to_end(capsys, tiny_run: Path):
    code, out, err = run_cli(capsys, "efficiency", str(tiny_run), "--protocol", "semi", "--protocol", "semi-scratch",
                             "--protocol", "lpft", "--label-fraction", "0.2", "--seeds", "1", "--epochs", "1",
                             "--min-steps", "4", "--lr", "1e-3", "--lr", "1e-4", "--encoder-lr-scale", "0.1",
                             "--tau", "0.9", "--mu", "1")
    assert code == 0, err
    result = json.loads((tiny_run / "label_efficiency.json").read_text())
    assert {r["protocol"] for r in result["summary"]} == {"semi", "semi-scratch", "lpft"}
    assert result["semi"] == dict(tau=0.9, lambda_u=1.0, mu=1) and result["finetune"]["lr_grid"] == [1e-3, 1e-4]
    for r in result["rows"]:
        assert {"protocol", "split", "fraction", "seed", "n_labels", "steps", "acc", "auc", "balanced_acc"} <= set(r)
        assert r["lr"] in (1e-3, 1e-4) and r["encoder_lr_scale"] == 0.1 and len(r["search"]) == 2
    assert "weight_decay" in next(r for r in result["rows"] if r["protocol"] == "lpft")
    assert (tiny_run / "label_efficiency.png").is_file() and "semi-scratch" in out


@pytest.mark.parametrize("args, message", [
    (("--protocol", "semi-magic"), "unknown protocol(s) semi-magic"),
    (("--protocol", "semi", "--tau", "1.5"), "semi.tau: 1.5 is out of range"),
    (("--protocol", "finetune", "--lr", "0"), "finetune.lr_grid: (0.0,) is out of range"),
])
def test_bad_protocols_and_settings_are_one_error_line(capsys, tiny_run: Path, args, message: str):
    (tiny_run / "label_efficiency.json").unlink(missing_ok=True)
    code, _, err = run_cli(capsys, "efficiency", str(tiny_run), *args)
    assert code == 1 and message in one_error_line(err)
    assert not (tiny_run / "label_efficiency.json").exists()
