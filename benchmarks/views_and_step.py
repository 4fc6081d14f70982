"""Side by side, in one run on this machine:

1. SimCLR view generation: our batched tensor ops vs the usual per-image PIL pipeline in a
   DataLoader with 2 workers (what torchvision transforms do, written with PIL since torchvision
   cannot be installed here), views/s at 28 and 64 px.
2. One SimCLR training step (batch 256, ResNet-18 half width): plain fp32 vs the precision and
   layout medlatent picks ("auto") and the other options, img/s, and the fraction of this
   machine's measured matmul peak (model FLOPs counted with torch's FlopCounterMode).

Usage: python benchmarks/views_and_step.py [--quick] [--out benchmarks/out/views_and_step.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from medlatent.augment.views import ViewRecipe, resolve
from medlatent.config import ViewConfig
from medlatent.data.medmnist import load_medmnist
from medlatent.nets.backbones import build_encoder
from medlatent.ssl.simclr import SimCLR
from medlatent.train.precision import bf16_is_fast, resolve_precision
from medlatent.train.runs import environment

# SimCLR's full view recipe (colour jitter and grayscale on), which BloodMNIST's own defaults
# switch off: the speed comparison is of the complete pipeline, whatever the data set.
SIMCLR_COLOUR = ViewConfig(color_jitter=0.8, grayscale=0.2)

# ------------------------------------------------------------------------------ PIL baseline


class PILSimCLRViews(torch.utils.data.Dataset):
    """Two SimCLR views per image, one image at a time with PIL (torchvision's way)."""

    def __init__(self, images: np.ndarray, size: int, cfg: ViewConfig, mean: list[float], std: list[float]):
        self.images, self.size, self.cfg = images, size, cfg
        self.mean = np.array(mean, np.float32)[:, None, None]
        self.std = np.array(std, np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.images)

    def view(self, img: Image.Image) -> torch.Tensor:
        c, s = self.cfg, self.size
        w, h = img.size
        area = random.uniform(*c.crop_scale) * w * h
        r = math.exp(random.uniform(math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])))
        cw, ch = min(w, round(math.sqrt(area * r))), min(h, round(math.sqrt(area / r)))
        x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
        img = img.resize((s, s), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if random.random() < c.hflip:
            img = ImageOps.mirror(img)
        if random.random() < (c.vflip or 0):
            img = ImageOps.flip(img)
        if random.random() < (c.rot90 or 0):
            img = img.transpose(random.choice([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]))
        if random.random() < c.color_jitter:
            st = c.color_jitter_strength
            img = ImageEnhance.Brightness(img).enhance(random.uniform(1 - 0.8 * st, 1 + 0.8 * st))
            img = ImageEnhance.Contrast(img).enhance(random.uniform(1 - 0.8 * st, 1 + 0.8 * st))
            img = ImageEnhance.Color(img).enhance(random.uniform(1 - 0.8 * st, 1 + 0.8 * st))
            hsv = np.array(img.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(int) + int(random.uniform(-0.2 * st, 0.2 * st) * 255)) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
        if random.random() < c.grayscale:
            img = img.convert("L").convert("RGB")
        a = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((a - self.mean) / self.std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[i])
        return self.view(img), self.view(img)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_views(images_u8: torch.Tensor, size: int, n_batches: int, device: torch.device, workers: list[int],
                batch: int = 256) -> dict[str, float]:
    cfg = resolve(SIMCLR_COLOUR, "bloodmnist")
    mean, std = [0.5] * 3, [0.25] * 3
    x = images_u8
    if x.shape[-1] != size:  # 64 px: the 28 px images upsampled (speed does not depend on content)
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    recipe = ViewRecipe([(cfg, size), (cfg, size)], mean, std)
    xd = x.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):  # warm-up (kernel selection on a GPU)
        recipe(xd[:batch], g)
    _sync(device)
    t = time.perf_counter()
    for i in range(n_batches):
        idx = torch.randint(0, len(xd), (batch,), generator=g, device=device)
        recipe(xd[idx], g)
    _sync(device)
    row = dict(size=size, device=str(device), ours_views_per_s=2 * batch * n_batches / (time.perf_counter() - t))
    ds = PILSimCLRViews(x.permute(0, 2, 3, 1).numpy(), size, cfg, mean, std)
    for w in workers:
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**8)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=w,
                                             drop_last=True, prefetch_factor=2)
        it = iter(loader)
        for _ in range(2 * w + 1):  # start the workers and drain the prefetched batches, so that
            next(it)  # the timed batches are produced while we wait (steady state)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        row[f"pil_{w}_workers_views_per_s"] = 2 * batch * n_batches / (time.perf_counter() - t)
        del it, loader
    row["ratio"] = row["ours_views_per_s"] / row[f"pil_{workers[0]}_workers_views_per_s"]
    return row


# ------------------------------------------------------------------------------ step


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    iters = 20 if dtype == torch.float32 or device.type == "cuda" else 2
    best = 0.0
    for _ in range(3):
        a @ b
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t))
    return best


def step_flops(model: SimCLR, views: list[torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(views).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bench_step(images_u8: torch.Tensor, backbone: str, n_steps: int, device: torch.device,
               batch: int = 256) -> tuple[list[dict], float]:
    cfg = resolve(SIMCLR_COLOUR, "bloodmnist")
    recipe = ViewRecipe([(cfg, 28), (cfg, 28)], [0.5] * 3, [0.25] * 3)
    g = torch.Generator(device=device).manual_seed(0)
    views = recipe(images_u8[:batch].to(device), g)
    auto_dtype = resolve_precision("auto", device)
    variants = [("fp32 (plain)", None, False, False),
                ("auto: " + ("bf16" if auto_dtype else "fp32") + " + channels_last", auto_dtype, True, False),
                ("fp32 + channels_last + torch.compile", None, True, True)]
    if auto_dtype is None:
        variants.append(("bf16 autocast + channels_last (no bf16 hardware here)", torch.bfloat16, True, False))
    else:
        variants.append(("bf16 + channels_last + torch.compile", torch.bfloat16, True, True))
    rows = []
    flops = None
    for name, dtype, cl, comp in variants:
        torch.manual_seed(0)
        model = SimCLR(build_encoder(backbone, 3, 28)).to(device)
        if flops is None:
            flops = step_flops(model, views)
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt)
        if comp:
            model.encoder.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        v = [x.contiguous(memory_format=fmt) for x in views]

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(v).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(2 if device.type == "cuda" else 0):
            step()
        slow = device.type == "cpu" and dtype is not None and auto_dtype is None
        steps = max(1, n_steps // 4) if slow else n_steps
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        ips = batch * steps / (time.perf_counter() - t)
        rows.append(dict(variant=name, images_per_s=ips, first_step_s=first,
                         achieved_gflops=flops / batch * ips / 1e9))
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_vs_fp32"] = r["images_per_s"] / base
    return rows, flops / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="resnet18-half")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", default="2", help="DataLoader worker counts for the PIL baseline, e.g. 2,8")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/out/views_and_step.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    ds = load_medmnist("bloodmnist", data_dir=args.data_dir)
    images = ds.split("train").images
    n = 4 if args.quick else 12
    workers = [int(w) for w in args.workers.split(",")]
    views = [bench_views(images, 28, n * 2, device, workers), bench_views(images, 64, n, device, workers)]
    peak32, peak16 = matmul_peak(torch.float32, device), matmul_peak(torch.bfloat16, device)
    steps_n = (20 if device.type == "cuda" else 5) if not args.quick else 2
    steps, flops_per_image = bench_step(images, args.backbone, steps_n, device, args.batch)
    for r in steps:
        r["fraction_of_fp32_peak"] = r["achieved_gflops"] * 1e9 / peak32
        r["fraction_of_bf16_peak"] = r["achieved_gflops"] * 1e9 / peak16
    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = dict(machine=dict(cpu=environment({})["cpu"], cores=os.cpu_count(), torch=torch.__version__, accelerator=accel,
                               bf16_hardware=bf16_is_fast(device),
                               matmul_peak_fp32_gflops=peak32 / 1e9, matmul_peak_bf16_gflops=peak16 / 1e9,
                               python=platform.python_version()),
                  views=views, step=dict(backbone=args.backbone, batch=args.batch, device=str(device),
                                         model_gflop_per_image=flops_per_image / 1e9, variants=steps))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    m = result["machine"]
    print(f"machine: {accel or m['cpu']}, {m['cores']} CPU cores, torch {m['torch']}, bf16 hardware: "
          f"{m['bf16_hardware']}, matmul peak fp32 {m['matmul_peak_fp32_gflops']:.0f} / "
          f"bf16 {m['matmul_peak_bf16_gflops']:.1f} GFLOP/s")
    head = " | ".join(f"PIL + DataLoader ({w} workers)" for w in workers)
    print(f"\n| views (SimCLR, 2 per image) | ours batched ({device.type}) | {head} | ratio |")
    print("| --- | --- |" + " --- |" * len(workers) + " --- |")
    for v in views:
        pils = " | ".join(f"{v[f'pil_{w}_workers_views_per_s']:,.0f} views/s" for w in workers)
        print(f"| {v['size']} px | {v['ours_views_per_s']:,.0f} views/s | {pils} | {v['ratio']:.1f}x |")
    print(f"\n| SimCLR step, batch {args.batch}, {args.backbone}, 28 px, {device.type} | img/s | vs fp32 | GFLOP/s "
          f"| of fp32 peak | of bf16 peak | first step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in steps:
        print(f"| {r['variant']} | {r['images_per_s']:,.1f} | {r['speedup_vs_fp32']:.2f}x | {r['achieved_gflops']:,.0f} | "
              f"{r['fraction_of_fp32_peak']:.2f} | {r['fraction_of_bf16_peak']:.3f} | {r['first_step_s']:.1f} s |")


if __name__ == "__main__":
    main()
