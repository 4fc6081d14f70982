"""Pretrain one self-supervised method on a MedMNIST subset (train split, no labels) within a
wall-clock budget on this machine, then k-NN and linear probe on the test split.

The number of epochs is either given or calibrated: a 20-second run measures img/s, and the
epochs (fractional, to 0.01) are chosen so the whole cosine schedule fills the budget (a
budgeted run is then a complete run, not a truncated one, and no method is left with unused
minutes because its epochs were rounded down). Prints a JSON line and writes it to --out-dir.

    python benchmarks/pretrain_probe.py --method simclr --data bloodmnist --budget-min 30 --epochs 33
    python benchmarks/pretrain_probe.py --method byol --data pneumoniamnist --budget-min 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from calibrate import config_images_per_second, epochs_for_budget, median_images_per_second, train_images
from common import peak_rss_gib  # benchmarks/common.py
from medlatent.api import probe, run_pretraining
from medlatent.config import PretrainConfig, apply_set, from_dict
from medlatent.errors import ConfigError
from medlatent.eval.published import published


def make_config(args: argparse.Namespace, epochs: float, budget_s: float) -> PretrainConfig:
    """The run's config: the flags, then each --set, with keys, types and ranges checked."""
    tree = {"data": {"name": args.data}, "method": args.method, "backbone": {"name": args.backbone},
            "train": {"epochs": epochs, "batch_size": args.batch_size, "time_budget_s": budget_s}}
    for s in args.sets:
        apply_set(tree, s)
    return from_dict(PretrainConfig, tree)


def calibrate(args: argparse.Namespace, out_dir: Path, budget_s: float) -> tuple[float, float]:
    """``(img/s, epochs)`` of this method here, from a short throwaway run of the same config."""
    # one folder per process: two runs of one method and data set (seeds) may calibrate at once
    tmp = out_dir / f".calibrate-{args.name or args.method}-{args.data}-{os.getpid()}"
    ips = config_images_per_second(make_config(args, 1.0, budget_s), tmp, args.calibrate_s)
    return ips, epochs_for_budget(ips, train_images(args.data), budget_s)


def published_json(data: str) -> list[tuple[str, float, float | None]]:
    """The published rows as this script's JSON holds them: (label, ACC, AUC) per protocol."""
    return [(p.label(protocol), acc, auc) for p in published(data) for protocol, acc, auc in p.results()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--data", default="bloodmnist")
    ap.add_argument("--backbone", default="resnet18-quarter")
    ap.add_argument("--epochs", type=float, default=0, help="0: calibrate to fill --budget-min")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget for pretraining")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value overrides")
    ap.add_argument("--out-dir", default="benchmarks/out")
    ap.add_argument("--keep-run", action="store_true")
    ap.add_argument("--name", default=None, help="result file name (default: the method)")
    ap.add_argument("--calibrate-s", type=float, default=20.0,
                    help="length of the throwaway img/s run (a GPU needs fewer seconds than a CPU)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    budget_s = args.budget_min * 60
    try:
        make_config(args, args.epochs or 1.0, budget_s)  # a bad --set stops here, before any calibration
    except ConfigError as e:
        raise SystemExit(f"pretrain_probe.py: {e}") from None
    epochs, ips_calibrated = args.epochs, None
    if not epochs:
        ips_calibrated, epochs = calibrate(args, out_dir, budget_s)
    cfg = make_config(args, epochs, budget_s)
    run_dir = out_dir / f"run-{args.method}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    run, fit = run_pretraining(cfg, run_dir)
    pretrain_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = probe(run, splits=("val", "test"))
    probe_s = time.perf_counter() - t1
    test = {r["protocol"]: r for r in result["summary"] if r["split"] == "test"}
    env = json.loads((run / "env.json").read_text())
    out = dict(method=args.method, data=args.data, backbone=args.backbone, epochs=epochs, budget_min=args.budget_min,
               calibrated_images_per_s=ips_calibrated, status=fit.status, steps=fit.step, total_steps=fit.total_steps,
               pretrain_s=pretrain_s, probe_s=probe_s,
               images_per_s_median=median_images_per_second(run, skip_warmup=False),
               peak_rss_gib=peak_rss_gib(),
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               knn_test=test["knn"], linear_test=test["linear"], sets=args.sets,
               machine=dict(cpu=env["cpu"], cores=os.cpu_count(), torch=torch.__version__, gpu=env["cuda"],
                            autocast=env["autocast"], channels_last=env["channels_last"],
                            python=platform.python_version()),
               published=published_json(args.data))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name or args.method}_{args.data}.json").write_text(json.dumps(out, indent=1))
    if not args.keep_run and (run / "encoder.safetensors").is_file():  # a budget-stopped run keeps its checkpoint
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    k, lin = test["knn"], test["linear"]
    print(json.dumps(dict(method=args.name or args.method, data=args.data, epochs=epochs, status=fit.status,
                          minutes=round(pretrain_s / 60, 1), ips=round(out["images_per_s_median"] or 0),
                          knn_acc=round(k["acc"], 4), knn_auc=round(k["auc"], 4),
                          linear_acc=round(lin["acc"], 4), linear_auc=round(lin["auc"], 4),
                          peak_rss_gib=round(out["peak_rss_gib"], 2))))


if __name__ == "__main__":
    main()
