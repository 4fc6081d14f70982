"""``medlatent data prepare``: decode a manifest once, in parallel, into a memory-mapped store.

A store is a folder::

    images.npy     (N, C, *spatial) uint8, rows in split order (train, then val, then test),
                   so each split is one contiguous slice of the memory map
    manifest.csv   one row per image: index (row of images.npy), path, label, split, group,
                   the original size (height, width[, depth]) and the file's checksum
    store.json     size, channels, splits (row ranges), class names, channel statistics of the
                   train split, the checksum of images.npy, and the fingerprint of the inputs

Steps: read the manifest (:mod:`medlatent.data.manifest`), draw the splits if none are given,
check the disk has room, decode every file on ``workers`` processes straight into the memory
map (nothing is sent back but a few numbers per image), then publish: the store is built in
a hidden sibling folder and renamed into place, so a store that exists is complete, and a
killed or failed ``prepare`` leaves nothing in the way of a re-run. Re-running with the same
inputs (files, their sizes and modification times, labels, splits, options) reuses the store.

Why a plain ``.npy`` memory map rather than a chunked array library (zarr): the training loop
reads random rows, and a memory-mapped row is one ``memcpy`` from the page cache with no
decompression; ``np.load(path, mmap_mode="r")`` opens it anywhere without medlatent. Measured
in ``docs/data-at-scale.md``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medlatent import progress
from medlatent.dist import process_alive
from medlatent.config import bounded, check_ranges
from medlatent.data.folders import dicom_files
from medlatent.data.manifest import Entry, Manifest, assign_splits, dicom_series
from medlatent.data.store import channel_stats, file_checksum
from medlatent.errors import DataError

STORE_FORMAT = "medlatent-store"
STORE_VERSION = 1
SPLIT_ORDER = ("train", "val", "test")
CHUNK = 32  # images per task handed to a decode worker


@dataclass
class PrepareConfig:
    """How a manifest becomes a store."""

    # Output side in pixels (voxels for volumes); None: the first image's shorter side.
    size: int | None = bounded(None, ge=8, le=4096)
    # 2 for images, 3 for volumes (NIfTI or 3-D DICOM files -> (N, 1, D, H, W)).
    spatial_dims: int = bounded(2, ge=2, le=3)
    # Channels of the store; None: the first image's, and an image with another count is
    # refused. 1 or 3 converts (grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma).
    channels: int | None = bounded(None, ge=1, le=3)
    # "auto": 8-bit files kept as they are, DICOM by the window in its header (after
    # RescaleSlope/Intercept), everything else by the 0.5-99.5 percentiles of each image.
    normalize: Literal["auto", "percentile", "window", "none"] = "auto"
    # (centre, width) for normalize="window" (CT soft tissue: 40, 400 HU).
    window: tuple[float, float] = (40.0, 400.0)
    # train/val/test fractions for images without a given split (stratified, grouped).
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    # Decode processes; 1 decodes in this process.
    workers: int = bounded(1, ge=1, le=256)
    # Leave unreadable files out (listed and counted) instead of refusing the whole store.
    skip_bad: bool = False
    # A 2-D store from volumes: every slice of a NIfTI volume along its last axis (axial for
    # RAS-oriented files) becomes an image; the manifest records the slice. 2-D files stay one image.
    slices: bool = False


@dataclass
class PreparedStore:
    """What :func:`prepare` made (or found)."""

    path: Path
    count: int
    size: int
    channels: int
    splits: dict[str, int]
    reused: bool
    skipped: list[tuple[int, str, str]]  # (row, path, reason) of files left out with skip_bad
    seconds: float


def prepare(manifest: Manifest, output: str | os.PathLike[str], cfg: PrepareConfig | None = None,
            overwrite: bool = False) -> PreparedStore:
    """Decode ``manifest`` into a store at ``output`` (see the module docstring).

    Raises:
        DataError: unreadable files (all listed in ``<output>.unreadable.csv``; none are kept
            unless ``cfg.skip_bad``), mixed channel counts, too little disk space, an
            ``output`` that holds something else.
    """
    import time

    t0 = time.perf_counter()
    cfg = cfg or PrepareConfig()
    check_ranges(cfg, "prepare")
    output = Path(output)
    if cfg.spatial_dims == 3:
        manifest = dicom_series(manifest)  # the .dcm slices of one folder: one volume
    manifest = assign_splits(manifest, cfg.split, cfg.seed) if any(e.split is None for e in manifest.entries) \
        else manifest
    entries = sorted(manifest.entries, key=lambda e: SPLIT_ORDER.index(e.split))  # stable within a split
    if not entries:
        raise DataError(f"{manifest.source}: no images")
    fingerprint = _fingerprint(entries, manifest.class_names, cfg)
    found = _existing(output, fingerprint, overwrite)
    if found is not None:
        return dataclasses.replace(found, seconds=time.perf_counter() - t0)
    _remove_stale_temporaries(output)
    entries, frames = _expand_slices(entries, cfg)  # one row per image (per slice with cfg.slices)

    first = _first_image(entries, frames, cfg)  # fixes size and channels (C, *S)
    channels, size = first.shape[0], first.shape[-1]
    shape = (len(entries), channels) + (size,) * cfg.spatial_dims
    _check_disk(output.parent, int(np.prod(shape)))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        images = _allocate(tmp / "images.npy", shape)
        del images
        records = _decode_all(entries, frames, tmp / "images.npy", size, channels, cfg)
        bad = list(dict.fromkeys((entries[i].row, entries[i].path, reason)
                                 for i, (_, _, reason) in sorted(records.items()) if reason))
        report = output.with_name(f"{output.name}.unreadable.csv")
        if bad and not cfg.skip_bad:
            _write_bad(report, bad)
            row, path, reason = bad[0]
            raise DataError(f"{path} (row {row} of {manifest.source}): {reason}; {len(bad)} unreadable file(s) "
                            f"listed in {report}; fix or remove them, or pass --skip-bad")
        report.unlink(missing_ok=True)
        keep = [i for i in range(len(entries)) if not records[i][2]]
        if len(keep) < len(entries):
            _compact(tmp / "images.npy", keep)
            _write_bad(report, bad)
        kept = [entries[i] for i in keep]
        kept_frames = [frames[i] for i in keep]
        meta = _describe(tmp / "images.npy", kept, [records[i] for i in keep], manifest, cfg, fingerprint,
                         size, channels)
        _write_manifest(tmp / "manifest.csv", kept, kept_frames if cfg.slices else None, [records[i] for i in keep],
                        manifest.class_names, cfg.spatial_dims)
        (tmp / "store.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, output, fingerprint, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{output}: writing the store failed ({e.strerror or e}); nothing was kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    splits = {s: b - a for s, (a, b) in meta["splits"].items()}
    return PreparedStore(output, meta["count"], size, channels, splits, False, bad if cfg.skip_bad else [],
                         time.perf_counter() - t0)


# --- decoding ---------------------------------------------------------------------------------

def decode(path: str, size: int | None, channels: int | None, cfg: PrepareConfig,
           frame: int | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """One file (or slice ``frame`` of a volume) -> ((C, *size) uint8, original spatial shape).

    Raises:
        DataError: unreadable file, wrong dimensionality, a channel count that cannot be converted.
    """
    from medlatent.data.folders import fit_array

    p = Path(path)
    a = _read(p)  # (C, *spatial) in the file's own range
    if frame is not None:
        a = a[..., frame]  # (C, H, W): one slice along the volume's last axis
    original = tuple(int(s) for s in a.shape[1:])
    if channels is not None and a.shape[0] != channels:
        a = _convert_channels(a, channels, p)
    normalize, window = _normalization(p, a, cfg)
    side = size if size is not None else min(a.shape[1:])
    x = fit_array(a, p, side, cfg.spatial_dims, normalize, window, (0.5, 99.5))
    if x.dtype != np.uint8:
        x = np.rint(x * 255).astype(np.uint8)
    return x, original


_LAST: list = [None, None]  # the last file read in this process: a volume's slices are read once


def _read(path: Path) -> np.ndarray:
    from medlatent.data.folders import read_image

    if _LAST[0] != path:
        _LAST[:] = [path, read_image(path)]
    return _LAST[1]


def _expand_slices(entries: list[Entry], cfg: PrepareConfig) -> tuple[list[Entry], list[int | None]]:
    """Rows of the store: one per entry, or with ``cfg.slices`` one per slice of each NIfTI
    volume (its depth read from the header, not the data)."""
    if not cfg.slices:
        return entries, [None] * len(entries)
    rows, frames = [], []
    for e in entries:
        depth = _nifti_depth(Path(e.path))
        rows += [e] * (depth or 1)
        frames += list(range(depth)) if depth else [None]
    return rows, frames


def _nifti_depth(path: Path) -> int | None:
    """Slices along the last axis of a 3-D NIfTI file; None for anything else."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel

    try:
        shape = nibabel.load(str(path)).shape
    except Exception as e:  # nibabel raises many types; the row is refused with the reason
        raise DataError(f"{path}: cannot read the NIfTI header ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return int(shape[2]) if len(shape) >= 3 else None


def _normalization(path: Path, a: np.ndarray, cfg: PrepareConfig) -> tuple[str, tuple[float, float]]:
    """The intensity rule for one decoded image (see PrepareConfig.normalize)."""
    if cfg.normalize != "auto":
        return cfg.normalize, cfg.window
    if a.dtype == np.uint8:
        return "none", cfg.window
    if path.name.lower().endswith(".dcm") or path.is_dir():  # a file, or a series: its first slice's header
        window = _dicom_window(path if not path.is_dir() else dicom_files(path)[0])
        if window is not None:
            return "window", window
    return "percentile", cfg.window


def _dicom_window(path: Path) -> tuple[float, float] | None:
    """(WindowCenter, WindowWidth) from a DICOM header (the first value of each), or None."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, Sequence) and not isinstance(v, str) else float(v)  # noqa: E731
    return (first(centre), first(width)) if first(width) > 0 else None


def _convert_channels(a: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """(C, *S) -> (channels, *S): grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma."""
    if a.shape[0] == 1 and channels == 3:
        return np.repeat(a, 3, axis=0)
    if a.shape[0] == 3 and channels == 1:
        luma = np.tensordot(np.array([0.299, 0.587, 0.114], dtype=np.float32), a.astype(np.float32), axes=1)[None]
        return np.rint(luma).astype(np.uint8) if a.dtype == np.uint8 else luma
    raise DataError(f"{path}: has {a.shape[0]} channels; cannot convert to {channels}")


def _first_image(entries: list[Entry], frames: list[int | None], cfg: PrepareConfig) -> np.ndarray:
    """The first readable image at the store's size: it fixes the size (when not given) and
    the channels. Unreadable files before it are reported with the others, by the workers.

    Raises:
        DataError: the first of the files' errors, when none of the first 100 can be read.
    """
    first_error: DataError | None = None
    for entry, frame in list(zip(entries, frames))[:100]:
        try:
            return decode(entry.path, cfg.size, cfg.channels, cfg, frame)[0]
        except DataError as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


@dataclass
class _Job:
    store: str
    positions: list[int]
    paths: list[str]
    frames: list[int | None]
    size: int
    channels: int
    cfg: PrepareConfig


def _decode_chunk(job: _Job) -> list[tuple[int, tuple[int, ...], str, str]]:
    """Decode a chunk of files into their rows of the memory map (runs in a worker).

    Returns (position, original shape, checksum, reason) per file; reason is "" when it was
    stored, else why the file could not be.
    """
    images = np.load(job.store, mmap_mode="r+")
    out = []
    checksums: dict[str, str] = {}
    for i, path, frame in zip(job.positions, job.paths, job.frames):
        try:
            checksum = checksums.get(path) or checksums.setdefault(path, file_checksum(Path(path)))
            x, original = decode(path, job.size, job.cfg.channels, job.cfg, frame)
            if x.shape[0] != job.channels:
                raise DataError(f"{path}: has {x.shape[0]} channel(s), the store has {job.channels} (from its "
                                f"first image); pass --channels {job.channels} to convert")
            images[i] = x
            out.append((i, original, checksum, ""))
        except DataError as e:
            out.append((i, (), "", str(e).removeprefix(f"{path}: ")))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            out.append((i, (), "", f"cannot read ({e.strerror or e})"))
    images.flush()
    return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one decode per core; torch would otherwise oversubscribe


def _decode_all(entries: list[Entry], frames: list[int | None], store: Path, size: int, channels: int,
                cfg: PrepareConfig) -> dict[int, tuple[tuple[int, ...], str, str]]:
    """Decode every row into ``store``; position -> (original shape, checksum, reason)."""
    jobs = [_Job(str(store), list(range(a, min(a + CHUNK, len(entries)))),
                 [e.path for e in entries[a:a + CHUNK]], frames[a:a + CHUNK], size, channels, cfg)
            for a in range(0, len(entries), CHUNK)]
    records: dict[int, tuple[tuple[int, ...], str, str]] = {}

    def collect(results: list[tuple[int, tuple[int, ...], str, str]]) -> None:
        for i, original, checksum, reason in results:
            records[i] = (original, checksum, reason)
        progress.report("prepare", len(records), len(entries))

    if cfg.workers == 1:
        for job in jobs:
            collect(_decode_chunk(job))
        return records
    import multiprocessing

    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        for results in pool.map(_decode_chunk, jobs):
            collect(results)
    return records


# --- the store folder -------------------------------------------------------------------------

def _allocate(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """An all-zero uint8 .npy of ``shape``, its blocks reserved on disk now, so that a full disk
    is an error here rather than a crash (SIGBUS) when a worker writes into a sparse page."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return images


def _check_disk(folder: Path, n_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if n_bytes + (64 << 20) > free:
        raise DataError(f"{folder}: the store needs {n_bytes / 2**30:.2f} GiB and the disk has "
                        f"{free / 2**30:.2f} GiB free; choose a smaller --size or another --output")


def _compact(path: Path, keep: list[int]) -> None:
    """Rewrite the .npy with only the rows ``keep`` (in order), chunk by chunk."""
    src = np.load(path, mmap_mode="r")
    new = path.with_name("images.compact.npy")
    dst = _allocate(new, (len(keep),) + src.shape[1:])
    for a in range(0, len(keep), 1024):
        dst[a:a + 1024] = src[keep[a:a + 1024]]
    dst.flush()
    del src, dst
    os.replace(new, path)


def _describe(images_path: Path, entries: list[Entry], records: list[tuple[tuple[int, ...], str, str]],
              manifest: Manifest, cfg: PrepareConfig, fingerprint: str, size: int, channels: int) -> dict:
    """store.json's content: shape, splits as row ranges, classes, statistics, checksums."""
    splits: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        a, _ = splits.get(e.split, [i, i])
        splits[e.split] = [a, i + 1]
    images = np.load(images_path, mmap_mode="r")
    a, b = splits.get("train", [0, len(entries)])
    mean, std = channel_stats(images[a:b])
    names = list(manifest.class_names)
    task = None if not names else ("binary-class" if len(names) == 2 else "multi-class")
    st = images_path.stat()
    return dict(format=STORE_FORMAT, version=STORE_VERSION, count=len(entries), channels=channels, size=size,
                spatial_dims=cfg.spatial_dims, splits=splits, class_names=names, task=task,
                labelled=sum(e.label is not None for e in entries), mean=mean, std=std,
                source=manifest.source, options=_options(cfg), fingerprint=fingerprint,
                images_bytes=st.st_size, images_mtime_ns=st.st_mtime_ns, images_checksum=file_checksum(images_path))


def _write_manifest(path: Path, entries: list[Entry], frames: list[int | None] | None,
                    records: list[tuple[tuple[int, ...], str, str]], class_names: tuple[str, ...],
                    spatial_dims: int) -> None:
    from medlatent.data.manifest import columns
    from medlatent.data.store import save_csv

    cols: dict[str, list] = {"index": list(range(len(entries)))}
    cols.update(columns(Manifest(entries, class_names, "")))
    if frames is not None:
        cols["slice"] = ["" if f is None else f for f in frames]
    names = ("depth", "height", "width")[3 - spatial_dims:]
    for j, name in enumerate(names):
        cols[name] = [r[0][j] if len(r[0]) > j else "" for r in records]
    cols["checksum"] = [r[1] for r in records]
    save_csv(path, cols)


def _write_bad(path: Path, bad: list[tuple[int, str, str]]) -> None:
    from medlatent.data.store import save_csv

    save_csv(path, {"row": [b[0] for b in bad], "path": [b[1] for b in bad], "reason": [b[2] for b in bad]})


def _options(cfg: PrepareConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("workers")  # how many processes decoded does not change the store
    return d


def _fingerprint(entries: list[Entry], class_names: tuple[str, ...], cfg: PrepareConfig) -> str:
    """sha256 over the options and every file's path, size, mtime, label, split and group."""
    h = hashlib.sha256(json.dumps([_options(cfg), list(class_names)], sort_keys=True, default=list).encode())
    for e in entries:
        h.update(json.dumps([e.path, e.label, e.split, e.group, *_stamp(Path(e.path))]).encode())
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    """A file's (size, mtime); a series folder's, slice by slice; (-1, -1) when it is missing."""
    try:
        files = dicom_files(path) if path.is_dir() else [path]
        return [v for f in files for v in (f.stat().st_size, f.stat().st_mtime_ns)]
    except OSError:
        return [-1, -1]


def _existing(output: Path, fingerprint: str, overwrite: bool) -> PreparedStore | None:
    """The store already at ``output`` when it was made from the same inputs; None when there
    is none (or it is to be replaced).

    Raises:
        DataError: ``output`` holds something else, or a store of other inputs (without overwrite).
    """
    meta_path = output / "store.json"
    if not output.exists():
        return None
    if not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder; choose another --output")
    if not meta_path.is_file():
        if any(output.iterdir()):
            raise DataError(f"{output}: exists and is not a medlatent store; choose another --output")
        output.rmdir()
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") == fingerprint:
        splits = {s: b - a for s, (a, b) in meta["splits"].items()}
        return PreparedStore(output, meta["count"], meta["size"], meta["channels"], splits, True, [], 0.0)
    if not overwrite:
        raise DataError(f"{output}: holds a store prepared from other files, labels, splits or options; "
                        "choose another --output, or pass --overwrite to replace it")
    return None


def _publish(tmp: Path, output: Path, fingerprint: str, overwrite: bool) -> None:
    """Rename the finished store into place; an old one (overwrite) is swapped out, then removed.
    When another process published the same store first, ours is dropped."""
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists() and overwrite:
        os.replace(output, old)
    try:
        os.rename(tmp, output)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        meta = json.loads((output / "store.json").read_text()) if (output / "store.json").is_file() else {}
        shutil.rmtree(tmp, ignore_errors=True)
        if meta.get("fingerprint") != fingerprint:
            raise DataError(f"{output}: another process wrote a different store there meanwhile") from None
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(output: Path) -> None:
    """Hidden build folders of ``prepare`` processes that no longer exist (killed runs)."""
    for tmp in output.parent.glob(f".{output.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
