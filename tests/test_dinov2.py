"""DINOv2: each added loss against a naive loop and a value worked out by hand, the masks, one
training step in 2-D and 3-D, two processes against one, and the ViT-only refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medlatent.config import from_dict
from medlatent.errors import ConfigError
from medlatent.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp

# The method (and MONAI under it) is imported inside the tests that use it, so the two worker
# processes of the last test start in seconds.


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def naive_sinkhorn(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """SwAV's Algorithm 1 written out entry by entry, in float64."""
    n, k = logits.shape
    q = [[math.exp(float(logits[i, j]) / temp) for i in range(n)] for j in range(k)]  # K x N
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]  # every prototype: mass 1/K
        cols = [sum(q[j][i] for j in range(k)) for i in range(n)]
        q = [[q[j][i] / cols[i] / n for i in range(n)] for j in range(k)]  # every sample: mass 1/N
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)], dtype=torch.float64)


def ce(p: torch.Tensor, logits: torch.Tensor, temp: float) -> float:
    return float(-(p.double() * F.log_softmax(logits.double() / temp, dim=-1)).sum())


# ------------------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("n,k,iterations", [(5, 3, 3), (8, 16, 3), (4, 7, 1)])
def test_sinkhorn_matches_naive_loop(n: int, k: int, iterations: int):
    logits = rand(n, k, seed=1)
    got = sinkhorn_knopp(logits, 0.5, iterations)
    assert torch.allclose(got.double(), naive_sinkhorn(logits, 0.5, iterations), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(n), atol=1e-5)  # each sample: a distribution


def test_sinkhorn_known_values_and_equipartition():
    # a symmetric exp(logits / t) = [[2, 1], [1, 2]] is already balanced: rows become (2/3, 1/3), (1/3, 2/3)
    logits = 0.1 * torch.tensor([[2.0, 1.0], [1.0, 2.0]]).log()
    assert torch.allclose(sinkhorn_knopp(logits, 0.1), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)
    # one sample must be spread over every prototype equally
    assert torch.allclose(sinkhorn_knopp(rand(1, 5, seed=2), 0.1), torch.full((1, 5), 0.2), atol=1e-6)
    # run to convergence, Q is doubly stochastic: samples sum to 1, prototypes to N / K
    q = sinkhorn_knopp(rand(6, 3, seed=3), 1.0, n_iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((3,), 2.0), atol=1e-4)
    # a constant per prototype is scaled away by the first row step; one per sample only in the limit
    logits = rand(6, 4, seed=4)
    per_prototype, per_sample = rand(1, 4, seed=5) + 30.0, rand(6, 1, seed=6)
    assert torch.allclose(sinkhorn_knopp(logits, 0.2), sinkhorn_knopp(logits + per_prototype, 0.2), atol=1e-5)
    assert torch.allclose(sinkhorn_knopp(logits, 1.0, 500), sinkhorn_knopp(logits + per_sample, 1.0, 500), atol=1e-4)


# ------------------------------------------------------------------------- DINO loss with Sinkhorn-Knopp


@pytest.mark.parametrize("n_local,b,k", [(0, 3, 5), (2, 4, 8)])
def test_dino_loss_with_sinkhorn_matches_loop(n_local: int, b: int, k: int):
    v = 2 + n_local
    student, teacher = rand(v * b, k, seed=7), rand(2 * b, k, seed=8)
    loss_fn = DINOLoss(k, centring="sinkhorn", sinkhorn_iterations=3)
    assert "center" not in dict(loss_fn.named_buffers())  # no EMA centre to keep
    p_t = naive_sinkhorn(teacher, 0.07, 3)  # over both global crops together, as DINOv2
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(v):
            if i != j:  # cross pairs only
                total += sum(ce(p_t[i * b + s], student[j * b + s], 0.1) for s in range(b)) / b
                pairs += 1
    assert abs(float(loss_fn(student, teacher, 0.07)) - total / pairs) < 1e-5
    with pytest.raises(ValueError, match="centring"):
        DINOLoss(k, centring="mean")


# ------------------------------------------------------------------------- iBOT patch loss


def test_ibot_loss_matches_loop_and_counts_masked_patches_only():
    b, length, k, tt = 4, 6, 5, 0.07
    student, teacher = rand(b, length, k, seed=9), rand(b, length, k, seed=10)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1]]).bool()
    loss_fn = IBOTPatchLoss(student_temp=0.1, sinkhorn_iterations=3)
    got = loss_fn(student, teacher, mask, tt)
    p_t = naive_sinkhorn(teacher[mask], tt, 3)  # over the masked patches of the batch, row-major
    total, row = 0.0, 0
    for i in range(b):
        per_image = []
        for j in range(length):
            if mask[i, j]:
                per_image.append(ce(p_t[row], student[i, j], 0.1))
                row += 1
        total += sum(per_image) / max(1, len(per_image))  # the unmasked image adds 0 but counts
    assert abs(float(got) - total / b) < 1e-5
    # the heads' outputs at the masked patches only give the same loss
    assert torch.allclose(loss_fn(student[mask], teacher[mask], mask, tt), got)
    # what sits at unmasked patches never matters, on either side
    noise = rand(b, length, k, seed=11) * 10 * (~mask).unsqueeze(-1)
    assert torch.allclose(loss_fn(student + noise, teacher - noise, mask, tt), got)


def test_ibot_loss_known_value():
    # uniform student logits over K = 2: log P_s = log 1/2 at every patch, whatever the teacher,
    # so each masked image adds log 2; three images, one of them unmasked: 2/3 log 2
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]]).bool()
    loss = IBOTPatchLoss()(torch.zeros(3, 3, 2), rand(3, 3, 2, seed=12), mask, 0.04)
    assert float(loss) == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="masked patches"):
        IBOTPatchLoss()(torch.zeros(2, 2), torch.zeros(2, 2), mask, 0.04)


# ------------------------------------------------------------------------- KoLeo


def test_koleo_matches_loop_and_known_value():
    x = rand(7, 5, seed=13)
    u = [v / v.norm() for v in x.double()]
    naive = -sum(math.log(min(float((u[i] - u[j]).norm()) for j in range(7) if j != i) + 1e-8) for i in range(7)) / 7
    assert abs(float(KoLeoLoss()(x)) - naive) < 1e-5
    # three unit vectors at 0, 60 and 180 degrees: nearest distances 1, 1 and 2 sin 60 = sqrt 3,
    # so L = -(log 1 + log 1 + log sqrt 3) / 3 = -log(3) / 6; lengths do not matter (normalised)
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    points = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [3.0], [0.5]])
    assert float(KoLeoLoss()(points)) == pytest.approx(-math.log(3) / 6, abs=1e-6)
    twins = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)  # two equal directions
    KoLeoLoss()(twins).backward()
    assert torch.isfinite(twins.grad).all()
    with pytest.raises(ValueError, match="n >= 2"):
        KoLeoLoss()(torch.ones(1, 3))


# ------------------------------------------------------------------------- masks


def test_masks_follow_dinov2_collate():
    from medlatent.ssl.dinov2 import sample_masks

    g = torch.Generator().manual_seed(0)
    mask = sample_masks(20, 49, (0.1, 0.5), 0.5, torch.device("cpu"), g)
    counts = mask.sum(1)
    assert mask.dtype == torch.bool and mask.shape == (20, 49)
    assert int((counts > 0).sum()) == 10  # int(20 * 0.5) crops masked
    masked = counts[counts > 0].sort().values
    edges = torch.linspace(0.1, 0.5, 11)
    # stratified ratios: the i-th smallest count lies in the i-th bin of (0.1, 0.5)
    assert all(int(49 * edges[i]) <= int(c) <= int(49 * edges[i + 1]) for i, c in enumerate(masked))
    again = sample_masks(20, 49, (0.1, 0.5), 0.5, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not sample_masks(4, 49, (0.1, 0.5), 0.0, torch.device("cpu")).any()


# ------------------------------------------------------------------------- the method


def tiny_dinov2(spatial_dims: int) -> tuple[torch.nn.Module, int]:
    from medlatent.nets.backbones import ViTEncoder
    from medlatent.ssl.dinov2 import DINOv2

    size = 16 if spatial_dims == 2 else 8
    enc = ViTEncoder(1, size, 4, hidden_size=24, depth=1, num_heads=2, spatial_dims=spatial_dims)
    return DINOv2(enc, out_dim=16, patch_out_dim=12, hidden_dim=16, bottleneck_dim=8), size


def test_student_never_sees_a_masked_patch():
    torch.manual_seed(0)
    method, size = tiny_dinov2(2)
    x = rand(2, 1, size, size, seed=14)
    none = torch.zeros(2, method.encoder.num_patches, dtype=torch.bool)
    assert torch.allclose(method.forward_student_masked(x, none), method.encoder.tokens(x), atol=1e-6)
    mask = none.clone()
    mask[:, 0] = True  # the top-left 4 x 4 patch
    changed = x.clone()
    changed[:, :, :4, :4] = 5.0
    assert torch.allclose(method.forward_student_masked(x, mask), method.forward_student_masked(changed, mask),
                          atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_step_trains_the_student_and_the_teacher_follows_by_ema(spatial_dims: int):
    torch.manual_seed(0)
    method, size = tiny_dinov2(spatial_dims)
    local = size // 2
    shape = (4, 1)
    views = [rand(*shape, *(size,) * spatial_dims, seed=s) for s in (15, 16)]
    views += [rand(*shape, *(local,) * spatial_dims, seed=s) for s in (17, 18)]
    student = {n: p.detach().clone() for n, p in method.encoder.named_parameters()}
    teacher = {n: p.detach().clone() for n, p in method.teacher_encoder.named_parameters()}
    out = method(views)
    assert torch.isfinite(out.loss) and all(math.isfinite(float(v)) for v in out.logs.values())
    expected = out.logs["dino"] + out.logs["ibot"] + 0.1 * out.logs["koleo"]
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    out.loss.backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    with torch.no_grad():  # one SGD step
        for p in method.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    method.on_step_end(0, 10)
    m = 0.99  # the cosine's start at step 0
    for name, p in method.encoder.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, student[name]), name
        assert torch.allclose(dict(method.teacher_encoder.named_parameters())[name],
                              m * teacher[name] + (1 - m) * p.detach(), atol=1e-6), name
    assert method.current_teacher_temp() == pytest.approx(0.04 + (0.07 - 0.04) * 1 / 3)  # step 1 of a 3-step warm-up
    restored, _ = tiny_dinov2(spatial_dims)
    restored.load_state_dict(method.state_dict())  # resume: the schedule comes back with the weights
    assert restored.current_teacher_temp() == method.current_teacher_temp()


def test_resnet_backbone_is_refused_in_one_line(tmp_path: Path):
    from medlatent import api
    from medlatent.methods.contract import BuildContext
    from medlatent.nets.backbones import build_encoder
    from medlatent.ssl.dinov2 import SPEC, DINOv2Config

    enc = build_encoder("resnet18-quarter", 1, 28)
    with pytest.raises(ConfigError, match="needs a ViT backbone"):
        SPEC.build(enc, DINOv2Config(), BuildContext(64, 8, 28, 1, 2))
    cfg = {"method": "dinov2", "backbone": {"name": "resnet18-quarter"}, "data": {"name": str(tmp_path / "x.npz")}}
    with pytest.raises(ConfigError, match="needs a ViT backbone") as e:
        api.pretrain(cfg, output=tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_config_ranges_are_checked():
    from medlatent.ssl.dinov2 import DINOv2Config

    assert from_dict(DINOv2Config, {}).mask_ratio == (0.1, 0.5)
    for key, value in (("mask_ratio", [0.5, 0.1]), ("koleo_weight", -1.0), ("mask_probability", 1.5),
                       ("sinkhorn_iterations", 0), ("teacher_temp", 0.0)):
        with pytest.raises(ConfigError, match=key):
            from_dict(DINOv2Config, {key: value}, "method_options")


# ------------------------------------------------------------------------- two processes

ROWS = (3, 5)  # uneven: processes hold different numbers of masked patches


def _sinkhorn_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(ROWS))
    torch.set_num_threads(1)
    logits = rand(sum(ROWS), 6, seed=19)
    start = sum(ROWS[:rank])
    save_file(dict(q=sinkhorn_knopp(logits[start:start + ROWS[rank]], 0.1)), f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_sinkhorn_on_two_processes_equals_one(tmp_path: Path):
    mp.start_processes(_sinkhorn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(ROWS),
                       start_method="spawn")
    single = sinkhorn_knopp(rand(sum(ROWS), 6, seed=19), 0.1)
    parts = torch.cat([load_file(tmp_path / f"rank{r}.safetensors")["q"] for r in range(len(ROWS))])
    assert torch.allclose(parts, single, atol=1e-6)
