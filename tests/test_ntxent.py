from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medlatent.losses import NTXentLoss


def naive_ntxent(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> torch.Tensor:
    """Eq. 1 of Chen et al. (2020), written as the paper states it, one anchor at a time."""
    z = torch.cat([z_a, z_b]).double()
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sim = [float(F.cosine_similarity(z[i], z[k], dim=0)) for k in range(n2)]
        num = math.exp(sim[j] / t)
        den = sum(math.exp(sim[k] / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return torch.tensor(total / n2)


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (5, 8, 0.1), (16, 32, 0.2), (7, 128, 1.0)])
def test_matches_the_paper_formula(n: int, d: int, t: float):
    g = torch.Generator().manual_seed(n * 100 + d)
    z_a, z_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ours = NTXentLoss(temperature=t)(z_a, z_b)
    assert abs(float(ours) - float(naive_ntxent(z_a, z_b, t))) < 1e-5


def test_identical_embeddings_with_huge_temperature_give_log_2n_minus_1():
    n = 8
    z = torch.ones(n, 4)
    loss = NTXentLoss(temperature=1e8)(z, z)
    assert abs(float(loss) - (-math.log(1 / (2 * n - 1)))) < 1e-5


def test_perfectly_aligned_pairs_have_low_loss():
    z = torch.eye(6) * 10
    assert float(NTXentLoss(temperature=0.05)(z, z)) < 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature must be positive"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


def test_bf16_inputs_give_fp32_loss():
    z_a, z_b = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert NTXentLoss()(z_a, z_b).dtype == torch.float32
