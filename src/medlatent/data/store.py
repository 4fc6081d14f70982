"""The in-memory tensor store every method trains from.

A :class:`Dataset` holds one :class:`ImageSet` per split. Images are a single tensor
``(N, C, *spatial)``: uint8 for 8-bit sources (4x smaller than float, converted per batch),
float32 in [0, 1] for normalised 16-bit or medical sources. A batch is one index gather, so
feeding the model costs no per-image Python work; the whole store can live on the GPU.
"""

from __future__ import annotations

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

    def to(self, device: torch.device | str) -> "ImageSet":
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels, self.sources)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images at ``index`` (integer positions or a boolean mask), labels and sources kept aligned."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
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
    """

    name: str
    task: str | None
    class_names: tuple[str, ...]
    splits: dict[str, ImageSet]
    source: str = ""
    info: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> ImageSet:
        if name not in self.splits:
            raise DataError(f"{self.source or self.name}: has no '{name}' split (has: {', '.join(self.splits)})")
        return self.splits[name]

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


def channel_stats(images: torch.Tensor, max_images: int = 20000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images`` (N, C, ...) in [0, 1] units (first max_images)."""
    x = to_float(images[:max_images])
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    std = x.std(dim=dims).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


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
