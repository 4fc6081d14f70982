"""Image folders -> :class:`Dataset`, through MONAI's readers.

Layouts understood:

* ``root/{train,val,test}/<class>/*.png`` - labelled, with the user's own splits;
* ``root/{train,val,test}/*.png``         - unlabelled, with the user's own splits;
* ``root/<class>/*.png``                  - labelled, one ``train`` split;
* ``root/*.png``                          - unlabelled, one ``train`` split.

Inside a class folder images may sit at any depth (e.g. one folder per patient). Names starting
with '.' (files and folders) and files that are not images (labels.csv, README.txt) are ignored
everywhere, as are subfolders that hold no image. The rule: a folder holds either images or
class subfolders, never both; a root with split folders holds nothing else (no loose images, no
other folders with images); a split folder that exists must hold images. Breaking it is a
DataError naming the folder and one entry of each kind, never a silent guess.

Formats: PNG/JPEG/BMP (MONAI ``PILReader``), DICOM (MONAI ``PydicomReader``, extra ``io``),
NIfTI (MONAI ``NibabelReader``, extra ``io``), 8- and 16-bit TIFF (``tifffile``, extra ``io``;
MONAI has no plain TIFF reader, only whole-slide ones). Every image is centre-cropped to a
square (as MedMNIST does), resized with antialiasing, and intensity-normalised. Grayscale stays
1-channel; a folder mixing grayscale and RGB is promoted to RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medlatent.data.catalogue import BINARY, MULTI_CLASS
from medlatent.data.store import Dataset, ImageSet
from medlatent.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
SPLIT_NAMES = ("train", "val", "test")
Normalize = Literal["none", "percentile", "window"]


def load_folder(root: str | Path, size: int = 28, spatial_dims: int = 2,
                normalize: Normalize = "percentile", window: tuple[float, float] = (40.0, 400.0),
                percentiles: tuple[float, float] = (0.5, 99.5)) -> Dataset:
    """Read every image under ``root`` into memory (each split's ``ImageSet.sources`` holds the
    absolute path of each image's file, in the images' order).

    Args:
        root: the folder (see the module docstring for layouts).
        size: output side in pixels (voxels for spatial_dims=3).
        spatial_dims: 2 for images, 3 for volumes.
        normalize: "none" (8-bit kept as is, other integer types scaled by their range),
            "percentile" (per-image percentiles to [0, 1]) or "window" (centre, width).
        window: (centre, width) for normalize="window", e.g. (40, 400) for CT soft tissue.
        percentiles: low and high percentiles for normalize="percentile".

    Raises:
        DataError: missing or empty folder, or an empty split folder; a layout that mixes
            images, class folders and split folders (see the module docstring); an unreadable
            image (named); images whose channel counts cannot be reconciled.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    layout = _discover(root)
    if not any(files for files, _ in layout.values()):
        raise DataError(f"{root}: no images found (looked for {', '.join(EXTENSIONS)})")
    class_names = sorted({c for _, classes in layout.values() for c in classes if c is not None})
    splits: dict[str, ImageSet] = {}
    arrays: dict[str, list[np.ndarray]] = {}
    for split, (files, classes) in layout.items():
        arrays[split] = [prepare_image(f, size, spatial_dims, normalize, window, percentiles) for f in files]
    n_channels = {a.shape[0] for arrs in arrays.values() for a in arrs}
    target_c = max(n_channels)
    if n_channels - {1, target_c}:
        raise DataError(f"{root}: images have {sorted(n_channels)} channels; expected all the same (or grayscale mixed with RGB)")
    all_uint8 = all(a.dtype == np.uint8 for arrs in arrays.values() for a in arrs)
    for split, (files, classes) in layout.items():
        if not files:
            continue
        same = [a if all_uint8 or a.dtype != np.uint8 else a.astype(np.float32) / 255 for a in arrays[split]]
        images = torch.from_numpy(np.stack([np.repeat(a, target_c, 0) if a.shape[0] != target_c else a for a in same]))
        labels = None
        if class_names:
            labels = torch.tensor([[class_names.index(c)] for c in classes], dtype=torch.int64)
        splits[split] = ImageSet(images, labels, [str(f.absolute()) for f in files])
    task = None if not class_names else (BINARY if len(class_names) == 2 else MULTI_CLASS)
    return Dataset(root.name, task, tuple(class_names), splits, str(root))


def first_image_side(root: Path, spatial_dims: int = 2) -> int:
    """The shorter spatial side of the first image under ``root`` (in the layout's order): a
    folder's native size when none is given."""
    layout = _discover(root)
    files = [f for fs, _ in layout.values() for f in fs]
    if not files:
        raise DataError(f"{root}: no images found (looked for {', '.join(EXTENSIONS)})")
    a = read_image(files[0])
    return int(min(a.shape[1:1 + spatial_dims]))


def _discover(root: Path) -> dict[str, tuple[list[Path], list[str | None]]]:
    """split -> (image files, class name per file or None), by the module docstring's rule.

    Raises:
        DataError: split folders next to loose images or other image folders, an empty
            split folder, or a folder mixing images with class subfolders.
    """
    splits = [p for p in _visible_dirs(root) if p.name in SPLIT_NAMES]
    if not splits:
        return {"train": _classes(root)}
    others = [p for p in _visible_dirs(root) if p.name not in SPLIT_NAMES and _has_image(p)]
    if others:
        raise DataError(f"{root}: mixes split folders ('{splits[0].name}') with other folders ('{others[0].name}'); "
                        "move the class folders into train/val/test, or use no split folders")
    loose = _images_in(root)
    if loose:
        raise DataError(f"{root}: has images ('{loose[0].name}') next to split folders ('{splits[0].name}'); "
                        "move them into a split's class folder, or remove them")
    layout = {}
    for split in splits:
        layout[split.name] = _classes(split)
        if not layout[split.name][0]:
            raise DataError(f"{split}: split folder holds no images (looked for {', '.join(EXTENSIONS)}); "
                            "add images or remove the folder")
    return layout


def _classes(folder: Path) -> tuple[list[Path], list[str | None]]:
    """Images directly in ``folder`` (unlabelled) or in its class subfolders (labelled).

    Raises:
        DataError: the folder holds both images and subfolders with images.
    """
    direct = _images_in(folder)
    per_class = {sub.name: imgs for sub in _visible_dirs(folder) if (imgs := _images_under(sub))}
    if direct and per_class:
        raise DataError(f"{folder}: mixes images ('{direct[0].name}') with class folders ('{next(iter(per_class))}'); "
                        "move the images into a class folder, or remove the subfolders")
    if direct:
        return direct, [None] * len(direct)
    files: list[Path] = [f for imgs in per_class.values() for f in imgs]
    classes: list[str | None] = [name for name, imgs in per_class.items() for _ in imgs]
    return files, classes


def _visible_dirs(folder: Path) -> list[Path]:
    """Subfolders whose names do not start with '.', sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _images_under(folder: Path) -> list[Path]:
    """Image files at any depth under ``folder``, sorted, skipping hidden files and folders."""
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not _hidden_below(p, folder))


def _has_image(folder: Path) -> bool:
    """Whether any image sits at any depth under ``folder`` (stops at the first)."""
    return any(_is_image(p) and not _hidden_below(p, folder) for p in folder.rglob("*"))


def _hidden_below(p: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(folder).parts)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(EXTENSIONS)


def dicom_files(folder: Path) -> list[Path]:
    """The visible ``.dcm`` files directly in ``folder``, sorted (the slices of a series)."""
    return sorted(p for p in folder.iterdir() if _is_image(p) and p.name.lower().endswith(".dcm"))


def read_image(path: Path) -> np.ndarray:
    """One file -> array (C, *spatial) in the file's own value range and dtype; a folder of DICOM
    slices (a series) -> (1, D, H, W), slices in InstanceNumber order, rescale slope and
    intercept applied (MONAI's ``PydicomReader``)."""
    name = path.name.lower()
    if path.is_dir():
        return _read_series(path)
    try:
        if name.endswith((".tif", ".tiff")):
            a = _tifffile().imread(path)
            channel_last = a.ndim == 3 and a.shape[-1] in (3, 4)
        else:
            reader = _monai_reader(name, path)
            a, _ = reader.get_data(reader.read(str(path)))
            a = np.asarray(a)
            channel_last = a.ndim == 3 and a.shape[-1] in (3, 4) and not name.endswith((".nii", ".nii.gz", ".dcm"))
            channel_last |= name.endswith(".dcm") and a.ndim == 3 and a.shape[-1] == 3
    except DataError:
        raise
    except Exception as e:  # readers raise many types; the user needs the file and the reason
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read as an image ({msg})") from None
    if a.ndim == 0 or a.size == 0:
        raise DataError(f"{path}: cannot read as an image (no pixel data)")
    if channel_last:
        a = np.moveaxis(a[..., :3], -1, 0)  # drop alpha
    else:
        a = a[None]
    return a


def _read_series(folder: Path) -> np.ndarray:
    """A DICOM series folder -> (1, D, H, W)."""
    if not dicom_files(folder):
        raise DataError(f"{folder}: a folder without .dcm files; expected a DICOM series")
    _require("pydicom", folder)
    from monai.data import PydicomReader

    try:
        reader = PydicomReader(swap_ij=False)
        a = np.asarray(reader.get_data(reader.read(str(folder)))[0])  # a folder: one series
    except Exception as e:  # readers raise many types; the user needs the folder and the reason
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{folder}: cannot read as a DICOM series ({msg})") from None
    if a.ndim == 2:  # a series of one slice
        a = a[..., None]
    if a.ndim != 3:
        raise DataError(f"{folder}: a DICOM series of shape {a.shape}; expected grayscale slices (H, W) each")
    return np.moveaxis(a, -1, 0)[None]  # (H, W, D) -> (1, D, H, W)


def prepare_image(path: Path, size: int, spatial_dims: int, normalize: Normalize,
                  window: tuple[float, float], percentiles: tuple[float, float]) -> np.ndarray:
    """One file -> (C, *size) array: read, centre-cropped to a square, resized, normalised to
    [0, 1] (uint8 when normalize="none" and the file is 8-bit, else float32)."""
    return fit_array(read_image(path), path, size, spatial_dims, normalize, window, percentiles)


def fit_array(a: np.ndarray, path: Path, size: int, spatial_dims: int, normalize: Normalize,
              window: tuple[float, float], percentiles: tuple[float, float]) -> np.ndarray:
    """A decoded image ``a`` (C, *spatial) of ``path`` -> (C, *size): centre square, resize with
    antialiasing, intensity to [0, 1] (uint8 kept when normalize="none" and ``a`` is 8-bit)."""
    if a.ndim - 1 == spatial_dims + 1 and spatial_dims == 3:  # (1, X, Y, Z, T): T as channels
        a = np.moveaxis(a[0], -1, 0)
    if a.ndim - 1 != spatial_dims:
        raise DataError(f"{path}: has {a.ndim - 1} spatial dimensions {a.shape[1:]}, expected {spatial_dims}-D"
                        + (" (use --spatial-dims 3 for volumes)" if a.ndim - 1 > spatial_dims else ""))
    keep_uint8 = normalize == "none" and a.dtype == np.uint8
    x = torch.from_numpy(_scale(a, normalize, window, percentiles).astype(np.float32))[None]  # (1, C, *S)
    x = center_square(x)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    x = F.interpolate(x, size=(size,) * spatial_dims, mode=mode, align_corners=False,
                      antialias=spatial_dims == 2 and x.shape[-1] > size)
    x = x[0].clamp_(0, 1)
    if keep_uint8:
        return (x * 255).round().to(torch.uint8).numpy()
    return x.numpy()


def _scale(a: np.ndarray, normalize: Normalize, window: tuple[float, float],
           percentiles: tuple[float, float]) -> np.ndarray:
    """Raw values -> float32 in [0, 1]."""
    x = a.astype(np.float32)
    if normalize == "window":
        centre, width = window
        return np.clip((x - (centre - width / 2)) / width, 0, 1)
    if normalize == "percentile":
        lo, hi = np.percentile(x, percentiles)
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip((x - max(info.min, 0)) / (info.max - max(info.min, 0)), 0, 1)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-6)


def center_square(x: torch.Tensor) -> torch.Tensor:
    """Centre-crop the spatial dims of (B, C, *S) to the smallest side (as MedMNIST does)."""
    side = min(x.shape[2:])
    slices = [slice(None), slice(None)]
    for s in x.shape[2:]:
        start = (s - side) // 2
        slices.append(slice(start, start + side))
    return x[tuple(slices)]


def _monai_reader(name: str, path: Path):  # noqa: ANN202 - MONAI reader classes
    if name.endswith(".dcm"):
        _require("pydicom", path)
        from monai.data import PydicomReader

        return PydicomReader(swap_ij=False)
    if name.endswith((".nii", ".nii.gz")):
        _require("nibabel", path)
        from monai.data import NibabelReader

        return NibabelReader()
    from monai.data import PILReader

    return PILReader(reverse_indexing=False)


def _tifffile():  # noqa: ANN202
    try:
        import tifffile
    except ImportError:
        raise DataError("reading TIFF files needs tifffile: pip install 'medlatent[io]'") from None
    return tifffile


def _require(module: str, path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DataError(f"{path}: reading this format needs {module}: pip install 'medlatent[io]'")
