"""``prepare`` throughput: images/s with 1 and 2 decode workers, on 256-px PNG files, 1024-px PNG
files and 16-bit CT-like DICOM files (512 x 512), all into 224-px stores.

Each cell runs ``prepare`` twice into fresh folders: on a few images (``--small``, 64: two decode
chunks) and on all of them. The steady rate is the difference, (N - n) / (T(N) - T(n)); the fixed
cost is what is left of T(n), T(n) - n / rate: the first image, allocating the store, the final
checksum and statistics, and with workers > 1 starting the ``spawn`` processes (each imports
numpy, torch and MONAI; the calling process has imported them before the clock starts). The
input files are in the page cache (just written or read).

Data (made once under /work/bench-data/): the 20,000 PNG files of input_pipeline.py (256 px),
``--n-1024`` 1024-px PNG crops of retina.jpg (random position, flips), and ``--n-dicom`` DICOM
files written with pydicom: CT Image Storage, explicit VR little endian, uint16 with
RescaleSlope 1 / RescaleIntercept -1024, WindowCenter 40 / WindowWidth 400, pixel values from
the real images mapped to -1000..+1000 HU.

Usage:
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/prepare_throughput.py --workers 1
    python benchmarks/prepare_throughput.py --workers 2      # both cores
    python benchmarks/prepare_throughput.py --table-only
One JSON per (files, workers) under benchmarks/out/prepare_throughput/; a rerun skips those done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from input_pipeline import BENCH_DATA, load_average, machine, make_pngs, random_crop, real_images  # benchmarks/

SIZE = 224


def make_big_pngs(folder: Path, n: int, side: int = 1024, seed: int = 1) -> list[Path]:
    """``n`` PNG crops of retina.jpg of ``side`` px (random position, random flips)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"retina_{i:05d}.png" for i in range(n)]
    retina = real_images()[0]
    for i, p in enumerate(paths):
        if p.exists():
            continue
        rng = np.random.default_rng((seed, i))
        y, x = (int(rng.integers(retina.shape[k] - side + 1)) for k in (0, 1))
        a = retina[y:y + side, x:x + side]
        a = a[:, ::-1] if rng.random() < 0.5 else a
        tmp = p.with_name(f".{p.name}.tmp")
        Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, p)
    return paths


def make_dicoms(folder: Path, n: int, side: int = 512, seed: int = 2) -> list[Path]:
    """``n`` 16-bit CT-like DICOM files of ``side`` x ``side`` px (see the module docstring)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"ct_{i:05d}.dcm" for i in range(n)]
    sources = real_images()
    for i, p in enumerate(paths):
        if p.exists():
            continue
        rng = np.random.default_rng((seed, i))
        grey = random_crop(sources, side, rng).astype(np.float32).mean(-1)  # (side, side) in 0-255
        hu = grey / 255 * 2000 - 1000  # -1000 (air) .. +1000 (bone)
        stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)  # HU = 1 * stored - 1024
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", f"P{i // 50:04d}", i % 50 + 1
        ds.Rows, ds.Columns = side, side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelSpacing = [0.7, 0.7]
        ds.PixelData = stored.tobytes()
        tmp = p.with_name(f".{p.name}.tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, p)
    pydicom.dcmread(paths[0]).pixel_array  # noqa: B018 - a written file reads back
    return paths


def files_of(kind: str, args: argparse.Namespace) -> list[Path]:
    if kind == "png256":
        return make_pngs(BENCH_DATA / "pngs", 20000, 256)[:args.n_256]
    if kind == "png1024":
        return make_big_pngs(BENCH_DATA / "pngs1024", args.n_1024)
    return make_dicoms(BENCH_DATA / "dicom", args.n_dicom)


def timed_prepare(files: list[Path], workers: int, out: Path) -> float:
    """Seconds ``prepare`` takes for ``files`` into a fresh store at ``out`` (removed after)."""
    from medlatent.data.manifest import Entry, Manifest
    from medlatent.data.prepare import PrepareConfig, prepare

    shutil.rmtree(out, ignore_errors=True)
    manifest = Manifest([Entry(str(p), None, "train", None, i + 2) for i, p in enumerate(files)], (), "bench")
    t0 = time.perf_counter()
    store = prepare(manifest, out, PrepareConfig(size=SIZE, workers=workers))
    dt = time.perf_counter() - t0
    assert store.count == len(files) and not store.reused
    shutil.rmtree(out)
    return dt


def run_cell(kind: str, workers: int, args: argparse.Namespace) -> dict:
    files = files_of(kind, args)
    for p in files:  # into the page cache, so every cell reads from memory
        p.read_bytes()
    out = BENCH_DATA / "prepare_tmp" / f"{kind}_{workers}"
    from medlatent.data.prepare import PrepareConfig, decode

    decode(str(files[0]), SIZE, None, PrepareConfig(size=SIZE))  # imports torch and MONAI here, untimed
    load0 = load_average()
    t_small = timed_prepare(files[:args.small], workers, out)
    t_all = timed_prepare(files, workers, out)
    rate = (len(files) - args.small) / (t_all - t_small)
    return dict(kind=kind, workers=workers, n=len(files), n_small=args.small, seconds_all=t_all,
                seconds_small=t_small, images_per_s=rate, images_per_s_per_worker=rate / workers,
                fixed_seconds=t_small - args.small / rate, overall_images_per_s=len(files) / t_all,
                file_mb=sum(p.stat().st_size for p in files) / len(files) / 1e6,
                load_before=load0, load_after=load_average(), cores=len(os.sched_getaffinity(0)), machine=machine())


KINDS = {"png256": "PNG 256 px RGB", "png1024": "PNG 1024 px RGB", "dicom": "DICOM 512 px 16-bit CT"}


def table(out: Path) -> str:
    rows = ["| files | workers | cores | images/s | images/s per worker | fixed cost | all N: seconds (overall img/s) "
            "| file size | load avg |", "|" + " --- |" * 9]
    for kind, name in KINDS.items():
        for w in (1, 2):
            f = out / f"{kind}_w{w}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            rows.append(f"| {name} | {w} | {r['cores']} | {r['images_per_s']:,.0f} | "
                        f"{r['images_per_s_per_worker']:,.0f} | "
                        f"{r['fixed_seconds']:.1f} s | {r['n']:,}: {r['seconds_all']:.1f} s "
                        f"({r['overall_images_per_s']:,.0f}) | {r['file_mb']:.2f} MB | {r['load_before']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--n-256", type=int, default=4000)
    ap.add_argument("--n-1024", type=int, default=300)
    ap.add_argument("--n-dicom", type=int, default=500)
    ap.add_argument("--small", type=int, default=64)
    ap.add_argument("--out-dir", default="benchmarks/out/prepare_throughput")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for kind in args.kinds.split(","):
            for w in (int(x) for x in args.workers.split(",")):
                f = out / f"{kind}_w{w}.json"
                if f.exists():
                    continue
                r = run_cell(kind, w, args)
                f.write_text(json.dumps(r, indent=1))
                print(f"{kind} workers {w}: {r['images_per_s']:.0f} img/s, fixed {r['fixed_seconds']:.1f} s",
                      flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
