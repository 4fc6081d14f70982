"""What a run will need in memory, estimated before it starts, so a run that cannot fit is
refused with one line instead of being killed by the kernel minutes later.

* The image store: images x channels x pixels x bytes per value (uint8 or float32).
* One training step: the activations kept for the backward pass plus weights, gradients and
  the optimiser's two moment buffers. Activations are counted by running the encoder once on
  PyTorch's ``meta`` device (shapes only, no memory, no arithmetic) and summing the outputs of
  every leaf module, for one image of each view size, then scaling by the batch. Heads and
  losses are small next to the encoder's feature maps and are covered by the margin below.

Both figures are compared with the memory that is available now: ``MemAvailable`` of
``/proc/meminfo`` on a CPU, free device memory on a GPU.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from medlatent.errors import ConfigError

GIB = 2 ** 30
# Autograd keeps a little more than the leaf outputs (inputs of functional ops, gradient
# buffers while the backward pass runs). Measured peak-RSS growth over two SimCLR steps on a
# CPU, against the count: ResNet-18/4 28 px batch 256 1.12x, 64 px batch 64 0.97x, ViT-tiny
# 28 px batch 64 1.07x. The margin covers that and the heads.
STEP_MARGIN = 1.25


def activation_bytes(encoder: nn.Module, in_channels: int, view_sizes: list[int], spatial_dims: int,
                     batch_size: int) -> int:
    """Bytes of fp32 leaf-module outputs of one training step: ``batch_size`` images through the
    encoder once per view, views of side ``view_sizes`` (one entry per view)."""
    meta = copy.deepcopy(encoder).to("meta")
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(t, torch.Tensor):
                total += t.numel()

    leaves = [m for m in meta.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            for side in view_sizes:
                meta(torch.empty(1, in_channels, *(side,) * spatial_dims, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total * 4 * batch_size


def step_bytes(model: nn.Module, encoder: nn.Module, in_channels: int, view_sizes: list[int], spatial_dims: int,
               batch_size: int) -> int:
    """Estimated peak bytes of one optimiser step of ``model`` (weights, gradients, two AdamW
    moments: 4 copies of every parameter) with ``encoder``'s activations."""
    params = sum(p.numel() for p in model.parameters()) * 4 * 4
    return params + int(STEP_MARGIN * activation_bytes(encoder, in_channels, view_sizes, spatial_dims, batch_size))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this run now: free device memory on CUDA, ``MemAvailable`` on a CPU (None
    where neither can be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def require(needed: int, what: str, device: torch.device, advice: str) -> None:
    """Refuse (one line naming both figures) when ``needed`` bytes exceed what is available.

    Raises:
        ConfigError: ``{what} needs about X GiB but Y GiB are available on cpu; {advice}``.
    """
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(f"{what} needs about {needed / GIB:.1f} GiB but {free / GIB:.1f} GiB of memory are "
                          f"available on {device.type}; {advice}")
