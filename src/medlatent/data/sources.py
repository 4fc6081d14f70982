"""One entry point from a data name (MedMNIST subset, .npz file or folder) to a Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlatent.config import DataConfig
from medlatent.data.catalogue import CATALOGUE
from medlatent.data.store import Dataset
from medlatent.errors import DataError


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load what ``cfg.name`` names: a MedMNIST subset, a .npz in MedMNIST layout, or a folder."""
    if cfg.name.lower() in CATALOGUE:
        from medlatent.data.medmnist import load_medmnist

        return load_medmnist(cfg.name, cfg.size, cfg.data_dir)
    path = Path(cfg.name).expanduser()
    if path.suffix == ".npz":
        from medlatent.data.medmnist import load_npz

        ds = load_npz(path, spatial_dims=None)
        if ds.image_size != cfg.size:
            raise DataError(f"{path}: images are {ds.image_size} px, but data.size is {cfg.size}")
        return ds
    if path.is_dir():
        from medlatent.data.folders import load_folder

        return load_folder(path, cfg.size, cfg.spatial_dims, cfg.normalize,
                           (cfg.window_center, cfg.window_width))
    raise DataError(f"'{cfg.name}' is not a MedMNIST subset (see `medlatent data list`), a .npz file or a folder")


def estimate_store_bytes(cfg: DataConfig) -> tuple[int, str] | None:
    """Peak bytes that loading ``cfg`` into memory takes, and how that was counted, without
    decoding the images (None when it cannot be told, e.g. a missing file: loading says why).

    MedMNIST: the catalogue's image counts, uint8. A .npz: the arrays' headers (uint8 kept,
    anything else converted to float32 beside the raw array). A folder: the number of image
    files x the first file's channels at ``cfg.size``, float32 unless 8-bit with
    normalize="none", twice (decoded images and the stacked store exist together).
    """
    pixels = cfg.size ** cfg.spatial_dims
    if cfg.name.lower() in CATALOGUE:
        info = CATALOGUE[cfg.name.lower()]
        n = sum(info.splits.values())
        return n * info.channels * cfg.size ** info.spatial_dims, f"{n:,} images x {info.channels} channels, uint8"
    path = Path(cfg.name).expanduser()
    if path.suffix == ".npz" and path.is_file():
        return _npz_bytes(path)
    if path.is_dir():
        from medlatent.data.folders import EXTENSIONS, read_image

        files = [f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(EXTENSIONS)
                 and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        if not files:
            return None
        first = read_image(files[0])
        per_value = 1 if cfg.normalize == "none" and first.dtype == np.uint8 else 4
        n_bytes = 2 * len(files) * first.shape[0] * pixels * per_value
        return n_bytes, f"{len(files):,} images x {first.shape[0]} channels at {cfg.size} px"
    return None


def _npz_bytes(path: Path) -> tuple[int, str] | None:
    """Bytes of a .npz's image arrays once loaded, from their headers only."""
    import zipfile

    total, n = 0, 0
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith("_images.npy"):
                    continue
                with z.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                count = int(np.prod(shape))
                total += count * dtype.itemsize + (0 if dtype == np.uint8 else count * 4)
                n += shape[0] if shape else 0
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return total, f"{n:,} images in {path.name}"
