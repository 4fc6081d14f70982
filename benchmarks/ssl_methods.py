"""Every self-supervised method on BloodMNIST and PneumoniaMNIST (28 px) at the same wall-clock
budget on this machine, each in its own process (so peak memory is its own), then one table.

    python benchmarks/ssl_methods.py --budget-min 8          # CPU: ResNet-18/4 and ViT-tiny
    python benchmarks/ssl_methods.py --budget-min 1 --resnet resnet18 --batch-size 512   # GPU
    python benchmarks/ssl_methods.py --table-only             # re-print the table from results
    python benchmarks/ssl_methods.py --methods mocov2 --seeds 1 2   # repeats: mean and spread per method

The main table is seed 0 (the config default); `--seeds` adds runs of the same command with
`train.seed=N` (weights, views and data order), kept as `{method}-seed{N}_{data}.json`, and a
second table of mean and standard deviation over every seed present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import memory_cell  # benchmarks/common.py

from medlatent.eval.published import published

# method -> backbone: ResNets for the contrastive and distillation methods, a ViT where the
# method works on patch tokens. Extra overrides per method go in the list.
METHODS = {
    "simclr": ("resnet18-quarter", []),
    "mocov2": ("resnet18-quarter", []),
    "mocov3": ("resnet18-quarter", []),
    "byol": ("resnet18-quarter", []),
    "dino": ("resnet18-quarter", []),
    "mae": ("vit-tiny", []),
    "ijepa": ("vit-tiny", []),
    "rotation": ("resnet18-quarter", []),
    "autoencoder": ("resnet18-quarter", []),
    "denoising-autoencoder": ("resnet18-quarter", []),
    "simclr-triplet": ("resnet18-quarter", ["method_options.objective=triplet"]),
}


def table(out_dir: Path, datasets: list[str]) -> str:
    lines = []
    for data in datasets:
        budgets = sorted({json.loads(f.read_text())["budget_min"] for f in out_dir.glob(f"*_{data}.json")})
        lines.append(f"\n**{data}** (test split; {' / '.join(f'{b:g}' for b in budgets)} min of pretraining per method)\n")
        lines.append("| method | backbone | epochs | img/s | peak memory | k-NN ACC | k-NN AUC | linear ACC | linear AUC |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in METHODS:
            f = out_dir / f"{name}_{data}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            k, lin = r["knn_test"], r["linear_test"]
            epochs = f"{r['epochs']:g}"
            if r.get("status") == "budget":  # stopped by the budget before its schedule ended
                epochs = f"{r['steps']} of {r['total_steps']} steps"
            lines.append(f"| {name} | {r['backbone']} | {epochs} | {r['images_per_s_median']:.0f} | "
                         f"{memory_cell(r, 1)} | {k['acc']:.3f} | {k['auc']:.3f} | {lin['acc']:.3f} | "
                         f"{lin['auc']:.3f} |")
        for p in published(data):  # an end-to-end supervised row sits in the linear columns
            lin_acc, lin_auc = (p.linear_acc, p.linear_auc) if p.linear_acc is not None else (p.acc, p.auc)
            lines.append(f"| *{p.label()}* | | | | | {p.knn_acc if p.knn_acc else ''} | | {lin_acc:.3f} | "
                         f"{lin_auc if lin_auc else ''} |")
    return "\n".join(lines)


def seed_table(out_dir: Path, datasets: list[str]) -> str:
    """Test ACC over repeated seeds: one row per method with at least one `-seed{N}` result."""
    lines = []
    for data in datasets:
        rows = []
        for name in METHODS:
            files = sorted(out_dir.glob(f"{name}-seed*_{data}.json"))
            if not files or not (out_dir / f"{name}_{data}.json").exists():
                continue
            runs = [json.loads((out_dir / f"{name}_{data}.json").read_text())]
            runs += [json.loads(f.read_text()) for f in files]
            cells = []
            for protocol in ("knn_test", "linear_test"):
                accs = [r[protocol]["acc"] for r in runs]
                cells.append(" / ".join(f"{a:.3f}" for a in accs))
                cells.append(f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}")
            rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        if rows:
            lines.append(f"\n**{data}**, repeated seeds (seed 0 first; mean ± sample std)\n")
            lines.append("| method | runs | k-NN ACC per seed | k-NN mean | linear ACC per seed | linear mean |")
            lines.append("| --- | --- | --- | --- | --- | --- |")
            lines += rows
    return "\n".join(lines)


def run_name(name: str, seed: int) -> str:
    """Result name of one run: seed 0 (the main table) keeps the method's name."""
    return name if seed == 0 else f"{name}-seed{seed}"


def pretrain_command(name: str, data: str, args: argparse.Namespace, seed: int) -> list[str]:
    """The pretrain_probe.py call for one (method, data set, seed)."""
    backbone, sets = METHODS[name]
    backbone = args.vit if backbone.startswith("vit") else args.resnet
    method = name.split("-triplet")[0]
    cmd = [sys.executable, "benchmarks/pretrain_probe.py", "--method", method, "--data", data,
           "--backbone", backbone, "--budget-min", str(args.budget_min), "--out-dir", args.out_dir,
           "--name", run_name(name, seed), "--batch-size", str(args.batch_size),
           "--calibrate-s", str(args.calibrate_s)]
    for s in sets + args.sets + ([f"train.seed={seed}"] if seed else []):
        cmd += ["--set", s]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=8.0)
    ap.add_argument("--data", nargs="+", default=["bloodmnist", "pneumoniamnist"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--resnet", default="resnet18-quarter", help="backbone of the ResNet methods")
    ap.add_argument("--vit", default="vit-tiny", help="backbone of the patch-token methods (MAE, I-JEPA)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--calibrate-s", type=float, default=20.0, help="seconds of the img/s calibration run")
    ap.add_argument("--out-dir", default="benchmarks/out/ssl_methods")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="section.key=value override for every method (e.g. views.color_jitter=0.8)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[],
                    help="run these seeds instead of seed 0 (the main table), e.g. --seeds 1 2")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    if not args.table_only:
        for data in args.data:
            for name in args.methods:
                for seed in args.seeds or [0]:
                    if (out / f"{run_name(name, seed)}_{data}.json").exists():
                        continue  # resumable: finished runs are kept
                    cmd = pretrain_command(name, data, args, seed)
                    print(" ".join(cmd), flush=True)
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    print(res.stdout.strip().splitlines()[-1] if res.returncode == 0 else res.stderr[-2000:],
                          flush=True)
    print(table(out, args.data))
    print(seed_table(out, args.data))


if __name__ == "__main__":
    main()
