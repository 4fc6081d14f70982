"""Two nodes as users launch them (two ``torchrun --nnodes 2`` launchers, gloo on the CPU) train
the same weights as one process with the same global batch and ``train.view_shards=2``.

Each process reads its half of every global batch and draws the views of its own slice of it
(seeded by (seed, step, slice)), so one process drawing both slices makes the same views. The
method is MoCo v2 on a ViT: LayerNorm only, no batch norm anywhere. A ResNet, or a head with batch
norm (SimCLR, BYOL, MoCo v3), cannot match on CPUs: PyTorch's SyncBatchNorm has no CPU kernel, so
each CPU process normalises over its own half of the batch.

The weights agree to 1e-5 (measured: 1.5e-7 after 8 steps), not bit for bit: gradients averaged
by DDP are summed in another order than one process sums them. The optimiser is SGD: AdamW
divides by sqrt(v), so for gradient entries near zero the same rounding becomes steps of up to
the learning rate (1.7e-5 after 8 AdamW steps, still the same training, but no tight bound).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medlatent.train import checkpoint

from conftest import write_stripes_npz

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")

ARGS = ["--method", "mocov2", "--backbone", "vit-tiny", "--set", "backbone.depth=2", "--batch-size", "16",
        "--epochs", "2", "--optimizer", "sgd", "--precision", "fp32", "--set", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(*args: str) -> list[str]:
    return ["-m", "medlatent.cli.main", "pretrain", *args]


def test_two_nodes_train_what_one_process_trains(tmp_path: Path):
    data = write_stripes_npz(tmp_path / "stripes.npz", n_train=64)  # 4 steps per epoch, 8 in all
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two, one, plain = tmp_path / "two-nodes", tmp_path / "one-process", tmp_path / "one-process-plain"
    port = str(_free_port())
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
              *_pretrain("--data", str(data), "--output", str(two), *ARGS)] for node in (0, 1)]
    single = [sys.executable, *_pretrain("--data", str(data), "--output", str(one), *ARGS,
                                         "--set", "train.view_shards=2")]
    # the control: one process drawing the whole batch's views from (seed, step, 0), as with
    # view_shards unset, must train other weights (or the comparison would prove nothing)
    control = [sys.executable, *_pretrain("--data", str(data), "--output", str(plain), *ARGS)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in (*nodes, single, control)]
    try:
        for name, proc in zip(("node 0", "node 1", "one process", "control"), procs):
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    finally:
        for proc in procs:  # a failed assertion must not leave a launcher waiting for its peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # rank 0 alone wrote the run folder: one metrics line per step, one world size
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 8
    assert '"world_size": 2' in (two / "env.json").read_text()
    a, b = load_file(two / "encoder.safetensors"), load_file(one / "encoder.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), f"encoders differ by up to {worst}"
    # the whole method too: heads, momentum key encoder and the queue of keys (made from the views)
    states = [checkpoint.latest(run / "checkpoints") for run in (two, one, plain)]
    assert all(s is not None and s.step == 8 for s in states)
    full, sharded, unsharded = (s.model for s in states)
    assert all(torch.allclose(full[k], sharded[k], atol=1e-5) for k in full)
    assert max(float((full[k].double() - unsharded[k].double()).abs().max()) for k in full) > 1e-2


# ------------------------------------------- batches read by index from a memory-mapped store

def test_a_memory_mapped_store_is_found_and_read_by_index_with_read_ahead(tmp_path: Path):
    import numpy as np

    from medlatent.train.batches import BatchReader, is_file_backed, keep_on_device

    np.save(tmp_path / "store.npy", np.arange(40 * 3 * 4 * 4, dtype=np.uint8).reshape(40, 3, 4, 4))
    mapped = torch.from_numpy(np.load(tmp_path / "store.npy", mmap_mode="c"))
    ordinary = mapped.clone()
    assert is_file_backed(mapped) and is_file_backed(mapped[5:])
    assert not is_file_backed(ordinary)
    cpu = torch.device("cpu")
    assert not keep_on_device(mapped, cpu) and keep_on_device(ordinary, cpu)

    reader = BatchReader(mapped, cpu)
    assert not reader.resident
    g = torch.Generator().manual_seed(0)
    steps = [torch.randperm(40, generator=g)[:8] for _ in range(5)]
    try:
        for i, index in enumerate(steps):  # each step reads ahead the next one's rows
            batch = reader.read(index, steps[i + 1] if i + 1 < len(steps) else None)
            assert torch.equal(batch, ordinary[index])
        other = torch.tensor([1, 2, 3])  # not the rows read ahead (a resume): read now, still right
        reader.read(steps[0], steps[1])
        assert torch.equal(reader.read(other), ordinary[other])
    finally:
        reader.close()


def test_batches_gathered_from_the_store_train_and_resume_bit_for_bit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    from medlatent import api
    from medlatent.train import batches

    data = write_stripes_npz(tmp_path / "stripes.npz", n_train=48)  # 3 steps per epoch, 6 in all
    cfg = dict(method="mocov2", data=dict(name=str(data)), backbone=dict(name="vit-tiny", depth=1),
               train=dict(epochs=2, batch_size=16, precision="fp32", checkpoint_every=1, keep_checkpoints=50))
    api.run_pretraining(cfg, tmp_path / "resident")
    monkeypatch.setattr(batches, "keep_on_device", lambda images, device: False)  # as for a memory-mapped store
    polls = iter(range(100))
    _, first = api.run_pretraining(cfg, tmp_path / "gathered", should_stop=lambda: next(polls) >= 3)
    assert first.status == "stopped" and first.step == 4  # stopped inside the second epoch
    api.run_pretraining(None, tmp_path / "gathered", resume=True)
    a = checkpoint.latest(tmp_path / "resident" / "checkpoints")
    b = checkpoint.latest(tmp_path / "gathered" / "checkpoints")
    assert a is not None and b is not None and a.step == b.step == 6
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
