"""The tensor store every method trains from.

A :class:`Dataset` holds one :class:`ImageSet` per split. Images are a single tensor
``(N, C, *spatial)``: uint8 for 8-bit sources (4x smaller than float, converted per batch),
float32 in [0, 1] for normalised 16-bit or medical sources. A batch is one index gather, so
feeding the model costs no per-image Python work. The tensor is in memory (MedMNIST .npz,
small folders) or a memory map of a prepared store (:func:`open_store`), whose rows are read
from the page cache as they are indexed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medlatent.errors import DataError


@dataclass
class ImageSet:
    """The images (and labels, if any) of one split.

    Attributes:
        images: ``(N, C, H, W)`` or ``(N, C, D, H, W)``, uint8 or float32 in [0, 1].
        labels: ``(N, L)`` int64 (L = 1 for single-label tasks, number of findings for
            multi-label), or None for unlabelled images.
        sources: the file each image was read from (image folders), or None when the
            images came from one array file (a .npz: there the position is the id).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.sources is not None and len(self.sources) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.sources)} source paths")

    def __len__(self) -> int:
        return len(self.images)

    def labelled(self) -> "ImageSet":
        """The images that have a label (a store's unlabelled rows carry -1); itself when all do."""
        if self.labels is None or bool((self.labels[:, 0] >= 0).all()):
            return self
        return self.subset(self.labels[:, 0] >= 0)

    def to(self, device: torch.device | str) -> "ImageSet":
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels, self.sources)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images at ``index`` (integer positions or a boolean mask), labels and sources kept aligned."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
        if not isinstance(self.images, torch.Tensor):  # images decoded on demand: stay lazy
            rows = index.reshape(-1).tolist()
            return ImageSet(self.images.subset(rows), None if self.labels is None else self.labels[index],
                            None if self.sources is None else [self.sources[i] for i in rows])
        if index.dim() == 1 and len(index) and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index))):
            a, b = int(index[0]), int(index[0]) + len(index)  # a run of rows: a view, never a copy of a store
            return ImageSet(self.images[a:b], None if self.labels is None else self.labels[a:b],
                            None if self.sources is None else self.sources[a:b])
        labels = None if self.labels is None else self.labels[index]
        sources = None if self.sources is None else [self.sources[i] for i in index.reshape(-1).tolist()]
        return ImageSet(self.images[index], labels, sources)


def save_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> Path:
    """Write arrays to ``path`` under a temporary name, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    os.replace(tmp, path)
    return path


def save_csv(path: Path, columns: dict[str, np.ndarray | list]) -> Path:
    """Write equal-length columns as a CSV with a header row (atomic, like :func:`save_npz`).

    Numbers are written in numpy's shortest round-trip form, so float32 values read back exactly.
    """
    import csv

    cells = [np.asarray(c).astype(str) if not isinstance(c, list) else c for c in columns.values()]
    if len({len(c) for c in cells}) > 1:
        raise ValueError(f"{path}: columns of different lengths {[len(c) for c in cells]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(columns))
        w.writerows(zip(*cells))
    os.replace(tmp, path)
    return path


def label_columns(labels: torch.Tensor | None, class_names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """(N, L) labels as table columns: ``label`` (class index) for one column, else one
    ``label_<name>`` (0/1) per finding; none for unlabelled images."""
    if labels is None:
        return {}
    y = labels.cpu().numpy()
    if y.shape[1] == 1:
        return {"label": y[:, 0]}
    names = list(class_names) if len(class_names) == y.shape[1] else [str(i) for i in range(y.shape[1])]
    return {f"label_{n}": y[:, j] for j, n in enumerate(names)}


def save_parquet(path: Path, columns: dict[str, np.ndarray | list]) -> Path | None:
    """The same columns as a Parquet file when pyarrow is installed (it is not a dependency);
    None, writing nothing, when it is not."""
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), tmp)
    os.replace(tmp, path)
    return path


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1] (same shape)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@dataclass
class Dataset:
    """Named splits plus what is known about the labels.

    Attributes:
        name: subset name or source path.
        task: MedMNIST task string (see catalogue.TASKS) or None when unlabelled.
        class_names: names in label order (empty when unlabelled).
        splits: split name -> ImageSet (``train``, ``val``, ``test`` for MedMNIST).
        source: file or folder the data came from.
        parts: for a mixture of data sets (``data.mixture``), the source Datasets in order,
            each with its own labels; the mixture's own splits are unlabelled
            (:mod:`medlatent.data.mixture`). Empty for one data set.
    """

    name: str
    task: str | None
    class_names: tuple[str, ...]
    splits: dict[str, ImageSet]
    source: str = ""
    info: dict[str, str] = field(default_factory=dict)
    # Per-channel mean and std of the train split when known in advance (a prepared store).
    stats: tuple[list[float], list[float]] | None = None
    parts: list["Dataset"] = field(default_factory=list)

    def split(self, name: str) -> ImageSet:
        if name not in self.splits:
            hint = ("; draw train/val/test splits once with `medlatent data prepare "
                    f"{self.source or self.name} --output STORE` and use the store") if name in ("val", "test") else ""
            raise DataError(f"{self.source or self.name}: has no '{name}' split (has: {', '.join(self.splits)}){hint}")
        return self.splits[name]

    def labelled(self) -> "Dataset":
        """The same data with only the labelled images of each split (a store or CSV manifest
        may hold unlabelled ones, label -1); itself when every image has a label."""
        kept = {k: v.labelled() for k, v in self.splits.items()}
        if all(kept[k] is self.splits[k] for k in kept):
            return self
        return dataclasses.replace(self, splits=kept)

    @property
    def _any(self) -> ImageSet:
        return next(iter(self.splits.values()))

    @property
    def channels(self) -> int:
        return self._any.images.shape[1]

    @property
    def spatial_dims(self) -> int:
        return self._any.images.dim() - 2

    @property
    def image_size(self) -> int:
        return self._any.images.shape[-1]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def channel_stats(images: torch.Tensor | np.ndarray, max_images: int = 20000,
                  chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images`` (N, C, ...) (uint8, or float in [0, 1]) in [0, 1]
    units, over the first ``max_images``, read ``chunk`` images at a time in float64 sums, so
    memory stays flat however large the images (a memory-mapped store is read, never copied)."""
    n = min(len(images), max_images)
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    for a in range(0, n, chunk):
        part = images[a:min(a + chunk, n)]
        x = torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part
        x = to_float(x).double().transpose(0, 1).reshape(c, -1)  # (C, n * pixels)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / max(count, 1)
    var = (squares / max(count, 1) - mean ** 2).clamp_min(0) * count / max(count - 1, 1)
    return mean.float().tolist(), var.sqrt().float().clamp_min(1e-3).tolist()


def file_checksum(path: Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 of a file's bytes (hex): fast, and enough to tell a changed file. For a DICOM
    series folder: of its ``.dcm`` files' names and bytes, in name order."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    files = [path]
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(".dcm")
                       and not f.name.startswith("."))
    for file in files:
        if path.is_dir():
            h.update(file.name.encode())
        with file.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch; the order is a pure function of (seed, epoch).

    Making the order a function of the epoch number (not of a running RNG) is what lets a
    resumed run see exactly the batches an uninterrupted one would.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
    perm = torch.randperm(n, generator=g)
    stop = (n // batch_size) * batch_size if drop_last else n
    if stop == 0:
        raise DataError(f"{n} images are fewer than one batch of {batch_size}; lower train.batch_size")
    return list(perm[:stop].split(batch_size))


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit mix of integers, for seeding per (seed, epoch/step, rank) generators."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def is_store(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``medlatent data prepare``."""
    return (path / "store.json").is_file() and (path / "images.npy").is_file()


def open_store(path: Path) -> Dataset:
    """A prepared store as a :class:`Dataset` whose images are slices of one memory map.

    Nothing is read into memory but the manifest: ``images[index]`` reads those rows from the
    page cache, so resident memory does not grow with the store. Rows of unlabelled images
    carry the label -1 (:meth:`ImageSet.labelled` keeps the others).

    Raises:
        DataError: a missing or unreadable store.json/manifest.csv, or images.npy changed since
            it was prepared (size, modification time and then its checksum are compared).
    """
    import csv
    import json

    meta_path, images_path = path / "store.json", path / "images.npy"
    try:
        meta = json.loads(meta_path.read_text())
        st = images_path.stat()
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read the store ({e}); prepare it again") from None
    if (st.st_size, st.st_mtime_ns) != (meta["images_bytes"], meta["images_mtime_ns"]):
        got = file_checksum(images_path) if st.st_size == meta["images_bytes"] else "(other size)"
        if got != meta["images_checksum"]:
            raise DataError(f"{images_path}: changed after it was prepared (checksum {got}, store.json has "
                            f"{meta['images_checksum']}); run `medlatent data prepare` again")
    images = _read_only_map(images_path)
    expected = (meta["count"], meta["channels"]) + (meta["size"],) * meta["spatial_dims"]
    if tuple(images.shape) != expected:
        raise DataError(f"{images_path}: holds {tuple(images.shape)}, store.json says {expected}; prepare it again")
    names = list(meta["class_names"])
    lookup = {n: i for i, n in enumerate(names)}
    paths, label_list = [], []
    with (path / "manifest.csv").open(newline="") as f:  # row by row: no per-row dicts kept
        reader = csv.reader(f)
        header = next(reader, [])
        at_path, at_label = header.index("path"), header.index("label")
        for row in reader:
            paths.append(row[at_path])
            label_list.append(lookup.get(row[at_label], -1))
    if len(paths) != meta["count"]:
        raise DataError(f"{path / 'manifest.csv'}: has {len(paths)} rows, the store {meta['count']}; prepare it again")
    labels = torch.tensor(label_list, dtype=torch.int64)[:, None]
    del label_list
    splits = {}
    for split, (a, b) in meta["splits"].items():
        split_labels = labels[a:b] if names else None
        splits[split] = ImageSet(images[a:b], split_labels, paths[a:b])
    ds = Dataset(path.name, meta["task"], tuple(names), splits, str(path),
                 info=dict(store="yes", labelled=str(meta["labelled"])))
    ds.stats = (meta["mean"], meta["std"])
    return ds


def _read_only_map(path: Path) -> torch.Tensor:
    """A .npy file as a tensor over a read-only memory map (nothing is read until indexed).

    Read-only, not copy-on-write: Linux refuses a private writable mapping larger than RAM +
    swap (overcommit), and runs never write into their images. torch warns that it cannot
    mark a tensor read-only; that warning is silenced here, where it is expected.
    """
    import warnings

    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot map the store's images ({e}); prepare it again") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
