"""Anomaly detection: thresholds, AUROC, SSIM maps, heatmaps, k-NN distance, fit/score commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medlatent.anomaly.scores import knn_distance, pixel_scores, ssim_map
from medlatent.anomaly.thresholds import mean_k_std, operating_point, parse_rule, percentile, ranking, threshold

from conftest import write_stripes_npz
from test_cli import one_error_line, run_cli


def test_threshold_rules_on_known_scores():
    normal = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean_k_std(normal, 1.0) == pytest.approx(3 + np.sqrt(2))
    assert percentile(normal, 80) == pytest.approx(4.2)  # linear interpolation between 4 and 5
    assert threshold(normal, "mean+2std") == pytest.approx(3 + 2 * np.sqrt(2))
    assert threshold(normal, "p50") == pytest.approx(3.0)
    assert parse_rule("mean + 3 std") == ("mean_std", 3.0)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        parse_rule("median")
    # 4 anomalies (2 above the threshold), 6 normals (1 above): sensitivity 2/4, specificity 5/6
    scores = np.array([9, 8, 1, 2, 0, 0, 1, 2, 3, 7.5])
    is_anomaly = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    op = operating_point(scores, is_anomaly, 5.0)
    assert op["sensitivity"] == 0.5 and op["specificity"] == pytest.approx(5 / 6)


def test_auroc_is_the_probability_an_anomaly_outranks_a_normal():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = rng.normal(size=200) + y * 0.8
    s[:20] = np.round(s[:20], 1)  # some ties
    pos, neg = s[y], s[~y]
    naive = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    r = ranking(s, y)
    assert r["auroc"] == pytest.approx(naive)
    order = np.argsort(-s)
    hits = np.cumsum(y[order])
    naive_ap = np.sum((hits / np.arange(1, 201))[y[order]]) / y.sum()  # mean precision at each anomaly
    assert r["auprc"] == pytest.approx(naive_ap, abs=0.02)  # equal up to tie handling


def test_ssim_map_is_one_on_identical_images_and_matches_monai():
    from monai.metrics import SSIMMetric

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim_map(x, y)[..., 3:-3, 3:-3].mean(dim=(1, 2, 3))  # MONAI uses valid windows only
    theirs = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7, kernel_sigma=1.5)(y, x)[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("kind", ["l2", "l1", "ssim"])
@pytest.mark.parametrize("shape", [(3, 1, 12, 12), (2, 1, 8, 8, 8), (2, 3, 10, 10)])
def test_heatmaps_have_the_image_shape_and_score_the_error(kind: str, shape: tuple[int, ...]):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    recon = x.clone()
    recon[0] = 1 - recon[0]  # a badly reconstructed first image
    scores, heat = pixel_scores(x, recon, kind)
    assert heat.shape == (shape[0], *shape[2:]) and scores.shape == (shape[0],)
    assert scores[0] > scores[1:].max() and scores[1:].abs().max() < 1e-5
    if kind == "l2":
        assert torch.allclose(scores, ((x - recon) ** 2).flatten(1).mean(1))


def test_knn_distance_matches_a_naive_search():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(50, 6, generator=g), torch.randn(7, 6, generator=g)
    d = knn_distance(bank, q, k=3, batch=4)
    for i in range(7):
        cos = torch.nn.functional.cosine_similarity(q[i:i + 1], bank)
        assert d[i] == pytest.approx(float((1 - cos).sort().values[:3].mean()), abs=1e-6)


def test_anomaly_fit_and_score_commands(capsys, tmp_path: Path):
    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=128, n_val=48, n_test=48))
    run = tmp_path / "ae"
    code, out, err = run_cli(capsys, "anomaly", "fit", "--data", data, "--normal", "0", "--method", "ae",
                             "--epochs", "1", "--batch-size", "32", "--output", str(run))
    assert code == 0, err
    from medlatent.api import load_method

    assert load_method(run)[1]["n_images"] < 128  # normal images only (about half)
    code, out, err = run_cli(capsys, "anomaly", "score", str(run), "--score", "ssim", "--threshold", "p95")
    assert code == 0 and "AUROC" in out and "sensitivity" in out, err
    folder = run / "anomaly-s"
    lines = (folder / "scores.csv").read_text().splitlines()
    assert lines[0] == "index,score,anomalous,flagged" and len(lines) == 49
    assert (folder / "heatmaps.png").is_file() and (folder / "anomaly.json").is_file()

    code, out, err = run_cli(capsys, "anomaly", "score", str(run), "--detector", "knn", "--normal", "0",
                             "--out", str(tmp_path / "knn"))
    assert code == 0 and "k-NN feature distance" in out, err
    code, _, err = run_cli(capsys, "anomaly", "score", str(run), "--normal", "5")
    assert code == 1 and "classes 0..1" in one_error_line(err)
    code, _, err = run_cli(capsys, "anomaly", "score", str(run), "--threshold", "median")
    assert code == 1 and "--threshold" in one_error_line(err)
    code, _, err = run_cli(capsys, "anomaly", "fit", "--data", data, "--normal", "7", "--epochs", "1",
                           "--output", str(tmp_path / "none"))
    assert code == 1 and "no train images of classes [7]" in one_error_line(err)


def test_diffusion_and_vae_reconstruction_detectors(capsys, tmp_path: Path):
    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=64, n_val=32, n_test=32))
    for det, extra in (("vae", ["--set", "method_options.width=8"]),
                       ("ddpm", ["--set", "method_options.channels=[16,32]", "--set",
                                 "method_options.attention_levels=[false,false]", "--set",
                                 "method_options.schedule.steps=20"])):
        run = tmp_path / det
        code, _, err = run_cli(capsys, "anomaly", "fit", "--data", data, "--normal", "1", "--method", det,
                               "--epochs", "1", "--batch-size", "16", "--output", str(run), *extra)
        assert code == 0, err
        code, out, err = run_cli(capsys, "anomaly", "score", str(run))
        assert code == 0 and "AUROC" in out, err
