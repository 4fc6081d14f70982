"""Each loss against a naive implementation written from its paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medlatent.losses import BatchContrastLoss, BYOLLoss, DINOLoss, InfoNCELoss, MaskedPatchLoss, TripletLoss

SHAPES = [(3, 4, 5), (8, 16, 32), (5, 128, 7)]  # (N, D, K)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_infonce_matches_moco_eq1(n: int, d: int, k: int):
    q, key, queue, t = rand(n, d, seed=1), rand(n, d, seed=2), rand(k, d, seed=3), 0.2
    total = 0.0
    for i in range(n):
        qi = unit(q[i].double())
        pos = math.exp(float(qi @ unit(key[i].double())) / t)
        neg = sum(math.exp(float(qi @ unit(queue[j].double())) / t) for j in range(k))
        total += -math.log(pos / (pos + neg))
    assert abs(float(InfoNCELoss(t)(q, key, queue)) - total / n) < 1e-5


@pytest.mark.parametrize("n,d,_k", SHAPES)
def test_mocov3_contrast_matches_algorithm1(n: int, d: int, _k: int):
    q, k, t = rand(n, d, seed=4), rand(n, d, seed=5), 0.3
    total = 0.0
    for i in range(n):
        logits = [float(unit(q[i].double()) @ unit(k[j].double())) / t for j in range(n)]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    assert abs(float(BatchContrastLoss(t)(q, k)) - total / n * 2 * t) < 1e-5


@pytest.mark.parametrize("n,d,_k", SHAPES)
def test_byol_loss_matches_eq2(n: int, d: int, _k: int):
    p, z = rand(n, d, seed=6), rand(n, d, seed=7)
    naive = sum(float(((unit(p[i].double()) - unit(z[i].double())) ** 2).sum()) for i in range(n)) / n
    assert abs(float(BYOLLoss()(p, z)) - naive) < 1e-5


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_triplet_loss_with_batch_hard_negatives(n: int, d: int, k: int):
    a, b, neg, margin = rand(n, d, seed=8), rand(n, d, seed=9), rand(k, d, seed=10), 0.3
    dist = lambda u, v: 1 - float(unit(u.double()) @ unit(v.double()))  # noqa: E731
    # in-batch: negatives are every view of every other image
    total = 0.0
    for i in range(n):
        cands = [a[j] for j in range(n) if j != i] + [b[j] for j in range(n) if j != i]
        d_neg = min(dist(a[i], c) for c in cands) if cands else float("inf")
        total += max(0.0, dist(a[i], b[i]) - d_neg + margin)
    if n > 1:
        assert abs(float(TripletLoss(margin)(a, b)) - total / n) < 1e-5
    # with a queue of negatives
    total = sum(max(0.0, dist(a[i], b[i]) - min(dist(a[i], c) for c in neg) + margin) for i in range(n))
    assert abs(float(TripletLoss(margin)(a, b, negatives=neg)) - total / n) < 1e-5


@pytest.mark.parametrize("n_local,b,k", [(0, 3, 5), (2, 4, 8), (6, 2, 16)])
def test_dino_loss_matches_algorithm1(n_local: int, b: int, k: int):
    v = 2 + n_local
    student, teacher = rand(v * b, k, seed=11), rand(2 * b, k, seed=12)
    center = rand(1, k, seed=13) * 0.1
    loss_fn = DINOLoss(k, n_global=2, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(center)
    tt = 0.05
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(v):
            if i == j:
                continue
            for s in range(b):
                p_t = F.softmax((teacher[i * b + s].double() - center[0].double()) / tt, dim=0)
                log_p_s = F.log_softmax(student[j * b + s].double() / 0.1, dim=0)
                total += float(-(p_t * log_p_s).sum()) / b
            pairs += 1
    assert abs(float(loss_fn(student, teacher, tt)) - total / pairs) < 1e-5


def test_dino_centre_update_known_numbers():
    loss_fn = DINOLoss(3, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    loss_fn.update_center(torch.tensor([[2.0, 2.0, 2.0], [4.0, 0.0, 2.0]]))  # batch mean (3, 1, 2)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 + 0.3, 0.1, -0.9 + 0.2]]))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_on_masked_patches_only(norm_pix: bool):
    b, length, p = 3, 10, 12
    pred, target = rand(b, length, p, seed=14), rand(b, length, p, seed=15)
    mask = (torch.rand(b, length, generator=torch.Generator().manual_seed(16)) > 0.5).float()
    total, count = 0.0, 0
    for i in range(b):
        for j in range(length):
            if mask[i, j]:
                t = target[i, j].double()
                if norm_pix:
                    t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
                total += float(((pred[i, j].double() - t) ** 2).mean())
                count += 1
    assert abs(float(MaskedPatchLoss(norm_pix)(pred, target, mask)) - total / count) < 1e-5


def test_bad_arguments():
    for cls in (InfoNCELoss, BatchContrastLoss):
        with pytest.raises(ValueError, match="temperature"):
            cls(0.0)
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(-1.0)
