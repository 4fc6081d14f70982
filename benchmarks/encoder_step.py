"""One training-free forward+backward step, batch 8, one thread: time and peak memory per image.

OMP_NUM_THREADS=1 python benchmarks/encoder_step.py NAME SIZE [STEM]   (run once per configuration, a fresh process each)
"""
import resource
import sys
import time

import torch

from medlatent.nets.backbones import build_encoder


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


torch.set_num_threads(1)
name, size = sys.argv[1], int(sys.argv[2])
stem = sys.argv[3] if len(sys.argv) > 3 else None
torch.manual_seed(0)
enc = build_encoder(name, 3, size, stem=stem).train()
x = torch.randn(8, 3, size, size)
base = rss_mb()
times = []
for i in range(3):  # step 0 warms up allocator and kernels
    t0 = time.perf_counter()
    enc(x).square().mean().backward()
    times.append(time.perf_counter() - t0)
    enc.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, peak of the process
step = sorted(times[1:])[0]
params = sum(p.numel() for p in enc.parameters()) / 1e6
stem_used = getattr(enc, "stem", f"patch {getattr(enc, 'patch_size', '')}")
grads = params * 1e6 * 4 / 2**20  # MiB of fp32 gradients, once per step
print(f"{name:10s} {size:4d} {stem_used:9s} params {params:5.1f}M  step {step:6.2f} s  {8 / step:6.1f} img/s  "
      f"peak above model {peak - base:6.0f} MiB at batch 8, activations {(peak - base - grads) / 8:6.1f} MiB/img")
