"""Restoration on one MedMNIST subset: a supervised UNet per degradation (Gaussian noise at
sigma 0.25/0.5/1.0, Poisson low-dose noise, Cartesian k-space undersampling at 4x and 8x)
trained for the same wall-clock budget, then `medlatent restore evaluate` (PSNR/SSIM of the
degraded input, the UNet, the UNet with data consistency where it applies, and scikit-image's
non-local means, total variation and wavelet filters for the noise tasks); and autoencoders
with several code sizes against JPEG at the same bytes (`medlatent restore rate-distortion`).

    python benchmarks/restoration.py --data pneumoniamnist --budget-min 4
    python benchmarks/restoration.py --table-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibrate import epochs_for_budget, images_per_second, run_cli  # benchmarks/calibrate.py

TASKS = ["denoise", "poisson", "kspace"]
N_TRAIN = {"bloodmnist": 11959, "pneumoniamnist": 4708, "breastmnist": 546}


def train_and_evaluate(task: str, args: argparse.Namespace, out: Path) -> None:
    run = out / f"run-{task}-{args.data}"
    if not (run / "restore_eval.json").exists():
        train = ["restore", "train", "--task", task, "--model", "unet", "--data", args.data]
        epochs = epochs_for_budget(images_per_second(train, out / f".calibrate-{task}", 15.0),
                                   N_TRAIN.get(args.data, 10000), args.budget_min * 60)
        run_cli(*train, "--epochs", str(epochs), "--time-budget", str(args.budget_min * 60), "--output", str(run))
        run_cli("restore", "evaluate", str(run), "--n", str(args.n))
    print(f"{task}: done", flush=True)


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
    for task in TASKS:
        f = out / f"run-{task}-{data}" / "restore_eval.json"
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
    ap.add_argument("--out-dir", default="benchmarks/out/restoration")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for task in args.tasks:
            train_and_evaluate(task, args, out)
        if not args.skip_rd:
            rate_distortion(args, out)
    print(f"{args.data}, first {args.n} test images; UNet budget {args.budget_min} min each")
    print(table(out, args.data))


if __name__ == "__main__":
    main()
