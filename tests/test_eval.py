from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from medlatent.data.catalogue import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from medlatent.errors import ConfigError
from medlatent.eval.fractions import label_fraction
from medlatent.eval.knn import knn_scores
from medlatent.eval.linear import linear_probe
from medlatent.eval.metrics import medmnist_acc, medmnist_auc

rng = np.random.default_rng(0)


@pytest.mark.parametrize("task", [MULTI_CLASS, ORDINAL])
def test_multiclass_metrics_agree_with_sklearn(task: str):
    y = rng.integers(0, 5, (300, 1))
    s = rng.dirichlet(np.ones(5), 300)
    assert medmnist_acc(y, s, task) == pytest.approx(accuracy_score(y[:, 0], s.argmax(1)))
    assert medmnist_auc(y, s, task) == pytest.approx(roc_auc_score(y[:, 0], s, multi_class="ovr", average="macro"))


def test_binary_metrics_agree_with_sklearn():
    y = rng.integers(0, 2, (200, 1))
    s = rng.dirichlet(np.ones(2), 200)
    assert medmnist_acc(y, s, BINARY) == pytest.approx(accuracy_score(y[:, 0], s[:, 1] > 0.5))
    assert medmnist_auc(y, s, BINARY) == pytest.approx(roc_auc_score(y[:, 0], s[:, 1]))


def test_multilabel_metrics_agree_with_sklearn():
    y = rng.integers(0, 2, (200, 4))
    s = rng.random((200, 4))
    assert medmnist_acc(y, s, MULTI_LABEL) == pytest.approx(np.mean([accuracy_score(y[:, i], s[:, i] > 0.5) for i in range(4)]))
    assert medmnist_auc(y, s, MULTI_LABEL) == pytest.approx(roc_auc_score(y, s, average="macro"))


def test_knn_matches_a_naive_weighted_vote():
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    q = torch.randn(7, 6, generator=g)
    ours = knn_scores(tx, ty, q, 3, k=5, temperature=0.1)
    for i in range(7):
        sims = torch.nn.functional.cosine_similarity(q[i : i + 1], tx)
        top = sims.argsort(descending=True)[:5]
        votes = torch.zeros(3)
        for j in top:
            votes[ty[j]] += torch.exp(sims[j] / 0.1)
        assert torch.allclose(ours[i], votes / votes.sum(), atol=1e-5)


def test_knn_multilabel_scores_are_label_means():
    tx = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ty = torch.tensor([[1, 0], [1, 1], [0, 1]])
    s = knn_scores(tx, ty, torch.tensor([[1.0, 0.0]]), 2, multi_label=True, k=2)
    assert s[0, 0] == pytest.approx(1.0) and 0 < float(s[0, 1]) < 0.5


def test_linear_probe_learns_a_separable_task_and_beats_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g)
    probe = linear_probe(x[:300], y[:300], x[300:350], y[300:350], MULTI_CLASS, 4)
    s = probe.scores(x[350:]).numpy()
    assert medmnist_acc(y[350:, None].numpy(), s, MULTI_CLASS) > 0.9
    assert probe.weight_decay in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def test_label_fraction_is_stratified_and_reproducible():
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)[:, None]
    a = label_fraction(y, 0.1, seed=3)
    b = label_fraction(y, 0.1, seed=3)
    c = label_fraction(y, 0.1, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(y[a, 0], minlength=3).tolist()
    assert counts == [9, 1, 1]  # every class kept, ceil(10%) per class
    assert len(label_fraction(y, 1.0, 0)) == 100
    with pytest.raises(ConfigError):
        label_fraction(y, 0.0, 0)
