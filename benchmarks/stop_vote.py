"""What the per-step stop vote of a torchrun run costs: two CPU processes (gloo), the vote
(``medlatent.dist.any_rank``, a 2-integer all-reduce) against one DDP step of the default
encoder, a ResNet-18/4 (28 px, two views of a global batch of 32: forward, backward and the
gradient all-reduce; no head or loss, so a real method's step is longer).

OMP_NUM_THREADS=1 python benchmarks/stop_vote.py
"""
import os
import socket
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medlatent import dist
    from medlatent.nets.backbones import build_encoder

    dist.init_from_env(torch.device("cpu"))
    for _ in range(50):  # warm-up
        dist.any_rank(False, False)
    t0, n = time.perf_counter(), 2000
    for _ in range(n):
        dist.any_rank(False, False)
    vote = (time.perf_counter() - t0) / n

    torch.manual_seed(0)
    encoder = build_encoder("resnet18-quarter", 3, 28)
    model = torch.nn.parallel.DistributedDataParallel(encoder)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.01)
    views = torch.rand(32, 3, 28, 28)  # this process's half of the batch, two views of 16 images
    times = []
    for i in range(6):  # step 0 warms up
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(views).square().mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = sorted(times[1:])[len(times[1:]) // 2]
    if rank == 0:
        print(f"vote {vote * 1e3:.2f} ms, DDP step {step * 1e3:.0f} ms, vote / step {vote / step:.2%}")
    dist.leave()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port,), nprocs=2, start_method="spawn")
