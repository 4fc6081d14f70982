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
import resource
import shutil
import time
from pathlib import Path

import torch

from calibrate import epochs_for_budget, median_images_per_second  # benchmarks/calibrate.py
from medlatent.api import probe, run_pretraining
from medlatent.config import PretrainConfig

# Published test-set results at 28 px (ACC / AUC where given).
PUBLISHED = {
    "bloodmnist": [("MedMNIST v2 ResNet-18 (28), supervised", 0.958, 0.998),
                   ("MedMNIST+ frozen ImageNet DINO ViT-B/16, linear probe (28)", 0.888, None),
                   ("MedMNIST+ frozen ImageNet DINO ViT-B/16, k-NN (28)", 0.852, None)],
    "pneumoniamnist": [("MedMNIST v2 ResNet-18 (28), supervised", 0.854, 0.944),
                       ("MedMNIST+ frozen ImageNet DINO ViT-B/16, linear probe (28)", 0.866, None),
                       ("MedMNIST+ frozen ImageNet DINO ViT-B/16, k-NN (28)", 0.857, None)],
}


def make_config(args: argparse.Namespace, epochs: float, budget_s: float) -> PretrainConfig:
    import yaml

    cfg = PretrainConfig()
    cfg.data.name = args.data
    cfg.method = args.method
    cfg.backbone.name = args.backbone
    cfg.train.epochs = epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.time_budget_s = budget_s
    for s in args.sets:
        key, value = s.split("=", 1)
        section, name = key.split(".")
        if section == "method_options":
            cfg.method_options[name] = yaml.safe_load(value)
        else:
            setattr(getattr(cfg, section), name, yaml.safe_load(value))
    return cfg


def calibrate(args: argparse.Namespace, out_dir: Path, seconds: float = 20.0) -> float:
    """Images per second of this method here, from a short throwaway run (first steps excluded)."""
    # one folder per process: two runs of one method and data set (seeds) may calibrate at once
    tmp = out_dir / f".calibrate-{args.name or args.method}-{args.data}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = make_config(args, 1000, seconds)
    cfg.train.log_every = 2
    run, _ = run_pretraining(cfg, tmp)
    ips = median_images_per_second(run)
    shutil.rmtree(tmp, ignore_errors=True)
    return ips


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
    n_train = {"bloodmnist": 11959, "pneumoniamnist": 4708}.get(args.data, 10000)
    epochs = args.epochs
    ips_calibrated = None
    if not epochs:
        ips_calibrated = calibrate(args, out_dir, args.calibrate_s)
        epochs = epochs_for_budget(ips_calibrated, n_train, budget_s)
    cfg = make_config(args, epochs, budget_s)
    run_dir = out_dir / f"run-{args.method}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    run, fit = run_pretraining(cfg, run_dir)
    pretrain_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = probe(run, splits=("val", "test"))
    probe_s = time.perf_counter() - t1
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ips = sorted(m["images_per_s"] for m in metrics if "images_per_s" in m)
    test = {r["protocol"]: r for r in result["summary"] if r["split"] == "test"}
    env = json.loads((run / "env.json").read_text())
    out = dict(method=args.method, data=args.data, backbone=args.backbone, epochs=epochs, budget_min=args.budget_min,
               calibrated_images_per_s=ips_calibrated, status=fit.status, steps=fit.step, total_steps=fit.total_steps,
               pretrain_s=pretrain_s, probe_s=probe_s, images_per_s_median=ips[len(ips) // 2] if ips else None,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               knn_test=test["knn"], linear_test=test["linear"], sets=args.sets,
               machine=dict(cpu=env["cpu"], cores=os.cpu_count(), torch=torch.__version__, gpu=env["cuda"],
                            autocast=env["autocast"], channels_last=env["channels_last"],
                            python=platform.python_version()),
               published=PUBLISHED.get(args.data, []))
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
