"""Pretrain SimCLR on a MedMNIST subset (train split, no labels) within a wall-clock budget on
this machine, then k-NN and linear probe on the test split, beside published results.

Usage:
    python benchmarks/simclr_medmnist.py --data bloodmnist --backbone resnet18-quarter --epochs 40
Writes benchmarks/out/simclr_<data>.json and prints a README table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bloodmnist")
    ap.add_argument("--backbone", default="resnet18-quarter")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--budget-min", type=float, default=30.0, help="hard stop for pretraining")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value overrides")
    ap.add_argument("--out-dir", default="benchmarks/out")
    args = ap.parse_args()

    cfg = PretrainConfig()
    cfg.data.name = args.data
    cfg.backbone.name = args.backbone
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.time_budget_s = args.budget_min * 60
    for s in args.sets:
        import yaml

        key, value = s.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    run_dir = Path(args.out_dir) / f"run-simclr-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"

    last = {"t": 0.0}

    def progress(p) -> None:  # noqa: ANN001
        if time.time() - last["t"] > 60 or p.step == p.total_steps:
            last["t"] = time.time()
            print(f"  step {p.step}/{p.total_steps} loss {p.loss:.3f} {p.images_per_s:.0f} img/s "
                  f"eta {p.eta_s / 60:.1f} min", flush=True)

    t0 = time.perf_counter()
    run, fit = run_pretraining(cfg, run_dir, on_progress=progress)
    pretrain_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = probe(run, splits=("val", "test"))
    probe_s = time.perf_counter() - t1
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ips = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    test = {r["protocol"]: r for r in result["summary"] if r["split"] == "test"}
    env = json.loads((run / "env.json").read_text())
    out = dict(data=args.data, backbone=args.backbone, epochs=args.epochs, status=fit.status,
               steps=fit.step, total_steps=fit.total_steps, pretrain_s=pretrain_s, probe_s=probe_s,
               images_per_s_median=sorted(ips)[len(ips) // 2] if ips else None,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               knn_test=test["knn"], linear_test=test["linear"], run=str(run),
               machine=dict(cpu=env["cpu"], cores=os.cpu_count(), torch=torch.__version__, gpu=env["cuda"],
                            autocast=env["autocast"], channels_last=env["channels_last"],
                            python=platform.python_version()),
               published=PUBLISHED.get(args.data, []))
    path = Path(args.out_dir) / f"simclr_{args.data}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\n{args.data}: SimCLR {args.backbone}, {fit.step}/{fit.total_steps} steps ({fit.status}) in "
          f"{pretrain_s / 60:.1f} min at {out['images_per_s_median']:.0f} img/s, peak RSS {out['peak_rss_gib']:.1f} GiB")
    print("| model | k-NN ACC | k-NN AUC | linear ACC | linear AUC |")
    print("| --- | --- | --- | --- | --- |")
    k, lin = test["knn"], test["linear"]
    where = env["cuda"] or "CPU"
    print(f"| medlatent SimCLR {args.backbone} ({args.epochs} ep, "
          f"{pretrain_s / 60:.1f} min, {where}) | "
          f"{k['acc']:.3f} | {k['auc']:.3f} | {lin['acc']:.3f} | {lin['auc']:.3f} |")
    for name, acc, auc in PUBLISHED.get(args.data, []):
        print(f"| {name} | | | {acc:.3f} | {auc if auc is not None else '-'} |")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
