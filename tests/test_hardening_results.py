"""Regression tests for defects that changed results: adapter hashes on BatchNorm, the anomaly
SSIM border, DINO's first teacher temperature, multi-label ACC at 0.5, the domain classifier
cache key, the Frechet distance's matrix square root, crossover wording, and ViT -> UNETR."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch


# --- anomaly SSIM near the border -------------------------------------------------------------

def _ssim_pairs(n: int = 64, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def test_ssim_heatmap_border_band_scores_like_the_interior():
    from medlatent.anomaly.scores import pixel_scores

    x, y = _ssim_pairs()
    _, heat = pixel_scores(x, y, "ssim")  # (N, 28, 28)
    assert heat.shape == (64, 28, 28)
    band = torch.zeros(28, 28, dtype=torch.bool)
    band[:3], band[-3:], band[:, :3], band[:, -3:] = True, True, True, True
    border, inner = heat[:, band].mean(1), heat[:, ~band].mean(1)  # per image, (N,)
    diff = border - inner
    t = diff.mean() / (diff.std() / len(diff) ** 0.5)  # paired t statistic
    assert abs(float(t)) < 4, (float(border.mean()), float(inner.mean()))
    # zero padding made the band about half as anomalous as the interior
    assert float(border.mean()) == pytest.approx(float(inner.mean()), rel=0.1)


def test_ssim_image_score_is_monai_ssim_and_a_naive_window_loop():
    from monai.metrics import SSIMMetric

    from medlatent.anomaly.scores import gaussian_window, pixel_scores

    x, y = _ssim_pairs(n=3, size=16, seed=1)
    score, _ = pixel_scores(x, y, "ssim")
    monai = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7, kernel_sigma=1.5)(y, x)[:, 0]
    assert torch.allclose(score, 1 - monai, atol=1e-5)
    w = gaussian_window(7, 1.5, 2, 1)[0, 0].double()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    naive = []
    for a, b in zip(x[:, 0].double(), y[:, 0].double()):
        vals = []
        for i in range(16 - 6):
            for j in range(16 - 6):
                pa, pb = a[i:i + 7, j:j + 7], b[i:i + 7, j:j + 7]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
                cov = (w * pa * pb).sum() - ma * mb
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        naive.append(1 - torch.stack(vals).mean())
    assert torch.allclose(score.double(), torch.stack(naive), atol=1e-5)


# --- adapter files: the base hash on BatchNorm buffers --------------------------------------

def _old_hash(module: torch.nn.Module) -> str:
    """The hash as it was for tensors of one or more dimensions (adapter files written with it)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_weights_hash_covers_batchnorm_counters_and_every_dtype():
    from medlatent.adapt.files import weights_hash
    from medlatent.nets.backbones import build_encoder

    torch.manual_seed(0)
    resnet = build_encoder("resnet18-quarter", 1, 28)
    assert any(t.dim() == 0 for t in resnet.state_dict().values())  # num_batches_tracked
    first = weights_hash(resnet)
    assert first == weights_hash(resnet)
    for name, buf in resnet.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf += 1  # a value change in a 0-dim buffer changes the hash
            break
    assert weights_hash(resnet) != first

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, dt in enumerate((torch.bool, torch.bfloat16, torch.float16, torch.int64, torch.uint8)):
                self.register_buffer(f"b{i}", torch.ones((), dtype=dt))
                self.register_buffer(f"v{i}", torch.ones(2, 3, dtype=dt))
            self.register_buffer("empty", torch.zeros(0, 4))

    assert len(weights_hash(Odd())) == 64
    vit = build_encoder("vit-tiny", 1, 28, depth=1)  # no 0-dim tensors: the old hash must not change
    assert weights_hash(vit) == _old_hash(vit)
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    bn.register_buffer("x", torch.arange(6.0).reshape(2, 3))
    without = {k: v for k, v in bn.state_dict().items() if v.dim()}
    plain = torch.nn.Module()
    for k, v in without.items():
        plain.register_buffer(k.replace(".", "_"), v)
    assert weights_hash(plain) == _old_hash(plain)


def test_adapt_bias_on_a_resnet_run_saves_its_adapter(capsys, tmp_path):
    from medlatent import api
    from medlatent.adapt.files import read_adapter
    from medlatent.config import PretrainConfig

    from conftest import write_stripes_npz
    from conftest import run_cli

    cfg = PretrainConfig()
    cfg.method = "simclr"
    cfg.backbone.name = "resnet18-quarter"
    cfg.data.name = str(write_stripes_npz(tmp_path / "s.npz", n_train=64, n_val=32, n_test=32))
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision = 1, 32, "fp32"
    run = api.pretrain(cfg, output=tmp_path / "run")
    code, out, err = run_cli(capsys, "adapt", str(run), "--strategy", "bias", "--epochs", "1", "--min-steps", "2",
                             "--out", str(tmp_path / "bias"))
    assert code == 0, err
    _, info, _ = read_adapter(tmp_path / "bias")
    assert 0 <= info["test"]["acc"] <= 1


# --- DINO's teacher temperature at step 0 -----------------------------------------------------

def test_dino_teacher_temperature_starts_at_the_warmup_value():
    from medlatent.ssl.dino import DINO

    class Tiny(torch.nn.Module):
        out_dim = 8

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    start, end, total = 0.02, 0.07, 20
    dino = DINO(Tiny(), out_dim=16, hidden_dim=8, bottleneck_dim=4, teacher_temp=end,
                warmup_teacher_temp=start, warmup_fraction=0.5)
    warm = int(0.5 * total)
    seen = []
    for step in range(total):  # the loop: forward (reads the temperature), then on_step_end
        seen.append(dino.current_teacher_temp())
        dino.on_step_end(step, total)
    # DINO reference: linear from warmup_teacher_temp (np.linspace's first value) to teacher_temp
    expected = [start + (end - start) * s / warm if s < warm else end for s in range(total)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(start)
    no_warmup = DINO(Tiny(), out_dim=16, hidden_dim=8, bottleneck_dim=4, teacher_temp=end,
                     warmup_teacher_temp=start, warmup_fraction=0.0)
    assert no_warmup.current_teacher_temp() == pytest.approx(end)  # no warm-up: constant from step 0


# --- MedMNIST ACC at a score of exactly 0.5 ---------------------------------------------------

def _medmnist_v3_acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """medmnist 3.0.2 ``evaluator.getACC``, restated: strict ``>`` for multi-label and binary."""
    from sklearn.metrics import accuracy_score

    y_true, y_score = y_true.squeeze(), y_score.squeeze()
    if task == "multi-label, binary-class":
        y_pre = y_score > threshold
        return sum(accuracy_score(y_true[:, i], y_pre[:, i]) for i in range(y_true.shape[1])) / y_true.shape[1]
    if task == "binary-class":
        return accuracy_score(y_true, (y_score[:, -1] if y_score.ndim == 2 else y_score) > threshold)
    return accuracy_score(y_true, np.argmax(y_score, axis=-1))


def test_medmnist_acc_at_exactly_one_half_matches_the_evaluator():
    from medlatent.data.catalogue import BINARY, MULTI_LABEL
    from medlatent.eval.metrics import medmnist_acc

    rng = np.random.default_rng(0)
    y_ml = rng.integers(0, 2, (40, 5))
    s_ml = rng.choice([0.25, 0.5, 0.75], size=(40, 5))  # a third of the scores sit on the threshold
    assert (s_ml == 0.5).sum() > 30
    assert medmnist_acc(y_ml, s_ml, MULTI_LABEL) == pytest.approx(_medmnist_v3_acc(y_ml, s_ml, MULTI_LABEL))
    # on the threshold the label is predicted negative: all-0.5 scores score the fraction of zeros
    half = np.full((40, 5), 0.5)
    assert medmnist_acc(y_ml, half, MULTI_LABEL) == pytest.approx((y_ml == 0).mean())
    y_b = rng.integers(0, 2, (40, 1))
    s_b = np.stack([1 - s_ml[:, 0], s_ml[:, 0]], 1)
    assert medmnist_acc(y_b, s_b, BINARY) == pytest.approx(_medmnist_v3_acc(y_b, s_b, BINARY))


# --- the domain classifier cache: keyed by the data, not the file stem ------------------------

def _named_dataset(seed: int, name: str = "data"):
    from medlatent.data.store import Dataset, ImageSet

    g = torch.Generator().manual_seed(seed)
    splits = {s: ImageSet(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g),
                          torch.randint(0, 2, (8, 1), generator=g)) for s in ("train", "val", "test")}
    return Dataset(name, "binary-class", ("a", "b"), splits, source=f"/somewhere/{seed}/{name}.npz")


def test_domain_classifier_cache_is_per_data_content(tmp_path, monkeypatch):
    from medlatent.eval.finetune import Classifier
    from medlatent.generative import evaluate as ge
    from medlatent.nets.backbones import build_encoder

    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path))
    trained = []

    def fake_train(train, data, *args, **kwargs):  # the real one takes minutes; count the calls
        trained.append(data.source)
        return Classifier(build_encoder(ge.DOMAIN_BACKBONE, data.channels, data.image_size), data.n_classes)

    monkeypatch.setattr(ge, "train_classifier", fake_train)
    a, b = _named_dataset(0), _named_dataset(1)  # two different data.npz files
    a_again = _named_dataset(0)  # the same content, read again
    cpu = torch.device("cpu")
    _, name_a = ge.domain_classifier(a, [0.5], [0.5], cpu)
    _, name_b = ge.domain_classifier(b, [0.5], [0.5], cpu)
    _, name_a2 = ge.domain_classifier(a_again, [0.5], [0.5], cpu)
    assert trained == [a.source, b.source]  # b is not served a's classifier; a's is reused
    assert name_a != name_b and name_a == name_a2
    assert len(list((tmp_path / "domain").glob("*.safetensors"))) == 2
    changed = _named_dataset(0)
    changed.splits["val"].labels[0] ^= 1  # one val label differs: another classifier
    assert ge.domain_classifier(changed, [0.5], [0.5], cpu)[1] != name_a


# --- Frechet distance without MONAI's sqrtm(disp=False) ---------------------------------------

def _sqrtm_without_disp(monkeypatch) -> None:
    """scipy 1.18's sqrtm, which no longer accepts ``disp``."""
    import scipy.linalg

    real = scipy.linalg.sqrtm

    def sqrtm(a, **kwargs):
        if "disp" in kwargs:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        return real(a, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)


def test_frechet_distance_of_diagonal_gaussians_is_analytic(monkeypatch):
    from medlatent.generative.metrics import frechet_from_stats

    _sqrtm_without_disp(monkeypatch)
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # a rotation of both covariances leaves the distance unchanged (the trace term is invariant)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_from_stats(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)
    assert frechet_from_stats(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_monai_on_random_features(monkeypatch):
    from monai.metrics import FIDMetric

    from medlatent.generative.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g)
    fake = 0.8 * torch.randn(150, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.3 + 0.5
    with warnings.catch_warnings():  # scipy 1.17 still accepts MONAI's disp, with a warning
        warnings.simplefilter("ignore")
        reference = float(FIDMetric()(fake.double(), real.double()))
    _sqrtm_without_disp(monkeypatch)
    assert frechet_distance(real, fake) == pytest.approx(reference, rel=1e-6)
    few = torch.randn(10, 16, generator=g)  # fewer samples than features: singular covariances
    assert np.isfinite(frechet_distance(few, few + 1.0))



# --- label efficiency: where each protocol wins and loses against training from scratch -------

def _efficiency_summary() -> list[dict]:
    acc = {"supervised": {0.01: 0.50, 0.1: 0.70, 0.25: 0.80},
           "linear": {0.01: 0.521, 0.1: 0.692, 0.25: 0.790},   # wins at 1 %, loses at 10 % and 25 %
           "knn": {0.01: 0.40, 0.1: 0.60, 0.25: 0.70},         # never wins
           "finetune": {0.01: 0.55, 0.1: 0.70, 0.25: 0.85}}     # wins, ties, wins
    return [dict(protocol=p, split=s, fraction=f, acc=a if s == "test" else 1.0)
            for p, by in acc.items() for f, a in by.items() for s in ("val", "test")]


def test_crossover_lists_wins_and_losses_with_margins():
    from medlatent.eval.session import crossover

    summary = _efficiency_summary()
    c = crossover(summary)
    base = {r["fraction"]: r["acc"] for r in summary if r["protocol"] == "supervised" and r["split"] == "test"}
    for protocol in ("knn", "linear", "finetune"):
        test = {r["fraction"]: r["acc"] for r in summary if r["protocol"] == protocol and r["split"] == "test"}
        margins = {f: 100 * (test[f] - base[f]) for f in base}  # ACC points
        assert [w["fraction"] for w in c[protocol]["wins"]] == sorted(f for f, m in margins.items() if m > 1e-9)
        assert [w["fraction"] for w in c[protocol]["losses"]] == sorted(f for f, m in margins.items() if m < -1e-9)
        for w in c[protocol]["wins"] + c[protocol]["losses"]:
            assert w["margin_points"] == pytest.approx(margins[w["fraction"]])
    assert crossover([r for r in summary if r["protocol"] != "supervised"])["linear"] is None


def test_efficiency_cli_and_report_never_say_from_when_a_protocol_loses_later(capsys, monkeypatch):
    from medlatent import api
    from medlatent.eval.session import crossover
    from medlatent.report.html import _crossover_text

    from conftest import run_cli

    summary = [dict(r, acc_std=0.0, auc=0.5, auc_std=0.0) for r in _efficiency_summary() if r["split"] == "test"]
    monkeypatch.setattr(api, "label_efficiency", lambda *a, **k: dict(summary=summary, crossover=crossover(summary),
                                                                       file="some-run/label_efficiency.json"))
    code, out, err = run_cli(capsys, "efficiency", "some-run")
    assert code == 0, err
    assert "linear vs training from scratch: wins at 1% (+2.1 points), loses at 10% (-0.8), 25% (-1.0)" in out
    assert "knn vs training from scratch: never wins: loses at 1% (-10.0 points), 10% (-10.0), 25% (-10.0)" in out
    assert "finetune vs training from scratch: wins at 1% (+5.0 points), 25% (+5.0), ties at 10%" in out
    assert " from " not in out.replace("training from scratch", "")
    text = _crossover_text(crossover(summary))
    assert "linear probe: wins at 1% (+2.1 points), loses at 10% (-0.8), 25% (-1.0)" in text
    assert " from " not in f" {text} "


# --- our ViT in UNETR's encoder: only with 16-px patches --------------------------------------

def _unetr(img_size: int):
    from monai.networks.nets import UNETR

    # UNETR fixes 16-px patches and 12 blocks; ViT-tiny: D 192, MLP 768, 3 heads, qkv bias
    return UNETR(in_channels=1, out_channels=2, img_size=img_size, hidden_size=192, mlp_dim=768, num_heads=3,
                 spatial_dims=2, qkv_bias=True).eval()


def test_vit_weights_load_into_unetr_with_16_px_patches_only():
    from medlatent.config import BackboneConfig
    from medlatent.nets.backbones import build_backbone

    torch.manual_seed(0)
    vit = build_backbone(BackboneConfig(name="vit-tiny"), 1, 128, 2).eval()  # 128 px: default patch 16
    assert vit.patch_size == 16
    unetr = _unetr(128)
    state = {k: v for k, v in vit.state_dict().items() if k != "cls_token"}  # UNETR's ViT has no CLS token
    assert set(state) == set(unetr.vit.state_dict())
    unetr.vit.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, hidden = unetr.vit(x)  # (B, 64, 192) patch tokens, and each block's output
        t = vit.embed(x)  # the same weights, by our blocks, on the patch tokens only
        for i, block in enumerate(vit.blocks):
            t = block(t)
            assert torch.allclose(t, hidden[i], atol=1e-5)
        assert torch.allclose(vit.norm(t), out, atol=1e-5)
    for size in (28, 64):  # the default 4- and 8-px patches do not fit UNETR's 16-px embedding
        small = build_backbone(BackboneConfig(name="vit-tiny"), 1, size, 2)
        assert small.patch_size in (4, 8)
        unetr_size = 32 if size == 28 else 64  # UNETR needs a multiple of 16
        with pytest.raises(RuntimeError, match="size mismatch"):
            _unetr(unetr_size).vit.load_state_dict(
                {k: v for k, v in small.state_dict().items() if k != "cls_token"}, strict=True)


def test_adapter_names_with_dots_keep_their_fraction(tmp_path):
    """``adapt --label-fraction 0.5`` names its adapter ``...-0.5``: both files keep the 0.5."""
    from medlatent.adapt.files import adapter_files

    assert adapter_files(tmp_path / "bias-s-0.5") == (tmp_path / "bias-s-0.5.safetensors", tmp_path / "bias-s-0.5.json")
    assert adapter_files(tmp_path / "lora.safetensors") == (tmp_path / "lora.safetensors", tmp_path / "lora.json")
