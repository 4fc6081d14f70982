"""ACC and AUC exactly as MedMNIST's evaluator computes them (``medmnist/evaluator.py``).

* multi-class and ordinal: ACC of the arg-max; AUC = mean of one-vs-rest AUCs over classes;
* binary: ACC of score[:, -1] > 0.5; AUC of score[:, -1];
* multi-label: ACC and AUC averaged over labels, each thresholded at 0.5.

Both thresholds are strict (a score of exactly 0.5 is negative): ``y_score > threshold`` in
``getACC`` of the medmnist package since v2 (2021; checked against v3.0.2), for binary and
multi-label alike. Only MedMNIST v1 (2020) used ``>=`` for multi-label.

Scores are probabilities: softmax rows for multi-class/binary/ordinal, sigmoid per label for
multi-label.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

from medlatent.data.catalogue import BINARY, MULTI_LABEL


def medmnist_acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """Accuracy. y_true: (N,) or (N, L) ints; y_score: (N, K) probabilities."""
    y_true, y_score = _squeeze(y_true), np.asarray(y_score)
    if task == MULTI_LABEL:
        pred = y_score > threshold
        return float(np.mean([accuracy_score(y_true[:, i], pred[:, i]) for i in range(y_true.shape[1])]))
    if task == BINARY:
        return float(accuracy_score(y_true, y_score[:, -1] > threshold))
    return float(accuracy_score(y_true, y_score.argmax(-1)))


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """Area under the ROC curve (macro one-vs-rest for multi-class)."""
    y_true, y_score = _squeeze(y_true), np.asarray(y_score)
    if task == MULTI_LABEL:
        return float(np.mean([_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]))
    if task == BINARY:
        return _auc(y_true, y_score[:, -1])
    return float(np.mean([_auc((y_true == i).astype(float), y_score[:, i]) for i in range(y_score.shape[1])]))


def balanced_acc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """Mean per-class recall (not defined by MedMNIST; reported beside ACC for imbalanced sets)."""
    y_true, y_score = _squeeze(y_true), np.asarray(y_score)
    if task == MULTI_LABEL:
        pred = y_score > 0.5
        return float(np.mean([balanced_accuracy_score(y_true[:, i], pred[:, i]) for i in range(y_true.shape[1])]))
    pred = (y_score[:, -1] > 0.5).astype(int) if task == BINARY else y_score.argmax(-1)
    return float(balanced_accuracy_score(y_true, pred))


def evaluate(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """{"acc", "auc", "balanced_acc"} for one set of predictions."""
    return dict(acc=medmnist_acc(y_true, y_score, task), auc=medmnist_auc(y_true, y_score, task),
                balanced_acc=balanced_acc(y_true, y_score, task))


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    if len(np.unique(y)) < 2:  # AUC is undefined with one class present
        return float("nan")
    return float(roc_auc_score(y, s))


def _squeeze(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def confusion(y_true: np.ndarray, y_score: np.ndarray, task: str, n_classes: int) -> np.ndarray | None:
    """(K, K) counts, rows = true class, columns = predicted (None for multi-label tasks)."""
    if task == MULTI_LABEL:
        return None
    y_true = _squeeze(y_true)
    pred = (np.asarray(y_score)[:, -1] > 0.5).astype(int) if task == BINARY else np.asarray(y_score).argmax(-1)
    return confusion_matrix(y_true, pred, labels=list(range(n_classes)))
