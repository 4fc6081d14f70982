"""SimCLR input pipeline at 64, 128 and 224 px from 20,000 image files, side by side in one run:

(a) medlatent: the files prepared once into a store (``prepare``), random index batches of 256
    (``epoch_batches``) read as training reads them (``BatchReader``: by index, the next batch
    read ahead on a thread), ``recipe(batch, g)`` on the CPU: two batched views.
(b) MONAI's usual pipeline: ``LoadImaged`` + ``EnsureChannelFirstd`` + ``ScaleIntensityRanged``
    + ``Resized`` cached by ``monai.data.CacheDataset`` (in memory; float32 unless that would
    take over half the free memory, then uint8, see ``--cache-dtype``), then per image and
    per view ``RandScaleCropd`` + ``Resized`` (random resized crop), ``RandFlipd``,
    ``RandScaleIntensityd`` (brightness), ``RandAdjustContrastd`` (contrast), a per-image colour
    matrix for saturation, hue and random grayscale (MONAI has none of these three; written here
    as a MONAI ``RandomizableTransform``, the same 3x3 matrix medlatent applies per batch),
    ``RandGaussianSmoothd``, ``NormalizeIntensityd``; two views per image; batches of 256 from
    ``monai.data.DataLoader(num_workers=2)``.

Both make the same two views of the same images at the same output size with the same
probabilities: crop area 0.25-1 of the image, horizontal flip 0.5, colour distortion 0.8 (strength
0.5: brightness, contrast, saturation 0.4, hue 0.1), grayscale 0.2, blur 0.5 with the sigma of
``views.blur_sigma(size)``, standardisation. medlatent's default SimCLR views have no blur; the
``views`` column says which recipe a row used (``default`` = the recipe ``medlatent pretrain
--method simclr`` builds, ``+blur`` = with SimCLR's blur, as the MONAI pipeline has).

Each cell runs in its own process (so its peak memory is its own), steady state after a warm-up
of 3 batches, over 20 batches or 30 s, whichever comes first (at least 3 batches). Memory: the
peak over the run (sampled every 0.2 s) of the process tree's proportional set size (PSS: pages
shared between the loader and its forked workers counted once), and the sum of VmHWM over the
tree (counts shared pages once per process).

Usage (both cores, after `uptime` shows a quiet machine):
    python benchmarks/input_pipeline.py [--sizes 64,128,224] [--table-only]
One JSON per cell under benchmarks/out/input_pipeline/; a rerun skips the cells already there.
Data (made on the first run, reused after): /work/bench-data/pngs (20,000 PNG files, 256 px,
random crops and flips of the real images in /work/shared/data/other), stores under
/work/bench-data/stores/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DATA = Path(os.environ.get("MEDLATENT_BENCH_DATA", "/work/bench-data"))
REAL = Path("/work/shared/data/other")
BATCH = 256
WARMUP = 3
MIN_BATCHES = 20  # measure until 20 batches or 30 s, whichever comes first, but at least 3 batches
MIN_SECONDS = 30.0
AT_LEAST = 3


# ------------------------------------------------------------------------------ data


def real_images() -> list[np.ndarray]:
    """The real images as (H, W, 3) uint8 arrays (grey ones repeated to RGB)."""
    from PIL import Image

    out = []
    for name in ("retina.jpg", "ihc.png", "cell.png"):
        out.append(np.asarray(Image.open(REAL / name).convert("RGB")))
    return out


def random_crop(sources: list[np.ndarray], side: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (of a random side in 160-512 px) of one real image, resized to
    ``side``, randomly flipped: (side, side, 3) uint8."""
    from PIL import Image

    src = sources[rng.integers(len(sources))]
    h, w = src.shape[:2]
    c = int(rng.integers(160, min(h, w, 512) + 1))
    y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
    a = src[y:y + c, x:x + c]
    if c != side:
        a = np.asarray(Image.fromarray(a).resize((side, side), Image.BILINEAR))
    if rng.random() < 0.5:
        a = a[:, ::-1]
    if rng.random() < 0.5:
        a = a[::-1]
    return np.ascontiguousarray(a)


def make_pngs(folder: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    """``n`` PNG files of ``side`` px in ``folder`` (files already there are kept): random crops
    and flips of the real images. Content for throughput and memory tests, not for quality."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:06d}.png" for i in range(n)]
    if all(p.exists() for p in paths[-10:]) and sum(1 for _ in folder.glob("img_*.png")) >= n:
        return paths
    sources = real_images()
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        rng = np.random.default_rng((seed, i))
        if p.exists():
            continue
        tmp = p.with_name(f".{p.name}.tmp")
        # zlib level 1: 4x faster to write than the default 6, files ~4% larger, decoded alike
        Image.fromarray(random_crop(sources, side, rng)).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, p)
        if i % 2000 == 0:
            print(f"  pngs: {i}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return paths


def prepared_store(size: int, workers: int) -> tuple[Path, float]:
    """The store of the 20,000 PNG files at ``size`` px (all of them in train), made once;
    (path, seconds prepare took: 0 when it was already there)."""
    from medlatent.data.manifest import read_folder
    from medlatent.data.prepare import PrepareConfig, prepare

    out = BENCH_DATA / "stores" / f"pngs{size}"
    info = out.with_name(f"pngs{size}.prepare.json")
    if (out / "store.json").is_file() and info.is_file():  # made by an earlier run: used as it is
        return out, json.loads(info.read_text())["seconds"]
    manifest = read_folder(BENCH_DATA / "pngs")
    store = prepare(manifest, out, PrepareConfig(size=size, workers=workers, split=(1.0, 0.0, 0.0)))
    if not store.reused:
        info.write_text(json.dumps(dict(seconds=store.seconds, workers=workers, count=store.count)))
    return out, json.loads(info.read_text())["seconds"] if info.exists() else float("nan")


# ------------------------------------------------------------------------------ measuring


def _pss_kib(pid: int) -> tuple[int, int]:
    """(Pss, VmHWM) of one process in KiB; (0, 0) once it is gone."""
    try:
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
        hwm = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        return pss, hwm
    except (OSError, ValueError):
        return 0, 0


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def status_kib(field: str, pid: str = "self") -> int:
    """One field of /proc/<pid>/status (RssAnon, VmHWM, ...) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class TreeMemory:
    """Samples the PSS of this process and its descendants every ``every`` s (a thread); keeps
    the peak of the sum, and the peak VmHWM of each process seen."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak_pss, self.hwm = every, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        total = 0
        for pid in [os.getpid(), *descendants(os.getpid())]:
            pss, hwm = _pss_kib(pid)
            total += pss
            self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
        self.peak_pss = max(self.peak_pss, total)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def result(self) -> dict:
        me = self.hwm.get(os.getpid(), 0)
        workers = sorted(v for k, v in self.hwm.items() if k != os.getpid())
        return dict(peak_pss_gib=self.peak_pss / 2**20, main_hwm_gib=me / 2**20,
                    worker_hwm_gib=[w / 2**20 for w in workers], sum_hwm_gib=(me + sum(workers)) / 2**20)


def steady_rate(batches, images_per_batch: int) -> dict:
    """Images/s over ``batches`` (an iterator that makes one batch per ``next``) after WARMUP
    batches, until MIN_BATCHES batches or MIN_SECONDS seconds (whichever is first; at least
    AT_LEAST batches)."""
    it = iter(batches)
    t_first = time.perf_counter()
    for _ in range(WARMUP):
        next(it)
    warm = time.perf_counter() - t_first
    n, t0 = 0, time.perf_counter()
    while n < AT_LEAST or (n < MIN_BATCHES and time.perf_counter() - t0 < MIN_SECONDS):
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    return dict(images_per_s=n * images_per_batch / dt, batches=n, seconds=dt, warmup_seconds=warm)


def machine() -> dict:
    import platform

    import monai
    import torch

    from medlatent.train.precision import cpu_model

    mem = status_total_gib()
    return dict(cpu=cpu_model(), cores=os.cpu_count(), ram_gib=mem, torch=torch.__version__, monai=monai.__version__,
                numpy=np.__version__, python=platform.python_version())


def status_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def load_average() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------ recipes


def simclr_view_config(size: int, blur: bool):
    """The ViewConfig ``medlatent pretrain --method simclr`` resolves for an RGB store (not a
    data set whose colour is the class), optionally with SimCLR's blur (p 0.5, paper sigma)."""
    import dataclasses

    from medlatent.augment.views import blur_sigma, resolve
    from medlatent.config import ViewConfig

    cfg = resolve(ViewConfig(), "pngs")  # a user's store: colour jitter 0.8, grayscale 0.2, no vflip
    if blur:
        cfg = dataclasses.replace(cfg, blur=0.5, blur_sigma=blur_sigma(size))
    return cfg


def ours(size: int, threads: int, blur: bool, store: Path) -> dict:
    """medlatent: store -> index batches of 256 -> the SimCLR recipe (two views)."""
    import torch

    from medlatent.augment.views import ViewRecipe
    from medlatent.data.store import epoch_batches, open_store
    from medlatent.ssl.simclr import SPEC, SimCLRConfig
    from medlatent.train.batches import BatchReader

    torch.set_num_threads(threads)
    data = open_store(store)
    images = data.splits["train"].images
    recipe = ViewRecipe(SPEC.views(simclr_view_config(size, blur), size, SimCLRConfig()), *data.stats)

    reader = BatchReader(images, torch.device("cpu"))  # as training reads: by index, one batch read ahead

    def batches():
        epoch = 0
        while True:
            order = epoch_batches(len(images), BATCH, 0, epoch)
            for step, index in enumerate(order):
                nxt = order[step + 1] if step + 1 < len(order) else None
                views = recipe(reader.read(index, nxt), torch.Generator().manual_seed(epoch * 100003 + step))
                assert len(views) == 2 and views[0].shape == (BATCH, 3, size, size)
                yield views
            epoch += 1

    with TreeMemory() as mem:
        rate = steady_rate(batches(), BATCH)
    return dict(rate, **mem.result(), n_images=len(images), cache_seconds=0.0)


def monai_pipeline(size: int, workers: int, files: list[Path], mean: list[float], std: list[float],
                   cache_dtype: str) -> dict:
    """MONAI: CacheDataset of the deterministic part, random SimCLR transforms per image in a
    DataLoader with ``workers`` processes."""
    import monai
    import torch
    from monai.data import CacheDataset, DataLoader, PILReader
    from monai.transforms import (CastToTyped, Compose, EnsureChannelFirstd, LoadImaged, MapTransform,
                                  NormalizeIntensityd, Randomizable, RandAdjustContrastd, RandFlipd,
                                  RandGaussianSmoothd, RandomizableTransform, RandScaleCropd, RandScaleIntensityd,
                                  Resized, ScaleIntensityRanged)

    from medlatent.augment.views import blur_sigma

    torch.set_num_threads(1)
    cfg = simclr_view_config(size, blur=True)
    s = cfg.color_jitter_strength
    sat, hue = 0.8 * s, 0.2 * s
    luma = torch.tensor([0.299, 0.587, 0.114])
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    class RandColourMatrixd(RandomizableTransform, MapTransform):
        """Saturation s in [1-f, 1+f] and hue shift in [-h, h] turns with probability ``prob``,
        then grayscale with probability ``gray``: one 3x3 matrix per image (what medlatent's
        ``ops.color_transform`` builds per sample)."""

        def __init__(self, keys: str, prob: float, gray: float) -> None:
            MapTransform.__init__(self, keys)
            RandomizableTransform.__init__(self, prob)
            self.gray = gray

        def __call__(self, d: dict) -> dict:
            self.randomize(None)
            m = torch.eye(3)
            if self._do_transform:
                fs = self.R.uniform(1 - sat, 1 + sat)
                a = self.R.uniform(-hue, hue) * 2 * math.pi
                rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
                saturation = fs * torch.eye(3) + (1 - fs) * torch.outer(torch.ones(3), luma)
                m = torch.linalg.inv(yiq) @ rot @ yiq @ saturation
            if self.R.random() < self.gray:
                m = torch.outer(torch.ones(3), luma) @ m
            for k in self.keys:
                x = d[k]
                d[k] = torch.einsum("ij,jhw->ihw", m.to(x.dtype), x).clamp_(0, 1)
            return d

    sigma = blur_sigma(size)
    view = Compose([
        RandScaleCropd("image", roi_scale=math.sqrt(cfg.crop_scale[0]), max_roi_scale=1.0, random_size=True),
        Resized("image", (size, size), mode="bilinear"),
        RandFlipd("image", prob=cfg.hflip, spatial_axis=1),
        RandScaleIntensityd("image", factors=0.8 * s, prob=cfg.color_jitter),  # brightness
        RandAdjustContrastd("image", prob=cfg.color_jitter, gamma=(1 - 0.8 * s, 1 + 0.8 * s)),  # contrast (gamma)
        RandColourMatrixd("image", prob=cfg.color_jitter, gray=cfg.grayscale),
        RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, prob=0.5),
        NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True),
    ])

    class TwoViews(Randomizable):
        """{"image": x} -> {"view1": view(x), "view2": view(x)}: two independent draws."""

        def __init__(self, view: Compose) -> None:
            self.view = view

        def set_random_state(self, seed=None, state=None):  # noqa: ANN001, ANN201 - MONAI's signature
            self.view.set_random_state(seed, state)
            return self

        def randomize(self, data: object) -> None:
            pass

        def __call__(self, d: dict) -> dict:
            first = d["image"]
            second = first.clone()
            a = self.view({"image": first})["image"]
            b = self.view({"image": second})["image"]
            return {"view1": a, "view2": b}

    deterministic = [LoadImaged("image", reader=PILReader(reverse_indexing=False), image_only=True),
                     EnsureChannelFirstd("image"),
                     ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0.0, b_max=1.0),
                     Resized("image", (size, size), mode="area")]
    if cache_dtype == "uint8":  # optional: a cache 4x smaller; the views then start from uint8
        deterministic[2:3] = []
        deterministic.append(CastToTyped("image", dtype=np.uint8))
        view.transforms = (ScaleIntensityRanged("image", 0, 255, 0.0, 1.0),) + tuple(view.transforms)
    transform = Compose(deterministic + [TwoViews(view)])
    monai.utils.set_determinism(0)
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        ds = CacheDataset([{"image": str(p)} for p in files], transform, cache_rate=1.0, num_workers=2,
                          progress=False)
        cache_s = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)

        def batches():
            while True:
                for b in loader:
                    assert b["view1"].shape == (BATCH, 3, size, size)
                    yield b

        rate = steady_rate(batches(), BATCH)
    return dict(rate, **mem.result(), n_images=len(files), cache_seconds=cache_s, cache_dtype=cache_dtype)


# ------------------------------------------------------------------------------ driver


def cell_names(sizes: list[int]) -> list[tuple[str, int, int, bool]]:
    """(pipeline, size, cores, blur) of every cell, in the order they run."""
    out = []
    for s in sizes:
        out += [("medlatent", s, 2, True), ("medlatent", s, 2, False), ("medlatent", s, 1, True),
                ("monai", s, 2, True)]
    return out


def cell_file(out: Path, pipeline: str, size: int, cores: int, blur: bool) -> Path:
    return out / f"{pipeline}_{size}px_{cores}cores_{'blur' if blur else 'default'}.json"


def run_cell(args: argparse.Namespace, pipeline: str, size: int, cores: int, blur: bool) -> dict:
    files = sorted((BENCH_DATA / "pngs").glob("img_*.png"))[:args.n_images]
    store, prep_s = prepared_store(size, args.prepare_workers)
    load0 = load_average()
    if pipeline == "medlatent":
        r = ours(size, cores, blur, store)
    else:
        from medlatent.data.store import open_store

        dtype = args.cache_dtype
        if dtype == "auto":  # float32 (MONAI's usual) unless it would take over half the free memory
            dtype = "float32" if len(files) * 3 * size * size * 4 < 0.5 * available_bytes() else "uint8"
        r = monai_pipeline(size, cores, files, *open_store(store).stats, dtype)
    views = "+blur" if blur else "default"
    return dict(r, pipeline=pipeline, size=size, cores=cores, views=views, prepare_seconds=prep_s,
                load_before=load0, load_after=load_average(), machine=machine())


def table(out: Path, sizes: list[int]) -> str:
    rows = ["| size | pipeline | views | cores | images/s | ratio to MONAI | peak memory (PSS, tree) | "
            "sum of VmHWM | one-off cost | load avg |", "|" + " --- |" * 10]
    for s in sizes:
        cells = {(p, c, b): cell_file(out, p, s, c, b) for p, _, c, b in cell_names([s])}
        got = {k: json.loads(f.read_text()) for k, f in cells.items() if f.exists()}
        base = got.get(("monai", 2, True))
        for (p, c, b), r in got.items():
            ratio = f"{r['images_per_s'] / base['images_per_s']:.1f}x" if base else "-"
            once = (f"prepare {r['prepare_seconds']:.0f} s" if p == "medlatent"
                    else f"cache fill {r['cache_seconds']:.0f} s ({r['cache_dtype']})")
            rows.append(f"| {s} | {p} | {r['views']} | {c} | {r['images_per_s']:,.0f} | {ratio} | "
                        f"{r['peak_pss_gib']:.2f} GiB | {r['sum_hwm_gib']:.2f} GiB | {once} | "
                        f"{r['load_before']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--prepare-workers", type=int, default=2)
    ap.add_argument("--cache-dtype", choices=["auto", "float32", "uint8"], default="auto",
                    help="what CacheDataset holds; auto: float32 unless that is over half the free memory")
    ap.add_argument("--out-dir", default="benchmarks/out/input_pipeline")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--data-only", action="store_true", help="make the PNG files and the stores, then stop")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # pipeline:size:cores:blur, run in a child process
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.cell:
        p, s, c, b = args.cell.split(":")
        r = run_cell(args, p, int(s), int(c), b == "1")
        f = cell_file(out, p, int(s), int(c), b == "1")
        f.write_text(json.dumps(r, indent=1))
        return
    if not args.table_only:
        make_pngs(BENCH_DATA / "pngs", args.n_images, 256)
        for s in sizes:
            path, secs = prepared_store(s, args.prepare_workers)
            print(f"store {path}: prepared in {secs:.0f} s", flush=True)
        if args.data_only:
            return
        for p, s, c, b in cell_names(sizes):
            if cell_file(out, p, s, c, b).exists():
                continue
            print(f"cell {p} {s}px {c} cores {'+blur' if b else 'default'} (load {load_average():.1f})", flush=True)
            cmd = [sys.executable, __file__, "--cell", f"{p}:{s}:{c}:{int(b)}", "--out-dir", str(out),
                   "--n-images", str(args.n_images), "--prepare-workers", str(args.prepare_workers),
                   "--cache-dtype", args.cache_dtype]
            subprocess.run(cmd, check=True)
    print(table(out, sizes))


if __name__ == "__main__":
    main()
