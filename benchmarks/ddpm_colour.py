"""Why eps-prediction DDPMs gave colour casts: for one DDPM run, (1) how far the clamped x0
estimate at step t misses each test image's mean colour, and (2) the spread of the mean colour
of 80 samples (DDIM 25 steps, guidance 2, 10 per class) against real test images.

    python benchmarks/ddpm_colour.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from medlatent.generative.evaluate import load_generator
from medlatent.generative.samplers import predict_x0, sample


@torch.no_grad()
def report(run: str, x0: torch.Tensor, y: torch.Tensor) -> None:
    model, _, step, _ = load_generator(run, "cpu")
    s = model.schedule
    g = torch.Generator().manual_seed(0)
    errors = []
    for t in (999, 960, 900, 600):
        tt = torch.full((len(x0),), t)
        x_t = s.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        x0_hat = predict_x0(s, x_t, tt, model.denoise(x_t, tt, y, ema=True)).clamp(-1, 1)
        rms = ((x0_hat.mean((2, 3)) - x0.mean((2, 3))) ** 2).mean().sqrt()  # per-image mean colour error
        errors.append(f"t={t}: {rms:.2f}")
    n = 80
    samples = sample(lambda x, t, c: model.denoise(x, t, c, ema=True), s, (n, *x0.shape[1:]), 25, "ddim", 0.0,
                     torch.arange(n) % model.n_classes, model.null_label, 2.0, torch.Generator().manual_seed(0))
    spread = samples.mean((2, 3)).std(0).numpy().round(2)
    print(f"{run} ({model.prediction}, step {step}): x0 mean-colour error {', '.join(errors)}; "
          f"sample mean-colour std per channel {spread}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--npz", default=None, help="BloodMNIST npz (default: $MEDLATENT_DATA/bloodmnist.npz)")
    args = ap.parse_args()
    import os

    d = np.load(args.npz or os.path.join(os.environ.get("MEDLATENT_DATA", "."), "bloodmnist.npz"))
    x0 = torch.tensor(d["test_images"][:256]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (256, 3, 28, 28)
    y = torch.tensor(d["test_labels"][:256, 0]).long()
    real = torch.tensor(d["test_images"][:2000]).float().div(127.5).sub(1).mean((1, 2)).std(0).numpy().round(2)
    print(f"real test images: mean-colour std per channel {real}")
    for run in args.runs:
        report(run, x0, y)


if __name__ == "__main__":
    main()
