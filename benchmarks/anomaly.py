"""Anomaly detection from normal images only: every detector on PneumoniaMNIST (normal vs
pneumonia), BreastMNIST (normal + benign vs malignant) and BloodMNIST one-vs-rest (each class
in turn as "normal", mean over classes), at the same training budget per detector.

    python benchmarks/anomaly.py --budget-min 3 --encoder pneumoniamnist=RUN --encoder bloodmnist=RUN
    python benchmarks/anomaly.py --table-only

Reconstruction detectors are trained here (`medlatent anomaly fit`, epochs calibrated so the
cosine schedule fills the budget, see calibrate.py); the feature detector uses
an existing self-supervised encoder run per data set (`--encoder DATA=RUN`), pretrained on
unlabelled images. Each result is a JSON in --out-dir; the script is resumable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from calibrate import calibrated_epochs, run_budgeted, run_cli  # benchmarks/calibrate.py
from common import SMALL_BATCH_DIFFUSION  # benchmarks/common.py

PROTOCOLS = {"pneumoniamnist": [[0]], "breastmnist": [[1]], "bloodmnist": [[c] for c in range(8)]}
DETECTORS = ["ae", "dae", "vae", "ddpm", "knn"]
# Pixel-space DDPM on a CPU: at batch 256 a 3-minute budget is 20 optimiser steps (common.py).
OVERRIDES = {"ddpm": SMALL_BATCH_DIFFUSION}


def n_normal(data: str, normal: list[int]) -> int:
    """Training images of the normal classes (the detector's epoch length)."""
    from medlatent.data.medmnist import load_medmnist

    labels = load_medmnist(data, splits=("train",)).splits["train"].labels
    return int(np.isin(labels.numpy().reshape(-1), normal).sum())


def result_dir(out_dir: str, data: str, normal: list[int], detector: str, score: str) -> Path:
    """One folder per (protocol, detector, score); the L2 folders keep their original names."""
    suffix = "" if score == "l2" else f"_{score}"
    return Path(out_dir) / f"{data}_{'-'.join(map(str, normal))}_{detector}{suffix}"


def one(data: str, normal: list[int], detector: str, score: str, args: argparse.Namespace,
        encoders: dict[str, str]) -> dict:
    tag = f"{data}_{'-'.join(map(str, normal))}_{detector}"
    out = result_dir(args.out_dir, data, normal, detector, score)
    normal_s = ",".join(map(str, normal))
    if detector == "knn":
        if data not in encoders:
            return {}
        run_cli("anomaly", "score", encoders[data], "--detector", "knn", "--normal", normal_s, "--data", data,
            "--out", str(out))
    else:
        run = Path(args.out_dir) / f"run-{tag}"
        if not (run / "config.yaml").exists():
            fit = ["anomaly", "fit", "--data", data, "--normal", normal_s, "--method", detector,
                   *OVERRIDES.get(detector, [])]
            budget_s = args.budget_min * 60
            _, epochs = calibrated_epochs(fit, n_normal(data, normal), budget_s,
                                          Path(args.out_dir) / f".calibrate-{tag}", 15.0)
            run_budgeted(fit, epochs, budget_s, run)
        run_cli("anomaly", "score", str(run), "--score", score, "--out", str(out))
    return json.loads((out / "anomaly.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", default=list(PROTOCOLS))
    ap.add_argument("--detectors", nargs="+", default=DETECTORS)
    ap.add_argument("--encoder", action="append", default=[], help="DATA=RUN for the k-NN feature detector")
    ap.add_argument("--normal-classes", nargs="+", type=int, default=None,
                    help="only the protocols whose normal class is one of these (to split one-vs-rest over cores)")
    ap.add_argument("--budget-min", type=float, default=3.0)
    ap.add_argument("--scores", nargs="+", default=["l2"], choices=["l2", "l1", "ssim"],
                    help="pixel scores for the reconstruction detectors (k-NN: feature distance)")
    ap.add_argument("--out-dir", default="benchmarks/out/anomaly")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    encoders = dict(e.split("=", 1) for e in args.encoder)
    results: dict[tuple[str, str, str], list[dict]] = {}
    for data in args.data:
        for detector in args.detectors:
            for score in (["feature"] if detector == "knn" else args.scores):
                wanted = [p for p in PROTOCOLS[data] if args.normal_classes is None or p[0] in args.normal_classes]
                for normal in wanted:
                    f = result_dir(args.out_dir, data, normal, detector, score if detector != "knn" else "l2")
                    f = f / "anomaly.json"
                    r = json.loads(f.read_text()) if f.exists() else (
                        {} if args.table_only else one(data, normal, detector, score, args, encoders))
                    if r:
                        results.setdefault((data, detector, score), []).append(r)
    print(f"budget {args.budget_min} min of training per detector and protocol; "
          f"threshold mean + 3 std of normal val scores; one-vs-rest rows are means over the protocols")
    print("| data | detector, score | AUROC | AUPRC | sensitivity | specificity | protocols |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (data, detector, score), rs in results.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("auroc", "auprc", "sensitivity", "specificity")}
        print(f"| {data} | {rs[0]['detector']} | {mean['auroc']:.3f} | {mean['auprc']:.3f} | "
              f"{mean['sensitivity']:.3f} | {mean['specificity']:.3f} | {len(rs)} |")


if __name__ == "__main__":
    main()
