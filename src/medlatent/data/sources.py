"""One entry point from a data name (MedMNIST subset, .npz file or folder) to a Dataset."""

from __future__ import annotations

from pathlib import Path

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
