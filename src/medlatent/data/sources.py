"""One entry point from a data name (MedMNIST subset, .npz file or folder), or a mixture of
several (``data.mixture``), to a Dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medlatent.config import DataConfig
from medlatent.data.catalogue import CATALOGUE
from medlatent.data.store import Dataset, is_store, open_store
from medlatent.errors import DataError

DEFAULT_MEDMNIST_SIZE = 28  # the CPU working size; MedMNIST+ files at 64/128/224 px on request


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load what ``cfg.name`` names: a MedMNIST subset, a .npz in MedMNIST layout, a CSV
    manifest (decoded as read, :mod:`medlatent.data.decoded`), a prepared store
    (``medlatent data prepare``) or a folder, at ``cfg.size`` (None: the data's own size,
    see :func:`native_size`). With ``cfg.mixture``, the union of those sources
    (:func:`load_mixture`)."""
    if cfg.mixture:
        return load_mixture(cfg)
    if cfg.name.lower() in CATALOGUE:
        from medlatent.data.medmnist import load_medmnist

        return load_medmnist(cfg.name, cfg.size or DEFAULT_MEDMNIST_SIZE, cfg.data_dir)
    path = Path(cfg.name).expanduser()
    if path.suffix == ".npz":
        from medlatent.data.medmnist import load_npz

        ds = load_npz(path, spatial_dims=None)
        if cfg.size is not None and ds.image_size != cfg.size:
            raise DataError(f"{path}: images are {ds.image_size} px, but data.size is {cfg.size}")
        return ds
    if path.suffix.lower() == ".csv" and path.is_file():
        from medlatent.data.decoded import load_manifest_csv

        return load_manifest_csv(path, cfg.size, cfg.spatial_dims, cfg.workers)
    if path.is_dir() and is_store(path):
        ds = open_store(path)
        if cfg.size is not None and ds.image_size != cfg.size:
            raise DataError(f"{path}: the store holds {ds.image_size}-px images, but data.size is {cfg.size}; "
                            f"prepare a store at {cfg.size} px or leave --size out")
        return ds
    if path.is_dir():
        from medlatent.data.folders import load_folder

        return load_folder(path, native_size(cfg), cfg.spatial_dims, cfg.normalize,
                           (cfg.window_center, cfg.window_width))
    raise DataError(f"'{cfg.name}' is not a MedMNIST subset (see `medlatent data list`), a .npz file, "
                    "a CSV manifest, a prepared store or a folder")


def source_config(cfg: DataConfig, name: str) -> DataConfig:
    """``cfg`` for the one data set ``name`` (a source of a mixture, or the data to evaluate a
    run on): the same size, folder and reading options, no mixture and no weights."""
    return dataclasses.replace(cfg, name=name, mixture=[], weights=None)


def load_mixture(cfg: DataConfig) -> Dataset:
    """The union of ``cfg.mixture``'s training (and val/test) splits, read by index
    (:func:`medlatent.data.mixture.mix_datasets`), every source at the run's side: ``cfg.size``,
    else the first source's own (:func:`native_size`).

    Raises:
        DataError: a source that cannot be loaded (naming it), a store or .npz of another size,
            another number of spatial dimensions, a channel count the rule refuses, or a source
            without the training split ``cfg.split``.
    """
    from medlatent.data.mixture import mix_datasets

    size = native_size(cfg)
    parts = []
    for name in cfg.mixture:
        path = Path(name).expanduser()
        fixed = path.suffix == ".npz" or (path.is_dir() and is_store(path))  # their side is what it is
        part = load_dataset(dataclasses.replace(source_config(cfg, name), size=None if fixed else size))
        if part.image_size != size:
            given = "data.size" if cfg.size is not None else f"the side of the first source, {cfg.mixture[0]}"
            raise DataError(f"{part.source or name}: holds {part.image_size}-px images, but the mixture runs at "
                            f"{size} px ({given}); every source of data.mixture must have that size")
        part.split(cfg.split)  # each source needs the training split (the error names it)
        parts.append(part)
    return mix_datasets(parts, cfg.weights, cfg.split)


def native_size(cfg: DataConfig) -> int:
    """The image side a run uses: ``cfg.size`` when given, else the data's own: 28 px for a
    MedMNIST subset (the CPU working size; 64/128/224 on request), the side of a .npz's or a
    store's images, and for a folder the shorter side of its first image (sorted order); for a
    mixture, its first source's."""
    if cfg.size is not None:
        return cfg.size
    if cfg.mixture:
        return native_size(source_config(cfg, cfg.mixture[0]))
    if cfg.name.lower() in CATALOGUE:
        return DEFAULT_MEDMNIST_SIZE
    path = Path(cfg.name).expanduser()
    if path.is_dir() and is_store(path):
        import json

        return int(json.loads((path / "store.json").read_text())["size"])
    if path.is_dir():
        from medlatent.data.folders import first_image_side

        return first_image_side(path, cfg.spatial_dims)
    return load_dataset(cfg).image_size  # a .npz: its arrays' side


def estimate_store_bytes(cfg: DataConfig) -> tuple[int, str] | None:
    """Peak bytes that loading ``cfg`` into memory takes, and how that was counted, without
    decoding the images (None when it cannot be told, e.g. a missing file: loading says why).

    MedMNIST: the catalogue's image counts, uint8. A .npz: the arrays' headers (uint8 kept,
    anything else converted to float32 beside the raw array). A folder: the number of image
    files x the first file's channels at ``cfg.size``, float32 unless 8-bit with
    normalize="none", twice (decoded images and the stacked store exist together). A mixture:
    the sum over its sources (None when one of them cannot be told).
    """
    if cfg.mixture:
        each = [estimate_store_bytes(source_config(cfg, name)) for name in cfg.mixture]
        if any(e is None for e in each):
            return None
        return (sum(e[0] for e in each if e is not None),
                "; ".join(f"{name}: {e[1]}" for name, e in zip(cfg.mixture, each) if e is not None))
    path = Path(cfg.name).expanduser()
    if path.suffix == ".npz" and path.is_file():
        return _npz_bytes(path)
    if path.is_dir() and is_store(path):
        return 0, "a memory-mapped store: rows are read as they are used"
    if path.suffix.lower() == ".csv":
        return 0, "a CSV manifest: images are decoded as they are read"
    side = cfg.size or DEFAULT_MEDMNIST_SIZE
    if cfg.name.lower() in CATALOGUE:
        info = CATALOGUE[cfg.name.lower()]
        n = sum(info.splits.values())
        return n * info.channels * side ** info.spatial_dims, f"{n:,} images x {info.channels} channels, uint8"
    if path.is_dir():
        from medlatent.data.folders import EXTENSIONS, read_image

        files = [f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(EXTENSIONS)
                 and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        if not files:
            return None
        first = read_image(files[0])
        side = cfg.size or min(first.shape[1:])
        pixels = side ** cfg.spatial_dims
        per_value = 1 if cfg.normalize == "none" and first.dtype == np.uint8 else 4
        n_bytes = 2 * len(files) * first.shape[0] * pixels * per_value
        return n_bytes, f"{len(files):,} images x {first.shape[0]} channels at {side} px"
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


def describe_data(data: Dataset, split: str, n_used: int) -> str:
    """One line for the start of a run: where the images come from, their size and how many,
    e.g. ``data: stores/cxr-224 (store), 224 px, 3 channels; train 8,000 images (1,000 labelled)``;
    for a mixture, each source's images and share of the batches, e.g. ``data: mixture of 2
    (MedMNIST), 28 px, 3 channels; train 16,667 images: bloodmnist 11,959 (share 71.8%),
    pneumoniamnist 4,708 (share 28.2%, 1 channel read as 3)``."""
    if data.parts:
        return _describe_mixture(data, split, n_used)
    kind = "store" if data.info.get("store") else ("MedMNIST" if data.name.lower() in CATALOGUE else "files")
    if data.info.get("decoded"):
        kind = "CSV manifest, decoded as read"
    shape = data._any.images.shape
    spatial = "x".join(str(s) for s in shape[2:]) if len(set(shape[2:])) > 1 else f"{shape[-1]} px"
    if data.spatial_dims == 3:
        spatial = f"{shape[-1]}^3 voxels"
    labelled = ""
    labels = data.splits[split].labels if split in data.splits else None
    if labels is not None:
        n_lab = int((labels[:, 0] >= 0).sum())
        labelled = f" ({n_lab:,} labelled)" if n_lab < len(labels) else ""
    return (f"data: {data.source or data.name} ({kind}), {spatial}, {data.channels} channel"
            f"{'s' if data.channels > 1 else ''}; {split} {n_used:,} images{labelled}")


def _describe_mixture(data: Dataset, split: str, n_used: int) -> str:
    images = data.split(split).images
    kinds = {"store" if p.info.get("store") else ("MedMNIST" if p.name.lower() in CATALOGUE else "files")
             for p in data.parts}
    shares = images.shares or [n / max(len(images), 1) for n in images.sizes]
    each = []
    for part, n, share in zip(data.parts, images.sizes, shares):
        repeated = f", 1 channel read as {data.channels}" if part.channels != data.channels else ""
        each.append(f"{part.name} {n:,} (share {100 * share:.1f}%{repeated})")
    shape = images.shape
    spatial = f"{shape[-1]}^3 voxels" if data.spatial_dims == 3 else f"{shape[-1]} px"
    return (f"data: mixture of {len(data.parts)} ({', '.join(sorted(kinds))}), {spatial}, {data.channels} channel"
            f"{'s' if data.channels > 1 else ''}; {split} {n_used:,} images: {', '.join(each)}")
