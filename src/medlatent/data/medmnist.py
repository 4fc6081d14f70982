"""Load MedMNIST files (official or any .npz in MedMNIST layout) into a :class:`Dataset`.

MedMNIST layout: arrays ``{split}_images`` (N, H, W) / (N, H, W, 3) / (N, D, H, W) uint8 and
``{split}_labels`` (N, L) for split in train, val, test. Images become ``(N, C, *spatial)``.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from medlatent.data.catalogue import MedMNISTInfo, get_info
from medlatent.data.download import fetch
from medlatent.data.store import Dataset, ImageSet
from medlatent.errors import DataError

SPLITS = ("train", "val", "test")


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

    Raises:
        DataError: unreadable or truncated file, no image arrays, or labels that do not
            match the images in number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out: dict[str, ImageSet] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for split in splits:
                if f"{split}_images" not in keys:
                    continue
                images = _to_nchw(z[f"{split}_images"], spatial_dims, path, split)
                labels = None
                if f"{split}_labels" in keys:
                    y = np.asarray(z[f"{split}_labels"])
                    if len(y) != len(images):
                        raise DataError(f"{path}: {split}_labels has {len(y)} entries for {len(images)} images")
                    labels = torch.from_numpy(y.reshape(len(y), -1).astype(np.int64))
                out[split] = ImageSet(images, labels)
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz file (truncated or corrupt: {e})") from None
    if not out:
        raise DataError(f"{path}: no image arrays found; expected keys like train_images, val_images, test_images")
    if info is not None:
        return Dataset(info.name, info.task, info.labels, out, str(path),
                       {"licence": info.licence, "modality": info.modality})
    task = _guess_task(out)
    return Dataset(path.stem, task, _class_names(out, task), out, str(path))


def _class_names(splits: dict[str, ImageSet], task: str | None) -> tuple[str, ...]:
    """Names "0", "1", ... for labels found in a file that carries no names."""
    labelled = [s.labels for s in splits.values() if s.labels is not None]
    if task is None or not labelled:
        return ()
    y = torch.cat(labelled)
    n = y.shape[1] if y.shape[1] > 1 else int(y.max()) + 1
    return tuple(str(i) for i in range(n))


def _to_nchw(a: np.ndarray, spatial_dims: int | None, path: Path, split: str) -> torch.Tensor:
    """(N, H, W) | (N, H, W, C) | (N, D, H, W) [| (N, D, H, W, C)] -> (N, C, *spatial)."""
    if a.ndim < 3:
        raise DataError(f"{path}: {split}_images has shape {a.shape}; expected (N, H, W[, C]) or (N, D, H, W)")
    if spatial_dims is None:
        channel_last = a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] == a.shape[2] != a.shape[-1]
        spatial_dims = 2 if a.ndim == 3 or channel_last else 3
    if a.ndim == spatial_dims + 1:
        a = a[:, None]
    elif a.ndim == spatial_dims + 2:
        a = np.moveaxis(a, -1, 1)
    else:
        raise DataError(f"{path}: {split}_images has shape {a.shape}, which is not {spatial_dims}-D images")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    a = a.astype(np.float32)
    if a.size and a.max() > 1.0:
        a = a / 255.0
    return torch.from_numpy(np.ascontiguousarray(a))


def _guess_task(splits: dict[str, ImageSet]) -> str | None:
    from medlatent.data.catalogue import BINARY, MULTI_CLASS, MULTI_LABEL

    labelled = [s.labels for s in splits.values() if s.labels is not None]
    if not labelled:
        return None
    y = torch.cat(labelled)
    if y.shape[1] > 1:
        return MULTI_LABEL
    return BINARY if int(y.max()) <= 1 else MULTI_CLASS
