"""The linear probe at every L2 penalty of its grid, on val and test: which penalty the val split
picks, and what each would have given on test (a diagnostic; the reported probe is always the
val-picked one, see ``medlatent.eval.linear``).

    python benchmarks/probe_grid.py benchmarks/out/ssl_methods_40min/run-simclr-pneumoniamnist-...

For binary tasks it also prints sensitivity (class 1 found) and specificity (class 0 kept), which
show whether a val/test gap is an operating-point shift rather than a worse ranking (AUC).
"""

from __future__ import annotations

import argparse

import numpy as np

from medlatent.eval.linear import WEIGHT_DECAYS, fit_logistic, linear_probe
from medlatent.eval.metrics import medmnist_acc, medmnist_auc
from medlatent.eval.session import RunEvaluation

EXTRA_DECAYS = (1e-1, 1.0)  # beyond the probe's grid, to see the trend


def split_line(ev: RunEvaluation, split: str, scores: np.ndarray) -> str:
    """ACC and AUC of (N, K) scores on one split; sensitivity and specificity when binary."""
    y = ev.split(split).labels.numpy()
    text = f"{split} ACC {medmnist_acc(y, scores, ev.task):.4f} AUC {medmnist_auc(y, scores, ev.task):.4f}"
    if ev.data.n_classes == 2 and not ev.multi_label:
        pred, truth = scores.argmax(1), y[:, 0]
        text += f" sens {(pred[truth == 1] == 1).mean():.3f} spec {(pred[truth == 0] == 0).mean():.3f}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run folders with an encoder checkpoint")
    args = ap.parse_args()
    for run in args.runs:
        ev = RunEvaluation(run, device="cpu")
        tx, ty = ev.features("train"), ev.target("train")
        picked = linear_probe(tx, ty, ev.features("val"), ev.target("val"), ev.task, ev.data.n_classes)
        print(f"{run}: {tuple(tx.shape)} train features; val picks L2 {picked.weight_decay:g}")
        for wd in WEIGHT_DECAYS + EXTRA_DECAYS:
            probe = fit_logistic(tx, ty, ev.data.n_classes, ev.multi_label, wd)
            lines = [split_line(ev, s, probe.scores(ev.features(s).float()).numpy()) for s in ("val", "test")]
            mark = "*" if wd == picked.weight_decay else " "
            print(f" {mark} L2 {wd:<6g} | " + " | ".join(lines), flush=True)


if __name__ == "__main__":
    main()
