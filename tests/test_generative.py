"""Diffusion schedule, samplers, guidance, DDPM training steps, and the sample metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medlatent.generative.ddpm import DDPM, DDPMConfig
from medlatent.generative.metrics import frechet_distance, memorisation, precision_recall
from medlatent.generative.samplers import ddim_step, ddpm_step, guided_eps, sample
from medlatent.generative.schedule import NoiseSchedule, ScheduleConfig


def test_alpha_bar_matches_closed_forms_and_monai():
    from monai.networks.schedulers import DDPMScheduler

    lin = NoiseSchedule(ScheduleConfig("linear", 1000, 1e-4, 0.02))
    for t in (0, 10, 499, 999):
        naive = 1.0
        for s in range(t + 1):
            naive *= 1 - (1e-4 + s * (0.02 - 1e-4) / 999)
        assert lin.alphas_bar[t].item() == pytest.approx(naive, rel=1e-5)
    cos = NoiseSchedule(ScheduleConfig("cosine", 1000))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # before the 0.999 clip bites, alpha_bar_t = f(t + 1) / f(0)
        assert cos.alphas_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    for kind, monai_name in (("linear", "linear_beta"), ("scaled_linear", "scaled_linear_beta")):
        ours = NoiseSchedule(ScheduleConfig(kind, 1000, 1e-4, 0.02)).alphas_bar
        theirs = DDPMScheduler(1000, monai_name, beta_start=1e-4, beta_end=0.02).alphas_cumprod
        assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-7)


def test_add_noise_is_equation_4():
    s = NoiseSchedule(ScheduleConfig("linear", 100))
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 50, 99])
    x_t = s.add_noise(x0, eps, t)
    for i in range(3):
        ab = s.alphas_bar[t[i]]
        assert torch.allclose(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i], atol=1e-6)


def test_ddpm_step_against_fixed_numbers():
    s = NoiseSchedule(ScheduleConfig("linear", 10, 0.1, 0.2))  # betas 0.1, 0.111.., ..., 0.2
    x, eps = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.2)
    beta, ab = 0.2, float(np.prod([1 - b for b in np.linspace(0.1, 0.2, 10)]))
    out = ddpm_step(s, x, 0, eps, None)  # t = 0: the mean only
    s2 = NoiseSchedule(ScheduleConfig("linear", 10, 0.1, 0.2))
    assert out.prev.item() == pytest.approx((0.5 - 0.1 / math.sqrt(1 - 0.9) * 0.2) / math.sqrt(0.9), rel=1e-5)
    last = ddpm_step(s2, x, 9, eps, torch.Generator().manual_seed(0))
    z = torch.randn((1, 1, 1, 1), generator=torch.Generator().manual_seed(0)).item()
    expected = (0.5 - beta / math.sqrt(1 - ab) * 0.2) / math.sqrt(1 - beta) + math.sqrt(beta) * z
    assert last.prev.item() == pytest.approx(expected, rel=1e-5)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):  # noqa: ANN201
    """A perfect denoiser for a single known image: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    def eps(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        ab = schedule.alpha_bar(t, x_t.dim())
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps


def test_ddim_is_deterministic_and_recovers_the_oracle_image():
    s = NoiseSchedule(ScheduleConfig("cosine", 200))
    x0 = torch.rand(2, 1, 6, 6) * 1.6 - 0.8
    a = sample(oracle(s, x0), s, (2, 1, 6, 6), steps=20, sampler="ddim", eta=0.0,
               generator=torch.Generator().manual_seed(3))
    b = sample(oracle(s, x0), s, (2, 1, 6, 6), steps=20, sampler="ddim", eta=0.0,
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # same seed, same samples
    assert torch.allclose(a, x0, atol=1e-4)  # a perfect eps leads DDIM to the image exactly
    c = sample(oracle(s, x0), s, (2, 1, 6, 6), sampler="ddpm", generator=torch.Generator().manual_seed(4))
    assert torch.allclose(c, x0, atol=1e-3)
    # one DDIM step with eta = 0 adds no noise: the generator is not used
    x_t = torch.randn(2, 1, 6, 6)
    eps = torch.randn(2, 1, 6, 6)
    s1 = ddim_step(s, x_t, 100, 50, eps, 0.0, torch.Generator().manual_seed(0)).prev
    s2 = ddim_step(s, x_t, 100, 50, eps, 0.0, torch.Generator().manual_seed(1)).prev
    assert torch.equal(s1, s2)


def test_classifier_free_guidance_combines_the_two_predictions():
    def den(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return x * 0 + labels.float().view(-1, 1, 1, 1)  # eps = the label value
    x, t, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2])
    out = guided_eps(den, x, t, y, null_label=5, guidance=3.0)
    expected = 5 + 3.0 * (y.float() - 5)  # eps_u + w (eps_c - eps_u)
    assert torch.allclose(out[:, 0, 0, 0], expected)


def test_velocity_inverts_to_eps_and_keeps_x0_well_conditioned():
    """v = a eps - s x0 (Salimans & Ho 2022); eps = s x_t + a v; at t = T-1 of the cosine
    schedule (a ~ 5e-5) an error of 0.01 in v moves x0_hat by ~0.01, the same error in eps by ~200."""
    from medlatent.generative.samplers import predict_x0

    s = NoiseSchedule(ScheduleConfig("cosine", 1000))
    x0, eps = torch.rand(4, 3, 5, 5) * 2 - 1, torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 400, 900, 999])
    v = s.velocity(x0, eps, t)
    for i in range(4):
        a, sd = s.alphas_bar[t[i]].sqrt(), (1 - s.alphas_bar[t[i]]).sqrt()
        assert torch.allclose(v[i], a * eps[i] - sd * x0[i], atol=1e-6)  # the formula, written out
    x_t = s.add_noise(x0, eps, t)
    assert torch.allclose(s.eps_from_velocity(x_t, v, t), eps, atol=1e-5)
    last = torch.full((4,), 999)
    x_t = s.add_noise(x0, eps, last)
    err = 0.01 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x0_from_v = predict_x0(s, x_t, last, s.eps_from_velocity(x_t, s.velocity(x0, eps, last) + err, last))
    x0_from_eps = predict_x0(s, x_t, last, eps + err)
    assert (x0_from_v - x0).abs().max() < 0.05
    assert (x0_from_eps - x0).abs().median() > 10


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_loss_targets_the_chosen_parameterisation(prediction: str):
    """The training loss is the MSE against eps or v, written out here with the same random draws;
    ``denoise`` returns eps either way (an oracle UNet output gives back the true noise)."""
    cfg = DDPMConfig(channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
                     schedule=ScheduleConfig("cosine", 50), prediction=prediction)
    model = DDPM(2, 1, n_classes=0, cfg=cfg)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(7)
    loss = model.loss(x0, None)
    torch.manual_seed(7)
    t = torch.randint(0, 50, (4,))
    noise = torch.randn_like(x0)
    ab = model.schedule.alphas_bar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    with torch.no_grad():
        naive = ((model.unet(x_t, t) - target) ** 2).mean()
        assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
        model.unet.forward = lambda x, t, class_labels=None: target  # a perfect UNet
        assert torch.allclose(model.denoise(x_t, t, None), noise, atol=1e-5)


def test_saved_runs_from_before_v_prediction_load_as_epsilon(tmp_path):
    """A run whose config predates ``prediction`` predicted eps and must not be read as v."""
    import yaml

    from medlatent.config import PretrainConfig, to_dict
    from medlatent.methods.registry import get_method
    from medlatent.methods.saved import read_config
    from medlatent.train.runs import RunDir

    for method in ("ddpm", "ldm"):
        run = RunDir(tmp_path / method)
        cfg = PretrainConfig(method=method, method_options={})
        run.write_config(cfg)
        tree = yaml.safe_load(run.config_file.read_text())
        assert read_config(RunDir(run.path)).method_options == {}  # nothing to upgrade: new defaults
        full = to_dict(get_method(method).options())
        (full if method == "ddpm" else full["diffusion"]).pop("prediction")  # as written before
        tree["method_options"] = full
        run.config_file.write_text(yaml.safe_dump(tree))
        opts = read_config(RunDir(run.path)).method_options
        assert (opts if method == "ddpm" else opts["diffusion"])["prediction"] == "epsilon"
    assert DDPMConfig().prediction == "v"  # new runs predict v


@pytest.mark.parametrize("dims", [2, 3])
def test_ddpm_trains_two_steps_and_samples(dims: int):
    torch.manual_seed(0)
    cfg = DDPMConfig(channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
                     schedule=ScheduleConfig("cosine", 50))
    model = DDPM(dims, 1, n_classes=3, cfg=cfg)
    size = (8,) * dims
    x = torch.rand(4, 1, *size) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model([x], y).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    g = torch.Generator().manual_seed(0)
    model.on_step_end(0, 2)
    out = model.eval().generate(2, (1, *size), torch.tensor([1, 2]), steps=3, guidance=2.0, generator=g)
    assert out.shape == (2, 1, *size) and out.abs().max() <= 1


def naive_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g)
    assert abs(frechet_distance(real, real)) < 1e-6
    fds = [frechet_distance(real, real + shift) for shift in (0.1, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    assert fds[2] == pytest.approx(8.0, rel=1e-3)  # a mean shift of 1 in each of 8 dimensions
    other = torch.randn(400, 8, generator=g) * 1.5
    assert frechet_distance(real, other) == pytest.approx(naive_frechet(real.numpy(), other.numpy()), rel=1e-4)


def test_precision_recall_and_memorisation():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real, real + 100)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    collapsed = precision_recall(real, real[:5].repeat(60, 1) + 1e-3)  # mode collapse: precise, no recall
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2

    train, test = torch.randn(400, 6, generator=g), torch.randn(100, 6, generator=g)
    copies = train[:10] + 1e-4
    fresh = torch.randn(50, 6, generator=g)
    m = memorisation(train, torch.cat([copies, fresh]), test)
    assert torch.equal(m["nearest"][:10], torch.arange(10))
    assert (m["ratio"][:10] < 0.01).all() and 0.5 < m["ratio"][10:].median() < 2
    assert m["share_below"] == pytest.approx(10 / 60, abs=0.05)


@pytest.mark.parametrize("name,dims", [("vae", 2), ("vae", 3), ("gan", 2), ("ldm", 2), ("ldm", 3)])
def test_each_model_trains_two_steps_and_samples(name: str, dims: int):
    """Through the registry, as `medlatent generate train` builds them; conditional in 2-D."""
    from medlatent.config import from_dict
    from medlatent.methods.contract import BuildContext
    from medlatent.methods.registry import get_method

    torch.manual_seed(0)
    spec = get_method(name)
    small = {"vae": dict(width=8, latent_dim=4), "gan": dict(width=32, latent_dim=8),
             "ldm": dict(ae_channels=[8, 16], ae_fraction=0.5,
                         diffusion=dict(channels=[16, 32], attention_levels=[False, True], num_head_channels=16,
                                        schedule=dict(steps=20)))}[name]
    options = from_dict(spec.options, dict(small, conditional=dims == 2), "method_options")
    size = 8
    model = spec.build(torch.nn.Identity(), options, BuildContext(8, 4, size, 1, dims, n_classes=3))
    x = torch.rand(4, 1, *(size,) * dims) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = 2 if name != "ldm" else 4  # ldm: two autoencoder steps, then two diffusion steps
    for step in range(total):
        out = model([x], y)
        assert torch.isfinite(out.loss), (name, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.on_step_end(step, total)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    if name == "ldm":
        assert any(n.startswith("autoencoder.") for n in changed) and any(n.startswith("diffusion.") for n in changed)
        assert model.scale > 0
    if name == "gan":  # each network got its own gradient
        assert any(n.startswith("generator.") for n in changed) and any(n.startswith("discriminator.") for n in changed)
    labels = torch.tensor([1, 2]) if dims == 2 else None
    samples = model.eval().generate(2, (1, *(size,) * dims), labels, generator=torch.Generator().manual_seed(0),
                                    **({"steps": 3} if name == "ldm" else {}))
    assert samples.shape == (2, 1, *(size,) * dims) and samples.abs().max() <= 1


def test_vae_elbo_matches_the_formula_and_interpolates():
    from medlatent.generative.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(2, 1, 8, 0, VAEConfig(latent_dim=3, width=4, beta=2.0, sigma=0.5))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    out = vae([x])
    torch.manual_seed(1)
    mu, logvar = vae.encode(x)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    rec = ((vae.decode(z) - x) ** 2).sum((1, 2, 3)) / (2 * 0.25)
    kl = sum(0.5 * (mu[:, j] ** 2 + logvar[:, j].exp() - 1 - logvar[:, j]) for j in range(3))
    assert out.loss.item() == pytest.approx((rec + 2.0 * kl).mean().item(), rel=1e-5)
    path = vae.interpolate(x[:1], x[1:], steps=5)
    assert path.shape == (5, 1, 8, 8)
    assert torch.allclose(path[0], vae.decode(vae.encode(x[:1])[0]).clamp(-1, 1)[0], atol=1e-6)  # starts at a


TINY_DDPM = ["--set", "method_options.channels=[16,32]", "--set", "method_options.attention_levels=[false,true]",
             "--set", "method_options.num_head_channels=16", "--set", "method_options.schedule.steps=20"]


def test_generate_commands_end_to_end(capsys, tmp_path, monkeypatch):
    from conftest import write_stripes_npz
    from test_cli import one_error_line, run_cli

    monkeypatch.setenv("MEDLATENT_CACHE", str(tmp_path / "cache"))
    data = str(write_stripes_npz(tmp_path / "s.npz", n_train=96, n_val=32, n_test=32))
    run = tmp_path / "ddpm"
    code, out, err = run_cli(capsys, "generate", "train", "--method", "ddpm", "--data", data, "--conditional",
                             "--epochs", "1", "--batch-size", "32", "--precision", "fp32", "--output", str(run), *TINY_DDPM)
    assert code == 0 and "generate sample" in out, err
    assert not (run / "encoder.safetensors").exists()  # a generator exports no encoder
    code, out, err = run_cli(capsys, "generate", "sample", str(run), "--n", "6", "--steps", "3", "--class", "1",
                             "--guidance", "2")
    assert code == 0, err
    from medlatent.data.medmnist import load_npz

    samples = load_npz(run / "samples-ddpm-class1-g2.npz").split("train")
    assert samples.images.shape == (6, 1, 28, 28) and samples.images.dtype == torch.uint8
    assert (samples.labels[:, 0] == 1).all() and (run / "samples-ddpm-class1-g2.png").is_file()
    code, _, err = run_cli(capsys, "generate", "sample", str(run), "--class", "7")
    assert code == 1 and "classes 0..1" in one_error_line(err)

    code, out, err = run_cli(capsys, "generate", "evaluate", str(run), "--n", "40", "--steps", "2",
                             "--classifier-epochs", "1", "--classifier-min-steps", "5")
    assert code == 0 and "TSTR" in out and "Frechet" in out, err
    for name in ("generation_eval.json", "memorisation.png"):
        assert (run / name).is_file()

    code, _, err = run_cli(capsys, "generate", "train", "--method", "flow", "--data", data)
    assert code == 1 and "unknown generative model" in one_error_line(err)
    vae = tmp_path / "vae"
    code, out, err = run_cli(capsys, "generate", "train", "--method", "vae", "--data", data, "--epochs", "1",
                             "--batch-size", "32", "--output", str(vae), "--set", "method_options.width=8")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "sample", str(vae), "--n", "4", "--class", "0")
    assert code == 1 and "unconditional" in one_error_line(err)


def test_log_window_averages_terms_that_start_mid_window():
    """Latent diffusion logs "autoencoder" terms, then "diffusion" terms: a window spanning the
    switch averages each over the steps that report it (this raised KeyError before)."""
    from medlatent.train.loop import _Window

    window = _Window(first_step=0)
    window.add(torch.tensor(1.0), {"autoencoder": torch.tensor(2.0)})
    window.add(torch.tensor(3.0), {"autoencoder": torch.tensor(4.0)})
    window.add(torch.tensor(5.0), {"diffusion": torch.tensor(6.0)})
    record = window.flush(None, done=3, steps_per_epoch=3, lr=0.1, batch_size=2, wall0=0.0)  # type: ignore[arg-type]
    assert record["loss"] == 3.0 and record["autoencoder"] == 3.0 and record["diffusion"] == 6.0


def test_ldm_diffusion_ema_warmup_counts_from_the_stage_switch():
    """The first diffusion step's EMA uses decay min(ema, 1/10) (warm-up step 0), whatever the
    run's global step: the EMA then sits 90 % of the way to the trained weights."""
    from medlatent.generative.ldm import LDM, LDMConfig
    from medlatent.generative.ddpm import DDPMConfig

    torch.manual_seed(0)
    cfg = LDMConfig(ae_channels=(8, 16), ae_fraction=0.5,
                    diffusion=DDPMConfig(channels=(16, 32), attention_levels=(False, True), num_head_channels=16))
    model = LDM(2, 1, 0, cfg)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    total = 40
    for step in range(total // 2 + 1):  # 20 autoencoder steps, then the first diffusion step
        if step == total // 2:
            ema_before = [p.detach().clone() for p in model.diffusion.ema_unet.parameters()]
        out = model([x])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.on_step_end(step, total)
    for before, ema, live in zip(ema_before, model.diffusion.ema_unet.parameters(), model.diffusion.unet.parameters()):
        assert torch.allclose(ema, 0.1 * before + 0.9 * live, atol=1e-6)
