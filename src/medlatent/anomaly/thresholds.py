"""Turning scores into decisions: thresholds from normal validation data, and the numbers a
clinician reads (sensitivity, specificity at that threshold) beside AUROC and AUPRC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def mean_k_std(normal_scores: np.ndarray, k: float = 3.0) -> float:
    """mean + k * std of the scores of normal validation images."""
    s = np.asarray(normal_scores, dtype=float)
    return float(s.mean() + k * s.std())


def percentile(normal_scores: np.ndarray, q: float = 95.0) -> float:
    """The q-th percentile of normal validation scores (q = 95: about 5 % false alarms)."""
    return float(np.percentile(np.asarray(normal_scores, dtype=float), q))


def parse_rule(rule: str) -> tuple[str, float]:
    """``mean+3std`` -> ("mean_std", 3.0); ``p95`` -> ("percentile", 95.0)."""
    r = rule.replace(" ", "").lower()
    if r.startswith("mean+") and r.endswith("std"):
        return "mean_std", float(r[5:-3] or 1)
    if r.startswith("p"):
        return "percentile", float(r[1:])
    raise ValueError(f"unknown threshold rule {rule!r} (mean+3std, p95, ...)")


def threshold(normal_scores: np.ndarray, rule: str) -> float:
    kind, value = parse_rule(rule)
    return mean_k_std(normal_scores, value) if kind == "mean_std" else percentile(normal_scores, value)


def operating_point(scores: np.ndarray, is_anomaly: np.ndarray, thr: float) -> dict[str, float]:
    """Sensitivity (anomalies flagged) and specificity (normals passed) at ``score > thr``."""
    s, y = np.asarray(scores, dtype=float), np.asarray(is_anomaly, dtype=bool)
    flagged = s > thr
    return dict(threshold=float(thr), sensitivity=float(flagged[y].mean()) if y.any() else float("nan"),
                specificity=float((~flagged[~y]).mean()) if (~y).any() else float("nan"))


def ranking(scores: np.ndarray, is_anomaly: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision, anomalies positive)."""
    y = np.asarray(is_anomaly, dtype=int)
    return dict(auroc=float(roc_auc_score(y, scores)), auprc=float(average_precision_score(y, scores)))
