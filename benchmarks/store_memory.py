"""Memory stays flat in the size of the store: a 224-px RGB store larger than this machine's RAM
against one 10x smaller, read the way training reads it.

Two stores are written straight with numpy (``prepare`` would take hours to decode 200,000
files; the layout is the same: ``images.npy``, ``manifest.csv``, ``store.json`` with the
checksum ``open_store`` verifies): 200,000 and 20,000 images of 224 px, tiled from 512 random
crops and flips of the real images in /work/shared/data/other (content for memory and
throughput, not for quality).

Per store, in a fresh process each:

* memory: ``open_store(...).splits["train"].images[index]`` for random batches of 256
  (``epoch_batches``) and the SimCLR recipe (two views) for ``--steps`` steps, from a cold page
  cache; the process's own anonymous memory (``RssAnon`` in /proc/self/status: what it holds
  itself, not the file's pages in the page cache, which the kernel can drop) sampled every step,
  and its peak ``VmHWM`` (which also counts file pages mapped in);
* reads alone (no views): random batches of 256 from a cold cache (the file's pages dropped with
  ``posix_fadvise(DONTNEED)`` and checked with ``fincore``), and a warm cache (a set of 20
  batches read once, then timed a second time), images/s and MB/s.

Usage: python benchmarks/store_memory.py [--steps 200] [--keep] [--table-only]
The large store (30.1 GB) is deleted at the end unless --keep is given. One JSON per store
under benchmarks/out/store_memory/; a rerun skips the stores already measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from input_pipeline import BENCH_DATA, machine, random_crop, real_images, status_kib  # benchmarks/

SIZE = 224
BATCH = 256
POOL = 1000  # distinct random crops, written again and again in this order (one write each)


def write_store(path: Path, n: int, seed: int = 0) -> float:
    """A store of ``n`` 224-px RGB images at ``path`` (reused when complete); seconds taken."""
    from medlatent.data.prepare import STORE_FORMAT, STORE_VERSION
    from medlatent.data.store import channel_stats

    if (path / "store.json").is_file():
        return json.loads((path / "store.json").read_text()).get("write_seconds", float("nan"))
    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    need = n * 3 * SIZE * SIZE
    if shutil.disk_usage(path).free < need + (2 << 30):
        raise SystemExit(f"{path}: needs {need / 1e9:.1f} GB free")
    rng = np.random.default_rng(seed)
    sources = real_images()
    pool = np.stack([random_crop(sources, SIZE, rng).transpose(2, 0, 1) for _ in range(POOL)])  # (P, 3, S, S)
    block = memoryview(pool.reshape(-1))
    images = path / "images.npy"
    h = hashlib.blake2b(digest_size=16)  # what store.file_checksum computes, while writing
    with images.open("wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (n, 3, SIZE, SIZE)})
        f.flush()
        h.update(images.read_bytes())
        with ThreadPoolExecutor(1) as hasher:  # hashlib releases the GIL: hashing overlaps writing
            for a in range(0, n, POOL):
                part = block[:min(POOL, n - a) * pool[0].size]
                done = hasher.submit(h.update, part)
                f.write(part)
                done.result()
                if a % (40 * POOL) == 0:
                    print(f"  {path.name}: {a:,}/{n:,} images ({time.perf_counter() - t0:.0f} s)", flush=True)
        f.flush()
        os.fsync(f.fileno())
    mean, std = channel_stats(np.load(images, mmap_mode="r"), max_images=4096)
    with (path / "manifest.csv").open("w") as f:
        f.write("index,path,label,split,group,height,width,checksum\n")
        f.writelines(f"{i},synthetic/{i:07d}.png,,train,,{SIZE},{SIZE},\n" for i in range(n))
    st = images.stat()
    meta = dict(format=STORE_FORMAT, version=STORE_VERSION, count=n, channels=3, size=SIZE, spatial_dims=2,
                splits={"train": [0, n]}, class_names=[], task=None, labelled=0, mean=mean, std=std,
                source="synthetic (store_memory.py)", options={}, fingerprint=f"synthetic-{n}-{seed}",
                images_bytes=st.st_size, images_mtime_ns=st.st_mtime_ns, images_checksum=h.hexdigest(),
                write_seconds=time.perf_counter() - t0)
    (path / "store.json").write_text(json.dumps(meta, indent=1))
    return meta["write_seconds"]


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (``fincore``), None when fincore is missing."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


class Sampler:
    """RssAnon and RssFile of this process every 10 ms (a thread): peaks and a trace (MiB)."""

    def __init__(self) -> None:
        self.peak_anon = self.peak_file = 0
        self.trace: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = status_kib("RssAnon"), status_kib("RssFile")
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self.trace.append(anon / 1024)
            self._stop.wait(0.01)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(path: Path, steps: int, threads: int, view_every: int) -> dict:
    """The memory run and the read runs of one store (in this process).

    ``open_store`` maps ``images.npy`` read-only, so a store larger than RAM + swap opens.
    """
    import torch

    from medlatent.augment.views import ViewRecipe
    from medlatent.data.store import epoch_batches, open_store
    from medlatent.ssl.simclr import SPEC, SimCLRConfig
    from input_pipeline import simclr_view_config

    torch.set_num_threads(threads)
    npy = path / "images.npy"
    evict(npy)
    cached0 = cached_bytes(npy)
    anon0 = status_kib("RssAnon")
    t0 = time.perf_counter()
    data = open_store(path)
    open_s = time.perf_counter() - t0
    images = data.splits["train"].images
    anon_open = status_kib("RssAnon")
    recipe = ViewRecipe(SPEC.views(simclr_view_config(SIZE, blur=False), SIZE, SimCLRConfig()), *data.stats)
    per_epoch = len(images) // BATCH

    def batch(step: int, seed: int = 0) -> torch.Tensor:
        return epoch_batches(len(images), BATCH, seed, step // per_epoch)[step % per_epoch]

    row = images[0].numel()

    def read(steps_: range, seed: int) -> float:
        t = time.perf_counter()
        for s in steps_:
            x = images[batch(s, seed)]
            assert x.shape == (BATCH, 3, SIZE, SIZE)
        return time.perf_counter() - t

    # reads first, while nothing of the file is mapped in (mapped pages cannot be dropped)
    cached_before_cold = cached_bytes(npy)
    cold_n = 40
    cold_s = read(range(cold_n), seed=1)
    warm_n = 20
    read(range(warm_n), seed=2)  # warms the page cache with these rows
    warm_s = read(range(warm_n), seed=2)

    sampler = Sampler()
    t0 = time.perf_counter()
    with sampler:
        for step in range(steps):
            x = images[batch(step)]  # (256, 3, 224, 224) uint8 from the memory map
            if step % view_every == 0:
                recipe(x, torch.Generator().manual_seed(step))  # two views, dropped at once
            del x
    train_s = time.perf_counter() - t0
    hwm = status_kib("VmHWM")
    return dict(count=len(images), images_gib=npy.stat().st_size / 2**30, steps=steps,
                threads=threads,
                open_seconds=open_s, rss_anon_start_gib=anon0 / 2**20, rss_anon_after_open_gib=anon_open / 2**20,
                peak_rss_anon_gib=sampler.peak_anon / 2**20, peak_rss_file_gib=sampler.peak_file / 2**20,
                vm_hwm_gib=hwm / 2**20, view_every=view_every, steps_seconds=train_s,
                rss_anon_trace_mib=sampler.trace[::max(1, len(sampler.trace) // 50)],
                cached_bytes_after_evict=cached0, cached_bytes_before_cold_read=cached_before_cold,
                cold_images_per_s=cold_n * BATCH / cold_s, cold_mb_per_s=cold_n * BATCH * row / cold_s / 1e6,
                warm_images_per_s=warm_n * BATCH / warm_s, warm_mb_per_s=warm_n * BATCH * row / warm_s / 1e6,
                load_average=os.getloadavg()[0], machine=machine())


def table(out: Path, counts: list[int]) -> str:
    rows = ["| images | images.npy | RssAnon after open_store | peak RssAnon | peak RssFile | peak VmHWM | "
            "steps (views every k-th) | cold read img/s (MB/s) | warm read img/s (MB/s) |", "|" + " --- |" * 9]
    got = {n: json.loads((out / f"store_{n}.json").read_text()) for n in counts if (out / f"store_{n}.json").exists()}
    for n, r in got.items():
        rows.append(f"| {n:,} | {r['images_gib']:.1f} GiB | "
                    f"{r['rss_anon_after_open_gib']:.2f} GiB | "
                    f"{r['peak_rss_anon_gib']:.2f} GiB | {r['peak_rss_file_gib']:.2f} GiB | {r['vm_hwm_gib']:.2f} GiB | "
                    f"{r['steps']} ({r['view_every']}), {r['steps_seconds']:.0f} s | "
                    f"{r['cold_images_per_s']:,.0f} ({r['cold_mb_per_s']:,.0f}) | "
                    f"{r['warm_images_per_s']:,.0f} ({r['warm_mb_per_s']:,.0f}) |")
    if len(got) == 2:
        a, b = (got[n]["peak_rss_anon_gib"] for n in sorted(got))
        rows.append(f"\npeak RssAnon, large / small store: {b / a:.3f}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--view-every", type=int, default=5,
                    help="make the SimCLR views of every k-th batch (224-px views take seconds per batch here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the large store (30 GB) afterwards")
    ap.add_argument("--out-dir", default="benchmarks/out/store_memory")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # a store folder, measured in a child process
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [args.small, args.large]
    if args.measure:
        r = measure(Path(args.measure), args.steps, args.threads, args.view_every)
        (out / f"store_{r['count']}.json").write_text(json.dumps(r, indent=1))
        return
    if not args.table_only:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"RAM {total / 2**30:.1f} GiB; large store {args.large * 3 * SIZE * SIZE / 2**30:.1f} GiB", flush=True)
        for n in counts:
            if (out / f"store_{n}.json").exists():
                continue
            path = BENCH_DATA / f"synthetic{n}"
            secs = write_store(path, n)
            print(f"{path}: written in {secs:.0f} s", flush=True)
            subprocess.run([sys.executable, __file__, "--measure", str(path), "--steps", str(args.steps),
                            "--view-every", str(args.view_every),
                            "--threads", str(args.threads), "--out-dir", str(out)],
                           check=True)
        big = BENCH_DATA / f"synthetic{args.large}"
        if not args.keep and big.exists():
            shutil.rmtree(big)
            print(f"deleted {big} (pass --keep to keep it)")
    print(table(out, counts))


if __name__ == "__main__":
    main()
