"""Two real processes (gloo, CPU) against one: the gathered NT-Xent loss and its gradients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from medlatent.losses import NTXentLoss

WORLD, N, D, T = 2, 6, 16, 0.3


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D, generator=g), torch.randn(WORLD * N, D, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    z_a, z_b = _inputs()
    mine = slice(rank * N, (rank + 1) * N)
    a = z_a[mine].clone().requires_grad_()
    b = z_b[mine].clone().requires_grad_()
    loss = NTXentLoss(T, gather_distributed=True)(a, b)
    loss.backward()
    save_file(dict(loss=loss.detach().reshape(1), grad_a=a.grad, grad_b=b.grad), f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    z_a, z_b = _inputs()
    a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    single = NTXentLoss(T)(a, b)
    single.backward()
    parts = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    # the mean of the per-process losses is the single-process loss
    assert abs(float(sum(p["loss"] for p in parts)) / WORLD - float(single)) < 1e-5
    # each process's gradient, averaged as DDP does (divided by the world size), is the
    # single-process gradient of its own rows
    for r, p in enumerate(parts):
        mine = slice(r * N, (r + 1) * N)
        assert torch.allclose(p["grad_a"] / WORLD, a.grad[mine], atol=1e-6)
        assert torch.allclose(p["grad_b"] / WORLD, b.grad[mine], atol=1e-6)


# -------------------------------------------------------------- MoCo queue and DINO centre

K_DIM, QUEUE = 3, 7


def _half_batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * 4, K_DIM, generator=g), torch.randn(WORLD * 5, 16, generator=g)


def _state_worker(rank: int, init_file: str, out_dir: str) -> None:
    from medlatent.losses import DINOLoss
    from medlatent.methods.mechanics import FIFOQueue

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    keys, teacher = _half_batches()
    queue = FIFOQueue(QUEUE, K_DIM)
    queue.keys.zero_()
    queue.push(keys[rank * 4:(rank + 1) * 4])  # each process pushes only its own keys
    queue.push(keys[rank * 4:(rank + 1) * 4] * 10)  # a second step: wraps around
    loss = DINOLoss(16, center_momentum=0.8)
    loss.update_center(teacher[rank * 5:(rank + 1) * 5])
    save_file(dict(keys=queue.keys, ptr=queue.ptr.reshape(1), center=loss.center), f"{out_dir}/state{rank}.safetensors")
    dist.destroy_process_group()


def test_moco_queue_and_dino_centre_do_not_depend_on_the_number_of_processes(tmp_path: Path):
    from medlatent.losses import DINOLoss
    from medlatent.methods.mechanics import FIFOQueue

    mp.start_processes(_state_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    keys, teacher = _half_batches()
    queue = FIFOQueue(QUEUE, K_DIM)
    queue.keys.zero_()
    queue.push(keys)  # one process holding the whole batch
    queue.push(keys * 10)
    loss = DINOLoss(16, center_momentum=0.8)
    loss.update_center(teacher)
    for r in range(WORLD):
        st = load_file(tmp_path / f"state{r}.safetensors")
        assert torch.equal(st["keys"], queue.keys), "queue differs from the single-process one"
        assert int(st["ptr"]) == int(queue.ptr)
        assert torch.allclose(st["center"], loss.center, atol=1e-6)


# -------------------------------------------------------------- joining and leaving the group


def _join_leave_worker(rank: int, port: int, out_dir: str) -> None:
    from medlatent import dist as mdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    joined = mdist.init_from_env(torch.device("cpu"))
    seen = mdist.world_size()
    mdist.leave()  # the group init_from_env created ends, on every rank
    facts = dict(joined=joined, world=seen, open_after_leave=dist.is_initialized())
    # a group the caller created is the caller's: init_from_env joins nothing, leave() ends nothing
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=WORLD)
    mdist.init_from_env(torch.device("cpu"))
    mdist.leave()
    facts["caller_group_open"] = dist.is_initialized()
    dist.barrier()  # no rank closes its end of the caller's group while another still connects to it
    dist.destroy_process_group()
    (Path(out_dir) / f"facts{rank}.json").write_text(json.dumps(facts))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_leave_ends_only_the_group_init_from_env_joined(tmp_path: Path):
    mp.start_processes(_join_leave_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    for r in range(WORLD):
        facts = json.loads((tmp_path / f"facts{r}.json").read_text())
        assert facts == dict(joined=True, world=WORLD, open_after_leave=False, caller_group_open=True)


def _vote_worker(rank: int, port: int, out_dir: str) -> None:
    from medlatent import dist as mdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    mdist.init_from_env(torch.device("cpu"))
    facts = dict(same=mdist.all_equal(7), differ=mdist.all_equal(rank), votes=list(mdist.any_rank(rank == 1, False)))
    mdist.leave()
    (Path(out_dir) / f"votes{rank}.json").write_text(json.dumps(facts))


def test_every_rank_gets_the_same_answer_to_all_equal_and_any_rank(tmp_path: Path):
    mp.start_processes(_vote_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    for r in range(WORLD):
        facts = json.loads((tmp_path / f"votes{r}.json").read_text())
        assert facts == dict(same=True, differ=False, votes=[True, False])


def _stop_worker(rank: int, port: int, data: str, out_dir: str) -> None:
    from medlatent import api

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    polls = iter(range(100))
    cfg = dict(method="simclr", data=dict(name=data), train=dict(epochs=4, batch_size=16, precision="fp32"))
    # only rank 1 is asked to stop (at its third poll), as when a signal reaches one process first
    _, result = api.run_pretraining(cfg, Path(out_dir) / "run",
                                    should_stop=lambda: rank == 1 and next(polls) >= 2)
    (Path(out_dir) / f"result{rank}.json").write_text(json.dumps(dict(status=result.status, step=result.step)))


def test_a_stop_asked_of_one_process_stops_every_process_after_the_same_step(tmp_path: Path):
    from medlatent.train import checkpoint

    from conftest import write_stripes_npz

    data = write_stripes_npz(tmp_path / "s.npz", n_train=64)  # 4 steps per epoch, 16 in all
    ctx = mp.start_processes(_stop_worker, args=(_free_port(), str(data), str(tmp_path)), nprocs=WORLD,
                             start_method="spawn", join=False)
    try:
        for _ in range(24):  # ranks that stopped at different steps would wait on each other for ever
            if ctx.join(timeout=5):
                break
        else:
            raise AssertionError("the processes did not end within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    assert results == [dict(status="stopped", step=3)] * WORLD
    ck = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert ck is not None and ck.step == 3  # rank 0 saved the step both stopped after


# -------------------------------------------------------------- torchrun end to end


def test_torchrun_ddp_pretraining(tmp_path: Path):
    """`torchrun --nproc_per_node 2` trains with DDP (gloo): one run folder, written by rank 0,
    whose weights load, and a queue that holds the keys of both processes."""
    import subprocess
    import sys

    from medlatent.train import checkpoint

    from conftest import write_stripes_npz

    data = write_stripes_npz(tmp_path / "s.npz", n_train=128)
    torchrun = Path(sys.executable).with_name("torchrun")
    for method in ("simclr", "mocov2"):
        out = tmp_path / method
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "medlatent.cli.main", "pretrain",
               "--data", str(data), "--method", method, "--epochs", "2", "--batch-size", "32",
               "--precision", "fp32", "--output", str(out)]
        if method == "mocov2":
            cmd += ["--set", "method_options.queue_size=40"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        ck = checkpoint.latest(out / "checkpoints")
        assert ck is not None and ck.step == 8  # 2 epochs x 128 / 32, counted in global batches
        assert json.loads((out / "env.json").read_text())["world_size"] == 2
        if method == "mocov2":
            keys = ck.model["queue.keys"]
            assert int(ck.model["queue.ptr"]) == (8 * 32) % 40  # every process's keys were queued
            assert torch.isfinite(keys).all()
