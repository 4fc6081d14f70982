"""`generate augment` in the user's real setting: each label fraction's generator trains on the
unlabelled train images and only that fraction's labels (the classifier's own subset for the same
seed); the old all-labels protocol still runs and says that it leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_stripes_npz
from test_cli import one_error_line

TINY_DDPM = ["--set", "method_options.channels=[16,32]", "--set", "method_options.attention_levels=[false,true]",
             "--set", "method_options.num_head_channels=16", "--set", "method_options.schedule.steps=20"]
FAST = ["--n-synthetic", "8", "--steps", "2", "--classifier-epochs", "1", "--classifier-min-steps", "2"]


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A class-conditional DDPM trained one step on 96 stripe images (2 classes): (run, data)."""
    from conftest import invoke

    root = tmp_path_factory.mktemp("synthetic")
    data = write_stripes_npz(root / "s.npz", n_train=96, n_val=32, n_test=32)
    run = root / "ddpm"
    code = invoke("generate", "train", "--method", "ddpm", "--data", str(data), "--conditional", "--epochs", "0.34",
                  "--batch-size", "32", "--precision", "fp32", "--output", str(run), *TINY_DDPM)
    assert code == 0
    return run, data


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records what every generator training (api's ``fit``) and every classifier training of the
    experiment was given, then runs the real thing."""
    import medlatent.api as api
    import medlatent.generative.evaluate as ev

    seen: dict[str, list] = {"fit": [], "classifier": []}
    real_fit, real_classifier = api.fit, ev.train_classifier

    def fit(method, images, *args, **kwargs):  # noqa: ANN001, ANN202
        labels = args[9] if len(args) > 9 else kwargs.get("labels")
        seen["fit"].append((images.clone(), None if labels is None else labels.clone()))
        return real_fit(method, images, *args, **kwargs)

    def classifier(train, *args, **kwargs):  # noqa: ANN001, ANN202
        seen["classifier"].append(train)
        return real_classifier(train, *args, **kwargs)

    monkeypatch.setattr(api, "fit", fit)
    monkeypatch.setattr(ev, "train_classifier", classifier)
    return seen


def _train_split(data: Path):  # noqa: ANN202
    from medlatent.data.medmnist import load_npz

    return load_npz(data).split("train")


def test_fraction_generators_see_only_the_classifiers_labels(ddpm_run, captured, capsys, tmp_path, monkeypatch):
    """DDPM: every train image is used, the fraction's rows with their labels, every other row
    with the null class (index n_classes = 2); the labelled rows are exactly the real-only
    classifier's training set for the same seed."""
    from medlatent.eval.fractions import label_fraction

    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path / "cache"))
    run, data = ddpm_run
    code, out, err = run_cli(capsys, "generate", "augment", str(run), "--label-fraction", "0.1", "--seeds", "2",
                             "--generator-steps", "1", *FAST)
    assert code == 0, err
    train = _train_split(data)
    n = len(label_fraction(train.labels, 0.1, 0))  # ceil(0.1 x n_c) per class
    assert n == len(label_fraction(train.labels, 0.1, 1)) < 96
    assert f"protocol fraction: the generator saw {n} labels" in out and "LEAKS" not in out
    assert len(captured["fit"]) == 2  # one generator per seed, trained inside the command
    for seed, (images, labels) in enumerate(captured["fit"]):
        idx = label_fraction(train.labels, 0.1, seed)
        assert torch.equal(images, train.images) and labels.shape == (96,)
        labelled = (labels < 2).nonzero()[:, 0]
        assert torch.equal(labelled, idx)  # the labels it was given: exactly the fraction's
        assert torch.equal(labels[idx], train.labels[idx, 0])
        assert bool((labels[torch.isin(torch.arange(96), idx, invert=True)] == 2).all())  # the rest: null class
        real_only = captured["classifier"][2 * seed]  # real only, then real + synthetic, per seed
        assert torch.equal(real_only.images, train.images[idx]) and torch.equal(real_only.labels, train.labels[idx])
        assert len(captured["classifier"][2 * seed + 1]) == n + 8
        gen = run / "synthetic" / f"fraction-0.1-seed{seed}"
        meta = json.loads((gen / "data.json").read_text())
        assert (meta["labels_seen"], meta["label_fraction"], meta["label_seed"]) == (n, 0.1, seed)
        assert json.loads((gen / "generator.json").read_text())["step"] == 1
        assert "label_fraction: 0.1" in (gen / "config.yaml").read_text()
    result = json.loads((run / "synthetic_augmentation-fraction.json").read_text())
    assert {(r["protocol"], r["labels_seen"], r["n_real"], r["leaks_labels"]) for r in result["rows"]} == \
        {("fraction", n, n, False)}
    assert result["leaks_labels"] is False and len(result["rows"]) == 4
    (gain,) = result["gains"]
    by = {(r["seed"], r["training"]): r["acc"] for r in result["rows"]}
    d = torch.tensor([by[(s, "real + synthetic")] - by[(s, "real only")] for s in (0, 1)], dtype=torch.float64)
    assert gain["acc_gain"] == pytest.approx(float(d.mean())) and gain["acc_gain_std"] == pytest.approx(float(d.std(unbiased=False)))
    # A repeated command reuses the finished generators: no generator is trained again.
    captured["fit"].clear()
    code, _, err = run_cli(capsys, "generate", "augment", str(run), "--label-fraction", "0.1", "--seeds", "1",
                           "--generator-steps", "1", *FAST)
    assert code == 0 and captured["fit"] == [], err


def test_gan_without_a_null_class_trains_on_the_labelled_images_only(captured, tmp_path, monkeypatch):
    from medlatent import api
    from medlatent.eval.fractions import label_fraction

    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path / "cache"))
    data = write_stripes_npz(tmp_path / "s.npz", n_train=96, n_val=32, n_test=32)
    run = api.pretrain({"method": "gan", "data": {"name": str(data)}, "method_options": {"conditional": True,
                        "width": 16}, "train": {"epochs": 0.34, "batch_size": 32, "precision": "fp32"}},
                       tmp_path / "gan")
    captured["fit"].clear()
    r = api.synthetic_augmentation(run, (0.25,), 8, (1,), 1.0, 1, 2, generator_steps=2)
    train = _train_split(data)
    idx = label_fraction(train.labels, 0.25, 1)
    ((images, labels),) = captured["fit"]
    assert torch.equal(images, train.images[idx]) and torch.equal(labels, train.labels[idx, 0])
    assert {(row["labels_seen"], row["n_real"], row["leaks_labels"]) for row in r["rows"]} == {(len(idx), len(idx), False)}
    gen = json.loads((run / "synthetic" / "fraction-0.25-seed1" / "generator.json").read_text())
    assert gen["labels_seen"] == len(idx) and gen["step"] == 2


def test_unlabelled_store_rows_are_the_null_class_and_the_draw_matches_the_classifiers():
    """A split holding images without a label (-1): the fraction is drawn over the labelled ones,
    as the classifier draws it on ``Dataset.labelled()``; unlabelled rows train as the null class."""
    from medlatent.api import _labels_of_fraction
    from medlatent.config import DataConfig
    from medlatent.data.store import ImageSet
    from medlatent.eval.fractions import label_fraction

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (60, 1), generator=g)
    labels[::4] = -1
    split = ImageSet(torch.arange(60, dtype=torch.uint8).view(60, 1, 1, 1).expand(60, 1, 4, 4).clone(), labels)
    cfg = DataConfig(label_fraction=0.2, label_seed=5)
    images, seen = _labels_of_fraction(split, cfg, 3, null_class=True)
    known = split.labelled()
    idx = label_fraction(known.labels, 0.2, 5)
    assert images is split.images and torch.equal(split.images[seen < 3], known.images[idx])
    assert torch.equal(seen[seen < 3], known.labels[idx, 0]) and bool((seen[labels[:, 0] < 0] == 3).all())
    images, kept = _labels_of_fraction(split, cfg, 3, null_class=False)
    assert torch.equal(images, known.images[idx]) and torch.equal(kept, known.labels[idx, 0])


def test_all_labels_protocol_still_works_and_its_rows_say_it_leaks(ddpm_run, captured, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path / "cache"))
    run, _ = ddpm_run
    code, out, err = run_cli(capsys, "generate", "augment", str(run), "--protocol", "all-labels",
                             "--label-fraction", "0.1", "--seeds", "1", *FAST)
    assert code == 0, err
    assert captured["fit"] == []  # the run's own generator: nothing trained
    assert "saw 96 labels; LEAKS labels" in out and "leak labels" in err  # a warning line says why
    result = json.loads((run / "synthetic_augmentation-all-labels.json").read_text())
    assert result["protocol"] == "all-labels" and result["leaks_labels"] is True
    assert all(r["leaks_labels"] and r["labels_seen"] == 96 and r["n_real"] < 96 for r in result["rows"])
    assert all(s["leaks_labels"] for s in result["summary"]) and result["gains"][0]["leaks_labels"]


@pytest.mark.parametrize("flags, words", [
    (["--protocol", "leaky"], "'leaky' is not one of"),
    (["--protocol", "all-labels", "--generator-steps", "5"], "apply to --protocol fraction only"),
    (["--protocol", "all-labels", "--generator-budget", "60"], "apply to --protocol fraction only"),
    (["--generator-steps", "0"], "--generator-steps"),
    (["--generator-budget", "-1"], "--generator-budget"),
    (["--label-fraction", "0"], "--label-fraction"),
])
def test_bad_flags_give_one_error_line(ddpm_run, capsys, flags, words):
    run, _ = ddpm_run
    code, _, err = run_cli(capsys, "generate", "augment", str(run), *flags)
    assert code == 1 and words in one_error_line(err)


def test_label_fraction_config_is_checked(capsys, tmp_path):
    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=32, n_val=8, n_test=8))
    for sets, words in ((["data.label_fraction=0"], "data.label_fraction"),
                        (["data.label_fraction=0.5", "data.classes=[0]"], "cannot be combined with data.classes")):
        args = [a for s in sets for a in ("--set", s)]
        code, _, err = run_cli(capsys, "generate", "train", "--method", "gan", "--data", data, "--conditional",
                               "--output", str(tmp_path / "never"), *args)
        assert code == 1 and words in one_error_line(err)
        assert not (tmp_path / "never").exists()
