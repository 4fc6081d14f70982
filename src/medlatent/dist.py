"""Distributed helpers (plain torch.distributed, as launched by ``torchrun``), and whether a
process still lives (for the temporaries a killed process leaves behind).

Every distributed function is a no-op or identity in a single process, so methods call them
unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_joined = False  # whether init_from_env created the process group (and leave() may end it)
_control: dist.ProcessGroup | None = None  # a gloo group for host-side integers when the default is NCCL


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as torchrun set it (``RANK``), readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward hands each rank the sum over ranks of its slice's gradient.

    Written here because ``torch.distributed.nn.functional.all_gather`` is deprecated in
    torch 2.13 and its backward (all-to-all) aborts under the gloo backend used on CPUs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every slice: sum their gradients
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from every rank into (world * n, ...), keeping gradients.

    Each rank receives the sum over ranks of the gradients of its own slice, which is what a
    loss on gathered negatives needs (SimCLR's global batch, Chen et al. 2020, Sec. 2.2).
    All ranks must pass the same shape.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank, without gradients (queues, evaluation)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (in place where possible); identity in one process."""
    if is_distributed():
        dist.all_reduce(x)
        x /= world_size()
    return x


def _max_over_ranks(values: list[int]) -> list[int]:
    """The element-wise max over ranks of a few host integers (a collective). On CPU tensors:
    under NCCL through a gloo side group, so the GPU is never made to wait for the host."""
    global _control
    group = None  # the default group (gloo on CPUs)
    if dist.get_backend() == "nccl":
        if _control is None:
            _control = dist.new_group(backend="gloo")  # a collective too: every rank is here
        group = _control
    votes = torch.tensor(values, dtype=torch.int64)  # (F,) on the CPU
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return votes.tolist()


def all_equal(value: int) -> bool:
    """True when every rank passes the same ``value`` (every rank gets the same answer); True in
    one process. A collective: every rank must call it."""
    if not is_distributed():
        return True
    high, neg_low = _max_over_ranks([value, -value])  # (max, -min)
    return high == -neg_low


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, True on every rank when it is True on any; the flags as given in one process.

    A collective (every rank calls it at the same point, e.g. once per training step), so that
    a stop asked of one process (a signal, a time budget read off its own clock) stops every
    process after the same step.
    """
    if not is_distributed():
        return flags
    return tuple(bool(v) for v in _max_over_ranks([int(f) for f in flags]))


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by torchrun's environment; True when distributed.

    On CUDA each process takes the GPU ``LOCAL_RANK`` of its node (unless ``device`` names
    one), so ``torchrun --nproc_per_node N`` uses N GPUs with ``train.device`` auto or cuda.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return is_distributed()
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    global _joined
    _joined = True
    return True


def leave() -> None:
    """End the process group :func:`init_from_env` created; a no-op otherwise (one process, or a
    group the caller created and still owns). Every rank must call it: a collective.

    The ranks first meet at a barrier, so none tears its connections down while another still
    uses them; then the group is destroyed while the interpreter is fully alive. A process that
    exits with a gloo group still open can abort at exit ("terminate called without an active
    exception", pytorch/pytorch#190489) and fail a run that had finished.
    """
    global _joined, _control
    if not _joined:
        return
    _joined, _control = False, None  # destroy_process_group ends every group, the side group too
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
