"""Restoration on one MedMNIST subset: a supervised UNet per degradation (Gaussian noise at
sigma 0.25/0.5/1.0, Poisson low-dose noise, Cartesian k-space undersampling at 4x and 8x)
trained for the same wall-clock budget, then `medlatent restore evaluate` (PSNR/SSIM of the
degraded input, the UNet, the UNet with data consistency where it applies, and scikit-image's
non-local means, total variation and wavelet filters for the noise tasks); and autoencoders
with several code sizes against JPEG at the same bytes (`medlatent restore rate-distortion`).
With --diffusion-min / --dae-min it also trains, on clean images only, an unconditional DDPM
(diffusion denoising by noise-level matching; k-space and inpainting by DDIM with data
consistency) and a denoising autoencoder (noise at --dae-sigma), and re-evaluates the tasks with
their rows; --palette-min trains conditional (Palette) diffusion on the Gaussian-noise pair.

    python benchmarks/restoration.py --data pneumoniamnist --budget-min 4 --diffusion-min 15 --dae-min 3 --palette-min 10
    python benchmarks/restoration.py --table-only
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from calibrate import calibrated_epochs, run_budgeted, run_cli, train_images  # benchmarks/calibrate.py
from common import SMALL_BATCH_DIFFUSION, parse_with_results  # benchmarks/common.py

TASKS = ["denoise", "poisson", "kspace", "inpaint"]


def budgeted(train: list[str], run: Path, minutes: float, data: str, tmp: Path) -> None:
    """`medlatent TRAIN --output RUN` with its epochs sized to `minutes`; skipped when RUN has
    finished before (marker file, or an evaluation), restarted when it was cut off."""
    marker = run / ".benchmark-trained"
    if marker.exists() or (run / "restore_eval.json").exists():
        return
    shutil.rmtree(run, ignore_errors=True)
    _, epochs = calibrated_epochs(train, train_images(data), minutes * 60, tmp, 15.0)
    run_budgeted(train, epochs, minutes * 60, run)
    marker.write_text(f"{minutes} min\n")


def evaluate(run: Path, args: argparse.Namespace, extra: list[str]) -> None:
    """`restore evaluate` unless restore_eval.json already holds the same extra runs."""
    f = run / "restore_eval.json"
    want = {"diffusion_run": None, "autoencoder_run": None}
    want.update({k.strip("-") + "_run": v for k, v in zip(extra[::2], extra[1::2])})
    if f.exists() and all(json.loads(f.read_text()).get(k) == v for k, v in want.items()):
        return
    run_cli("restore", "evaluate", str(run), "--n", str(args.n), *extra)


def train_and_evaluate(task: str, args: argparse.Namespace, out: Path, extra: dict[str, list[str]]) -> None:
    run = out / f"run-{task}-{args.data}"
    budgeted(["restore", "train", "--task", task, "--method", "unet", "--data", args.data], run, args.budget_min,
             args.data, out / f".calibrate-{task}")
    evaluate(run, args, extra.get(task, []))
    print(f"{task}: done", flush=True)


def clean_image_models(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """Train the DDPM and the denoising autoencoder on clean images; the extra evaluate options
    per task."""
    extra: dict[str, list[str]] = {}
    if args.diffusion_min:
        ddpm = out / f"run-ddpm-{args.data}"
        budgeted(["generate", "train", "--method", "ddpm", "--data", args.data, *SMALL_BATCH_DIFFUSION], ddpm,
                 args.diffusion_min, args.data, out / ".calibrate-ddpm")
        for task in ("denoise", "kspace", "inpaint"):
            extra[task] = ["--diffusion", str(ddpm)]
    if args.dae_min:
        import numpy as np

        from medlatent.data.medmnist import load_medmnist

        std = float(np.std(load_medmnist(args.data, splits=("train",)).splits["train"].images.numpy() / 255.0))
        dae = out / f"run-dae-{args.data}"
        budgeted(["pretrain", "--method", "denoising-autoencoder", "--data", args.data,
                  "--set", f"method_options.noise_std={args.dae_sigma / std:.3f}"], dae, args.dae_min, args.data,
                 out / ".calibrate-dae")
        for task in ("denoise", "poisson"):
            extra[task] = extra.get(task, []) + ["--autoencoder", str(dae)]
    print("clean-image models: done", flush=True)
    return extra


def palette(args: argparse.Namespace, out: Path) -> None:
    """Paired image-to-image translation: conditional diffusion on (noisy, clean) pairs."""
    run = out / f"run-palette-denoise-{args.data}"
    budgeted(["restore", "train", "--task", "denoise", "--method", "diffusion", "--data", args.data,
              *SMALL_BATCH_DIFFUSION], run, args.palette_min, args.data, out / ".calibrate-palette")
    evaluate(run, args, [])
    print("palette: done", flush=True)


def rate_distortion(args: argparse.Namespace, out: Path) -> None:
    runs = []
    for dim in args.latent_dims:
        run = out / f"run-ae{dim}-{args.data}"
        if not (run / "encoder.safetensors").exists():
            run_cli("pretrain", "--method", "autoencoder", "--data", args.data, "--epochs", str(args.ae_epochs),
                    "--time-budget", str(args.budget_min * 60 / 2), "--set", f"method_options.latent_dim={dim}",
                    "--output", str(run))
        runs.append(str(run))
    text = run_cli("restore", "rate-distortion", *runs, "--n", str(args.n),
                   "--out", str(out / f"rate_distortion_{args.data}.png"))
    (out / f"rate_distortion_{args.data}.txt").write_text(text)


def table(out: Path, data: str) -> str:
    lines = ["| task | level | method | PSNR (dB) | SSIM |", "| --- | --- | --- | --- | --- |"]
    for task, folder in [(t, t) for t in TASKS] + [("denoise", "palette-denoise")]:
        f = out / f"run-{folder}-{data}" / "restore_eval.json"
        if f.exists():
            for r in json.loads(f.read_text())["rows"]:
                lines.append(f"| {task} | {r['level_name']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    rd = out / f"rate_distortion_{data}.txt"
    if rd.exists():
        lines.append("\nrate-distortion (bytes per image -> PSNR/SSIM):\n" + rd.read_text())
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="pneumoniamnist")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--budget-min", type=float, default=4.0, help="training budget per UNet (autoencoders: half)")
    ap.add_argument("--latent-dims", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--ae-epochs", type=int, default=10)
    ap.add_argument("--n", type=int, default=300, help="test images judged")
    ap.add_argument("--skip-rd", action="store_true")
    ap.add_argument("--diffusion-min", type=float, default=0.0, help="DDPM on clean images (0: none)")
    ap.add_argument("--dae-min", type=float, default=0.0, help="denoising autoencoder (0: none)")
    ap.add_argument("--dae-sigma", type=float, default=0.5, help="its training noise, in [0, 1] units")
    ap.add_argument("--palette-min", type=float, default=0.0, help="conditional diffusion, noisy -> clean (0: none)")
    args, out = parse_with_results(ap, "benchmarks/out/restoration")
    if not args.table_only:
        extra = clean_image_models(args, out)
        for task in args.tasks:
            train_and_evaluate(task, args, out, extra)
        if not args.skip_rd:
            rate_distortion(args, out)
        if args.palette_min:
            palette(args, out)
    print(f"{args.data}, first {args.n} test images; UNet budget {args.budget_min} min each")
    print(table(out, args.data))


if __name__ == "__main__":
    main()
