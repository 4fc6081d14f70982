"""Load MedMNIST files (official or any .npz in MedMNIST layout) into a :class:`Dataset`.

MedMNIST layout: arrays ``{split}_images`` (N, H, W) / (N, H, W, 3) / (N, D, H, W) uint8 and
``{split}_labels`` (N, L) for split in train, val, test. Images become ``(N, C, *spatial)``;
RGBA (last axis 4) loses its alpha channel, as in image folders.

Pixel values, by dtype of ``{split}_images`` (the same rule for every split of a file):

* uint8: kept as uint8 (0..255, converted to [0, 1] per batch);
* other integers (uint16, int16, int32, ...): raw intensities, scaled to float32 [0, 1] by
  the 0.5 and 99.5 percentiles of all image splits of the file together (values beyond them
  clip), so 12-bit data stored in uint16 spans [0, 1] and train/val/test share one mapping;
* bool: 0.0 / 1.0 float32;
* floats: must be finite and already in [0, 1] (kept as float32); anything else is a
  DataError (refused, not guessed at: rescale the array, or store raw integers).

Labels ``{split}_labels`` must be whole numbers (integral floats such as 1.0 are accepted)
and non-negative; with catalogue info, class indices lie in 0..n_classes-1 (one column) or,
for multi-label subsets, are 0/1 with one column per finding. Without it, several columns
mean multi-label and must be 0/1.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from medlatent.data.catalogue import MULTI_LABEL, MedMNISTInfo, get_info
from medlatent.data.download import fetch
from medlatent.data.store import Dataset, ImageSet
from medlatent.errors import DataError

SPLITS = ("train", "val", "test")
PERCENTILES = (0.5, 99.5)  # robust to hot pixels and to 12-bit data in a 16-bit container
_MAX_SAMPLE = 1 << 24  # percentiles of larger files come from a fixed random sample of this many values
_FLOAT_TOL = 1e-4  # float images a rounding error outside [0, 1] are clipped, not refused


def load_medmnist(name: str, size: int = 28, data_dir: str | None = None,
                  splits: tuple[str, ...] = SPLITS) -> Dataset:
    """Load an official MedMNIST subset, downloading it (md5-verified) if it is not local.

    Args:
        name: subset name, e.g. ``bloodmnist`` (see ``medlatent data list``).
        size: image side: 28, 64, 128 or 224 (3-D subsets: 28 or 64).
        data_dir: data folder; None means $MEDLATENT_DATA, else ~/.cache/medlatent.
        splits: which splits to load.
    """
    info = get_info(name)
    path = fetch(info, size, data_dir)
    ds = load_npz(path, splits=splits, spatial_dims=info.spatial_dims, info=info)
    for split, s in ds.splits.items():
        if len(s) != info.splits[split]:
            raise DataError(f"{path}: {split} has {len(s)} images, the catalogue says {info.splits[split]}")
    return ds


def load_npz(path: str | Path, splits: tuple[str, ...] = SPLITS, spatial_dims: int | None = None,
             info: MedMNISTInfo | None = None) -> Dataset:
    """Load a .npz in MedMNIST layout (official, generated samples, or the user's own).

    Pixel values and labels follow the rules of the module docstring.

    Raises:
        DataError: unreadable or truncated file, no image arrays, pixel values outside those
            rules (floats outside [0, 1], NaN), or labels that do not match the images in
            number or are not valid class indices for the task.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = _read_splits(path, splits)
    if not raw:
        raise DataError(f"{path}: no image arrays found; expected keys like train_images, val_images, test_images")
    intensity = _intensity_range(path, {split: x for split, (x, _) in raw.items()})
    out: dict[str, ImageSet] = {}
    for split in list(raw):
        x, y = raw.pop(split)  # drop the raw array once converted
        images = _to_nchw(x, spatial_dims, path, split, intensity)
        labels = None if y is None else _labels(y, len(images), path, split, info)
        out[split] = ImageSet(images, labels)
    if info is not None:
        return Dataset(info.name, info.task, info.labels, out, str(path),
                       {"licence": info.licence, "modality": info.modality})
    task = _guess_task(out)
    return Dataset(path.stem, task, _class_names(out, task), out, str(path))


def _read_splits(path: Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """split -> (``{split}_images`` as stored, ``{split}_labels`` or None), for the splits present."""
    raw: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for split in splits:
                if f"{split}_images" in keys:
                    y = np.asarray(z[f"{split}_labels"]) if f"{split}_labels" in keys else None
                    raw[split] = (np.asarray(z[f"{split}_images"]), y)
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz file (truncated or corrupt: {e})") from None
    return raw


def _raw_intensities(a: np.ndarray) -> bool:
    """Integer pixels other than uint8: raw intensities that need a mapping to [0, 1]."""
    return np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8


def _intensity_range(path: Path, images: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """The (low, high) that maps raw integer intensities of every split to [0, 1]: the
    :data:`PERCENTILES` of all splits together (min/max if they coincide). None when the
    images are uint8, bool or float, which need no mapping.

    Raises:
        DataError: some splits hold raw integers and others not (they could not share a mapping).
    """
    raw = {split: a for split, a in images.items() if _raw_intensities(a)}
    if not raw:
        return None
    if len(raw) < len(images):
        split, other = next(iter(raw)), next(s for s in images if s not in raw)
        raise DataError(f"{path}: {split}_images is {raw[split].dtype} but {other}_images is {images[other].dtype}; "
                        "expected one pixel type for every split, so that they share one intensity mapping")
    flat = [a.reshape(-1) for a in raw.values() if a.size]
    total = sum(a.size for a in flat)
    if total == 0:
        return 0.0, 1.0
    sample = flat
    if total > _MAX_SAMPLE:  # a fixed sample keeps this fast and small for large files
        rng = np.random.default_rng(0)
        sample = [a[rng.integers(0, a.size, max(1, _MAX_SAMPLE * a.size // total))] for a in flat]
    lo, hi = np.percentile(np.concatenate(sample), PERCENTILES)
    if hi <= lo:  # e.g. mostly-background images: fall back to the full range
        lo, hi = min(float(a.min()) for a in flat), max(float(a.max()) for a in flat)
    return float(lo), float(hi)


def _to_unit(a: np.ndarray, intensity: tuple[float, float] | None, path: Path, split: str) -> np.ndarray:
    """Pixels as stored -> uint8 (kept) or float32 in [0, 1], by the module docstring's rule."""
    key = f"{split}_images"
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a, dtype=np.float32)
    if _raw_intensities(a):
        lo, hi = intensity if intensity is not None else (0.0, 1.0)
        x = np.ascontiguousarray(a, dtype=np.float32)
        x -= np.float32(lo)
        x /= np.float32(max(hi - lo, 1.0))
        return np.clip(x, 0, 1, out=x)
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{path}: {key} holds {a.dtype} values; expected integer, bool or float pixels")
    x = np.ascontiguousarray(a, dtype=np.float32)
    if not x.size:
        return x
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {key} holds NaN or infinite values; expected finite floats in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_FLOAT_TOL or hi > 1 + _FLOAT_TOL:
        raise DataError(f"{path}: {key} holds floats in [{lo:.6g}, {hi:.6g}]; expected floats in [0, 1] "
                        "(rescale the array, or store integer pixels, which are scaled)")
    return np.clip(x, 0, 1, out=x)


def _labels(y: np.ndarray, n_images: int, path: Path, split: str, info: MedMNISTInfo | None) -> torch.Tensor:
    """``{split}_labels`` (N[, L]) -> (N, L) int64 class indices (or 0/1 findings), checked.

    Raises:
        DataError: wrong number of rows or columns, non-integral or non-finite values,
            negative values, or values outside the task's range.
    """
    key = f"{split}_labels"
    if y.ndim == 0 or len(y) != n_images:
        raise DataError(f"{path}: {key} has {len(y) if y.ndim else 'a single'} entries for {n_images} images")
    y = y.reshape(len(y), -1)
    if y.dtype != np.bool_ and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating):
            raise DataError(f"{path}: {key} holds {y.dtype} values; expected integer class indices")
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise DataError(f"{path}: {key} holds {_first(y, bad)}; expected integer class indices (whole numbers)")
    y = y.astype(np.int64)
    hi, expected = _label_range(y, key, path, info)
    bad = (y < 0) | (y > hi) if hi is not None else y < 0
    if bad.any():
        raise DataError(f"{path}: {key} holds {_first(y, bad)}; expected {expected}")
    return torch.from_numpy(y)


def _label_range(y: np.ndarray, key: str, path: Path, info: MedMNISTInfo | None) -> tuple[int | None, str]:
    """The largest valid label of (N, L) labels (None: no upper bound) and its wording.

    Raises:
        DataError: the number of columns does not fit the catalogue's task.
    """
    multi_label = info.task == MULTI_LABEL if info is not None else y.shape[1] > 1
    if info is not None:
        want = info.n_classes if multi_label else 1
        if y.shape[1] != want:
            what = "one per finding" if multi_label else "one class index per image"
            raise DataError(f"{path}: {key} has {y.shape[1]} columns; expected {want} ({what} of {info.name})")
    if multi_label:
        return 1, "0 or 1 (multi-label: one column per label)"
    if info is not None:
        return info.n_classes - 1, f"class indices 0..{info.n_classes - 1} ({info.name} has {info.n_classes} classes)"
    return None, "non-negative class indices"


def _first(y: np.ndarray, bad: np.ndarray) -> str:
    """'VALUE at row R[, column C]' for the first True of ``bad`` (same shape as (N, L) ``y``)."""
    row, col = (int(i) for i in np.argwhere(bad)[0])
    where = f"row {row}" if y.shape[1] == 1 else f"row {row}, column {col}"
    value = y[row, col]
    return f"{value.item():g} at {where}" if np.issubdtype(y.dtype, np.floating) else f"{value} at {where}"


def _class_names(splits: dict[str, ImageSet], task: str | None) -> tuple[str, ...]:
    """Names "0", "1", ... for labels found in a file that carries no names."""
    labelled = [s.labels for s in splits.values() if s.labels is not None]
    if task is None or not labelled:
        return ()
    y = torch.cat(labelled)
    n = y.shape[1] if y.shape[1] > 1 else int(y.max()) + 1
    return tuple(str(i) for i in range(n))


def _to_nchw(a: np.ndarray, spatial_dims: int | None, path: Path, split: str,
             intensity: tuple[float, float] | None = None) -> torch.Tensor:
    """(N, H, W) | (N, H, W, C) | (N, D, H, W) [| (N, D, H, W, C)] -> (N, C, *spatial), uint8
    or float32 in [0, 1] (see :func:`_to_unit`; ``intensity`` maps raw integer pixels)."""
    if a.ndim < 3:
        raise DataError(f"{path}: {split}_images has shape {a.shape}; expected (N, H, W[, C]) or (N, D, H, W)")
    if spatial_dims is None:
        channel_last = a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] == a.shape[2] != a.shape[-1]
        spatial_dims = 2 if a.ndim == 3 or channel_last else 3
    if a.ndim == spatial_dims + 1:
        a = a[:, None]
    elif a.ndim == spatial_dims + 2:
        a = np.moveaxis(a[..., :3] if a.shape[-1] == 4 else a, -1, 1)  # RGBA: drop alpha
    else:
        raise DataError(f"{path}: {split}_images has shape {a.shape}, which is not {spatial_dims}-D images")
    return torch.from_numpy(_to_unit(a, intensity, path, split))


def _guess_task(splits: dict[str, ImageSet]) -> str | None:
    from medlatent.data.catalogue import BINARY, MULTI_CLASS, MULTI_LABEL

    labelled = [s.labels for s in splits.values() if s.labels is not None]
    if not labelled:
        return None
    y = torch.cat(labelled)
    if y.shape[1] > 1:
        return MULTI_LABEL
    return BINARY if int(y.max()) <= 1 else MULTI_CLASS
