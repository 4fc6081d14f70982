"""Shared mechanics with known numbers: EMA, schedules, the queue, masking, patches, multi-crop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medlatent.ssl.ijepa import IJEPAConfig, sample_masks
from medlatent.methods.mechanics import (FIFOQueue, cosine_schedule, ema_update, forward_multicrop, gather_tokens,
                                     group_by_size, linear_warmup, make_teacher, patchify, random_masking,
                                     sincos_positions, unpatchify)


def test_ema_update_known_numbers():
    student = nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(3.0)
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, 6.0]]))
        student.bias.fill_(-1.0)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.tensor([[1.5, 3.0]]))  # 0.75 * old + 0.25 * new
    assert torch.allclose(teacher.bias, torch.tensor([2.0]))
    bn_s, bn_t = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    bn_s.running_mean.fill_(5.0)
    ema_update(bn_t, bn_s, 0.9)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers copied


def test_schedules():
    assert cosine_schedule(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_schedule(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_schedule(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert linear_warmup(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(20, 10, 0.04, 0.07) == pytest.approx(0.07)


def test_queue_is_fifo_and_wraps_around():
    q = FIFOQueue(5, 2)
    q.push(torch.tensor([[1.0, 1], [2, 2]]))
    q.push(torch.tensor([[3.0, 3], [4, 4]]))
    assert q.keys[:4, 0].tolist() == [1, 2, 3, 4] and int(q.ptr) == 4
    q.push(torch.tensor([[5.0, 5], [6, 6], [7, 7]]))  # wraps: 5 at slot 4, 6 and 7 overwrite the oldest
    assert q.keys[:, 0].tolist() == [6, 7, 3, 4, 5] and int(q.ptr) == 2
    q.push(torch.arange(14.0).view(7, 2))  # more keys than slots: the newest five remain
    assert sorted(q.keys[:, 0].tolist()) == [4.0, 6, 8, 10, 12]
    assert "keys" in q.state_dict() and "ptr" in q.state_dict()  # checkpointed


def test_random_masking_ratio_and_restore_order():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(4, 49, 0.75, torch.device("cpu"), g)
    assert keep.shape == (4, 12) and mask.shape == (4, 49)
    assert torch.all(mask.sum(1) == 37)  # exactly round(49 * 0.75) masked per sample
    for i in range(4):
        assert torch.all(mask[i, keep[i]] == 0)  # kept patches are exactly the unmasked ones
    tokens = torch.arange(49.0).repeat(4, 1).unsqueeze(-1)  # token j carries value j
    visible = gather_tokens(tokens, keep)
    filler = torch.full((4, 37, 1), -1.0)
    shuffle = restore.argsort(dim=1)
    masked_ids = shuffle[:, 12:]
    filler = gather_tokens(tokens, masked_ids)
    back = gather_tokens(torch.cat([visible, filler], dim=1), restore)
    assert torch.equal(back, tokens)  # [visible, masked] put back in original order


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((2, 1, 28, 28), 4), ((1, 2, 8, 8, 8), 4)])
def test_patchify_roundtrip_and_order(shape: tuple, p: int):
    x = torch.randn(*shape)
    patches = patchify(x, p)
    d = len(shape) - 2
    assert patches.shape == (shape[0], (shape[-1] // p) ** d, p**d * shape[1])
    assert torch.equal(unpatchify(patches, p, shape[1], tuple(shape[2:])), x)
    if d == 2:  # patch 1 is the top row's second patch, as a strided conv would see it
        assert torch.equal(patches[0, 1].view(p, p, shape[1]).permute(2, 0, 1), x[0, :, :p, p:2 * p])


def test_sincos_positions():
    pos = sincos_positions(7, 32, 2)
    # per axis 16 channels: 8 sines then 8 cosines; at the origin sin = 0, cos = 1
    assert pos.shape == (49, 32) and torch.equal(pos[0], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    assert len(torch.unique(pos, dim=0)) == 49


def test_multicrop_grouping():
    views = [torch.zeros(2, 1, 28, 28)] * 2 + [torch.zeros(2, 1, 12, 12)] * 3
    assert group_by_size(views) == [(0, 2), (2, 5)]
    calls = []

    def encoder(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.flatten(1)[:, :3]

    out = forward_multicrop(encoder, views)
    assert calls == [(4, 1, 28, 28), (6, 1, 12, 12)] and out.shape == (10, 3)


def test_ijepa_masks_remove_targets_from_context():
    g = torch.Generator().manual_seed(0)
    ctx, tgts = sample_masks(6, 7, 2, IJEPAConfig(), g)
    assert ctx.shape[0] == 6 and len(tgts) == 4
    for i in range(6):
        taken = torch.cat([t[i] for t in tgts])
        assert not torch.isin(ctx[i], taken).any()
    assert all(t.shape[1] >= 1 for t in tgts)
