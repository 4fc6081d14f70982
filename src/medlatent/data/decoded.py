"""Training straight from a CSV manifest, without ``data prepare``: images decoded when indexed.

``--data images.csv`` (columns ``path`` and optionally ``label``, ``split``, ``group``; relative
paths against the CSV's folder) gives a :class:`Dataset` whose images are
:class:`DecodedImages`: each ``images[index]`` decodes those files on a pool of worker
processes (``data.workers``), resized as ``data prepare`` would, and returns the uint8 batch.
The training loop asks for the next step's rows on its read-ahead thread, so decoding overlaps
the step, and the views are still drawn batched on the training device. Nothing is written.

This suits a first look at new data, or data read once; for repeated runs a store is faster
(each image is decoded once, not once per epoch) and its splits are fixed in its manifest.
Here the splits are drawn the same way each time (seeded, stratified, grouped by the ``group``
column) from the CSV as it is.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from medlatent.data.manifest import assign_splits, read_csv
from medlatent.data.prepare import PrepareConfig, decode
from medlatent.data.store import Dataset, ImageSet, channel_stats
from medlatent.errors import DataError

STATS_SAMPLE = 256  # images decoded at the start for the channel statistics


class DecodedImages:
    """The images of ``paths`` as a read-only (N, C, *S) uint8 batch source, decoded on demand.

    It answers what runs ask of an image tensor: ``len``, ``shape``, ``dtype``, ``dim()`` and
    ``[index]`` for an int, a slice, or a (B,) index tensor (the result is a real tensor).
    """

    def __init__(self, paths: list[str], size: int, channels: int, cfg: PrepareConfig,
                 pool: "_Pool | None" = None) -> None:
        self.paths, self.size, self.channels, self.cfg = paths, size, channels, cfg
        self.pool = pool or _Pool(cfg.workers)
        self.shape = torch.Size((len(paths), channels) + (size,) * cfg.spatial_dims)
        self.dtype = torch.uint8
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.paths)

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(index, int):
            return self[[index]][0]
        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        positions = torch.as_tensor(index).reshape(-1).tolist()
        batch = self.pool.decode([self.paths[i] for i in positions], self.size, self.channels, self.cfg)
        return torch.from_numpy(batch)  # (B, C, *S)

    def to(self, device: torch.device | str) -> "DecodedImages | torch.Tensor":
        """Itself on the CPU (still decoded per batch); on another device, every image decoded
        and moved (what copying a small labelled subset to a GPU means)."""
        if torch.device(device).type == "cpu":
            return self
        return self[:].to(device)

    def subset(self, positions: list[int]) -> "DecodedImages":
        """The same source restricted to ``positions`` (no decoding)."""
        return DecodedImages([self.paths[i] for i in positions], self.size, self.channels, self.cfg, self.pool)


class _Pool:
    """Decode processes, started on first use and shared by every split of one data set."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def decode(self, paths: list[str], size: int, channels: int, cfg: PrepareConfig) -> np.ndarray:
        if self.workers == 1 or len(paths) < 2:
            return _decode_many(paths, size, channels, cfg)
        if self._executor is None:
            from medlatent.data.prepare import _worker_init

            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_init)
        n = -(-len(paths) // self.workers)
        parts = [paths[a:a + n] for a in range(0, len(paths), n)]
        futures = [self._executor.submit(_decode_many, p, size, channels, cfg) for p in parts]
        return np.concatenate([f.result() for f in futures])

    def __del__(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _decode_many(paths: list[str], size: int, channels: int, cfg: PrepareConfig) -> np.ndarray:
    """(len(paths), C, *S) uint8; the first failure is one DataError naming the file."""
    out = []
    for path in paths:
        x, _ = decode(path, size, channels, cfg)
        if x.shape[0] != channels:
            raise DataError(f"{path}: has {x.shape[0]} channel(s), the others {channels}; prepare a store with "
                            f"`medlatent data prepare ... --channels {channels}`")
        out.append(x)
    return np.stack(out)


def load_manifest_csv(path: Path, size: int | None, spatial_dims: int = 2, workers: int = 2,
                      seed: int = 0) -> Dataset:
    """A CSV manifest (see the module docstring) as a Dataset decoded on demand.

    Raises:
        DataError: the manifest's errors (missing files, bad labels or splits, groups in two
            splits; see :mod:`medlatent.data.manifest`), or a first image that cannot be read.
    """
    m = read_csv(path, group_col="group" if _has_column(path, "group") else None)
    if any(e.split is None for e in m.entries):
        m = assign_splits(m, seed=seed)
    cfg = PrepareConfig(size=size, spatial_dims=spatial_dims, workers=workers)
    first, _ = decode(m.entries[0].path, size, None, cfg)
    channels, side = first.shape[0], first.shape[-1]
    pool = _Pool(workers)
    splits: dict[str, ImageSet] = {}
    for split in ("train", "val", "test"):
        entries = [e for e in m.entries if e.split == split]
        if not entries:
            continue
        labels = torch.tensor([[-1 if e.label is None else e.label] for e in entries], dtype=torch.int64) \
            if m.class_names else None
        splits[split] = ImageSet(DecodedImages([e.path for e in entries], side, channels, cfg, pool), labels,
                                 [e.path for e in entries])
    names = m.class_names
    task = None if not names else ("binary-class" if len(names) == 2 else "multi-class")
    ds = Dataset(path.stem, task, tuple(names), splits, str(path), info=dict(decoded="yes"))
    train = splits.get("train") or next(iter(splits.values()))
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    ds.stats = channel_stats(train.images[sample.sort().values])
    return ds


def _has_column(path: Path, name: str) -> bool:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return name in [h.strip() for h in header]
