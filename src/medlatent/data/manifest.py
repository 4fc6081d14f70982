"""Manifests: a user's image files with labels, splits and patient groups, before decoding.

A manifest comes from a CSV file (:func:`read_csv`), from an image folder (:func:`read_folder`,
the layouts of :mod:`medlatent.data.folders`), or from a flat folder plus a labels CSV
(:func:`read_manifest`). :func:`assign_splits` draws train/val/test where the user gave none,
stratified by label and keeping each patient's images in one split. :func:`columns` and
:func:`read_prepared` write a manifest out and read it back (``data prepare`` stores one beside
the memory-mapped images).

Rows are counted as in a spreadsheet or an editor: the header is row 1, the first image row 2.
Entries read from a folder have row 0. Every problem a user can fix is a one-line
:class:`~medlatent.errors.DataError` naming the file, the row and what was expected.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medlatent.data.folders import SPLIT_NAMES, _discover, _images_under, dicom_files
from medlatent.errors import DataError

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Entry:
    """One image file of a manifest.

    Attributes:
        path: absolute path of the image file, or of a DICOM series folder (one volume).
        label: class index into ``Manifest.class_names``; None when unlabelled.
        split: "train", "val" or "test"; None until assigned (see :func:`assign_splits`).
        group: patient / slide / study id; None when the image belongs to no group.
        row: where it came from: the CSV row (header = row 1), or 0 for an image found in a folder.
    """

    path: str
    label: int | None
    split: str | None
    group: str | None
    row: int


@dataclass
class Manifest:
    """A list of images with their labels, splits and groups.

    Attributes:
        entries: one per image file, in the order of the CSV (or of the folder walk).
        class_names: the class name of each label index; empty when nothing is labelled.
        source: the CSV file or the folder it was read from, for messages.
    """

    entries: list[Entry]
    class_names: tuple[str, ...]
    source: str


def read_csv(csv_path: str | Path, root: str | Path | None = None, path_col: str = "path",
             label_col: str | None = "label", split_col: str | None = "split", group_col: str | None = None,
             classes: Sequence[str] | None = None) -> Manifest:
    """Read a CSV with one row per image file.

    Args:
        csv_path: the CSV file (UTF-8, a header row naming the columns).
        root: folder that relative paths are resolved against; default: the CSV's folder.
        path_col: column holding each image's path (absolute, or relative to ``root``).
        label_col: column holding the labels. An empty cell is an unlabelled image (kept, label
            None). The default column "label" may be absent (then nothing is labelled); a column
            the user names must exist. None ignores labels.
        split_col: column holding "train", "val" or "test" (any case; "valid" and "validation"
            mean "val"); an empty cell means no split yet. The default "split" may be absent.
        group_col: column holding a patient / slide / study id (empty cell: no group); None for
            no grouping.
        classes: the class names in index order. Without it, when every label is a whole number
            ("0", "1", "2") the labels are the indices and ``class_names`` is ("0", ..., the
            largest); otherwise ``class_names`` is the sorted unique labels. With it, a label is
            one of the names, or else a whole number indexing into it.

    Raises:
        DataError: a missing file or column (naming the columns the file has), a row with the
            wrong number of cells, an empty path, a file that does not exist or is a folder, a
            path named twice, a label outside ``classes``, an unknown split, or a group found in
            two splits. Each names the CSV and the row.
    """
    csv_path = Path(csv_path)
    source = str(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{source}: no such file; expected a CSV with a '{path_col}' column")
    root = Path(root) if root is not None else csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise DataError(f"{source}: empty file; expected a header row with a '{path_col}' column")
        cols = _column_indices(source, header, path_col, label_col, split_col, group_col)
        raw = []  # (row, path, label, split, group) cells, validated below
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue  # blank line
            row = reader.line_num
            if len(cells) != len(header):
                raise DataError(f"{source}: row {row}: has {len(cells)} cells, expected {len(header)} "
                                f"(one per header column; quote paths that hold commas)")
            raw.append((row, *(cells[i] if i is not None else "" for i in cols)))
    if not raw:
        raise DataError(f"{source}: no rows below the header; expected one row per image")
    labels, class_names = _labels(source, [(r[0], r[2]) for r in raw], classes)
    entries, seen = [], {}
    for (row, path, _, split, group), label in zip(raw, labels):
        full = _existing_file(source, row, path, root, path_col)
        if full in seen:
            raise DataError(f"{source}: rows {seen[full]} and {row} both name {full}; expected each file once")
        seen[full] = row
        entries.append(Entry(full, label, _split(source, row, split), group or None, row))
    _check_groups(entries, source)
    return Manifest(entries, class_names, source)


def read_folder(root: str | Path, group_by: str | None = None) -> Manifest:
    """List the images of a folder in one of the layouts of :mod:`medlatent.data.folders`.

    Split folders (``root/{train,val,test}/...``) give each image its split; without them the
    split is None (draw one with :func:`assign_splits`). Class folders give labels
    (``class_names`` sorted); images directly in ``root`` (or in a split folder) are unlabelled.

    Args:
        root: the folder.
        group_by: None (no groups) or "parent": each image is grouped by its parent folder's path
            relative to its class folder, for the common layout of one folder per patient
            (``root/<class>/<patient>/*.png`` groups by ``<patient>``; ``root/<class>/<patient>/
            <study>/*.png`` by ``<patient>/<study>``). Images directly in their class folder, and
            unlabelled images, have no group.

    Raises:
        DataError: a missing folder, no images, a layout breaking the rules of
            :mod:`medlatent.data.folders`, an unknown ``group_by``, or (with split folders) a
            group found in two splits.
    """
    if group_by not in (None, "parent"):
        raise DataError(f"group_by must be None or 'parent', got {group_by!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    layout = _discover(root)
    has_splits = any((root / name).is_dir() for name in SPLIT_NAMES)
    class_names = tuple(sorted({c for _, names in layout.values() for c in names if c is not None}))
    entries = []
    for split, (files, names) in layout.items():
        base = root / split if has_splits else root
        for file, name in zip(files, names):
            group = None
            if group_by == "parent" and name is not None:
                parent = file.parent.relative_to(base / name).as_posix()
                group = None if parent == "." else parent
            label = class_names.index(name) if name is not None else None
            entries.append(Entry(os.path.abspath(file), label, split if has_splits else None, group, 0))
    if not entries:
        raise DataError(f"{root}: no images found (looked for .png, .jpg, .tif, .dcm, .nii and the like)")
    _check_groups(entries, str(root))
    return Manifest(entries, class_names, str(root))


def read_manifest(path: str | Path, labels: str | Path | None = None, root: str | Path | None = None,
                  path_col: str = "path", label_col: str | None = "label", split_col: str | None = "split",
                  group_col: str | None = None, classes: Sequence[str] | None = None,
                  group_by: str | None = None) -> Manifest:
    """A CSV file (:func:`read_csv`) or a folder (:func:`read_folder`), whichever ``path`` is.

    With ``labels`` (a CSV of path, label, ...: the column arguments as for :func:`read_csv`),
    ``path`` must be a folder without split folders; every image under it, at any depth, is
    listed. Labels, splits and groups come from the CSV, joined by the path relative to the
    folder; images the CSV does not name are unlabelled (row 0), and a CSV row whose file is
    missing is an error.

    Args:
        path: a CSV file or an image folder.
        labels: the labels CSV for a folder; None for a plain folder or a CSV.
        root: for a CSV only: the folder relative paths are resolved against.
        path_col, label_col, split_col, group_col, classes: as for :func:`read_csv` (for a CSV
            or a labels CSV).
        group_by: for a plain folder only, as for :func:`read_folder`.

    Raises:
        DataError: ``path`` does not exist, an argument that does not apply to what ``path``
            is, or any error of :func:`read_csv` / :func:`read_folder`.
    """
    path = Path(path)
    csv_args = {"path_col": path_col, "label_col": label_col, "split_col": split_col,
                "group_col": group_col, "classes": classes}
    if path.is_file():
        if labels is not None or group_by is not None:
            raise DataError(f"{path}: is a CSV; labels and group_by apply to folders (use label_col, group_col)")
        return read_csv(path, root=root, **csv_args)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; expected a CSV manifest or an image folder")
    if root is not None:
        raise DataError(f"{path}: is a folder; root applies to a CSV (paths are relative to the folder)")
    if labels is None:
        if group_col is not None or classes is not None:
            raise DataError(f"{path}: group_col and classes need a labels CSV; for a folder use group_by")
        return read_folder(path, group_by=group_by)
    if group_by is not None:
        raise DataError(f"{path}: with a labels CSV the groups come from its group_col, not group_by")
    splits = [name for name in SPLIT_NAMES if (path / name).is_dir()]
    if splits:
        raise DataError(f"{path}: has split folders ('{splits[0]}'); a labels CSV needs a flat folder "
                        "(give splits in the CSV's split column)")
    m = read_csv(labels, root=path, **csv_args)
    listed = {e.path for e in m.entries}
    extra = [Entry(os.path.abspath(f), None, None, None, 0) for f in _images_under(path)
             if os.path.abspath(f) not in listed]
    return Manifest(m.entries + extra, m.class_names, m.source)


def dicom_series(m: Manifest) -> Manifest:
    """Volumes from DICOM slices: the ``.dcm`` files of one folder become one entry, the folder,
    read as one (D, H, W) volume (a series: MONAI's ``PydicomReader``, slices in InstanceNumber
    order). Other entries, and series folders already named, are kept; the order is that of
    each folder's first slice. ``prepare`` applies it for ``spatial_dims=3``.

    Raises:
        DataError: the slices of one folder carry different labels, splits or groups (the
            folder and the two slices are named).
    """
    by_folder: dict[str, list[Entry]] = {}
    out: list[Entry | str] = []
    for e in m.entries:
        if not e.path.lower().endswith(".dcm"):
            out.append(e)
            continue
        folder = os.path.dirname(e.path)
        if folder not in by_folder:
            by_folder[folder] = []
            out.append(folder)
        by_folder[folder].append(e)
    entries = []
    for item in out:
        if isinstance(item, Entry):
            entries.append(item)
            continue
        first, *rest = by_folder[item]
        for e in rest:
            for key in ("label", "split", "group"):
                if getattr(e, key) != getattr(first, key):
                    raise DataError(f"{item}: one DICOM series, but {_where(first)} has {key} {getattr(first, key)!r} "
                                    f"and {_where(e)} has {getattr(e, key)!r}; give every slice of a series the same {key}")
        entries.append(replace(first, path=item))
    return Manifest(entries, m.class_names, m.source)


def assign_splits(m: Manifest, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Manifest:
    """Draw train/val/test for a manifest without splits; one with splits is returned unchanged.

    Grouped, stratified, greedy: the units are the groups (an image without a group is a unit
    of its own), shuffled by ``numpy.random.default_rng(seed)`` and taken largest first; each
    unit goes to the split whose per-label shortfall against its target (fraction x that label's
    count, relative to the target) is largest, weighted by the unit's label counts. Unlabelled
    images are a stratum of their own. Afterwards a split with a fraction > 0 that got nothing
    takes the smallest unit of the split with the most units (when that leaves it one).

    The result is a pure function of the seed and the entries (not of their order), so the same
    CSV always gives the same splits, and no group is ever in two splits.

    Args:
        m: the manifest.
        fractions: train, val and test fractions: each >= 0, summing to 1.
        seed: seed of the generator.

    Raises:
        DataError: fractions that are negative or do not sum to 1; some entries with a split
            and others without.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise DataError(f"split fractions {tuple(fractions)}: expected three (train, val, test), "
                        "each >= 0, summing to 1")
    missing = [e for e in m.entries if e.split is None]
    if not missing:
        return m
    if len(missing) < len(m.entries):
        raise DataError(f"{m.source}: {len(m.entries) - len(missing)} rows have a split and {len(missing)} do not "
                        f"(first without: {_where(missing[0])}); give every row a split, or none")
    units = _units(m.entries)
    strata = {label: k for k, label in enumerate(sorted({e.label for e in m.entries}, key=lambda x: (x is None, x)))}
    counts = np.zeros((len(units), len(strata)))  # (U, K) images per unit and label
    for u, members in enumerate(units):
        for i in members:
            counts[u, strata[m.entries[i].label]] += 1
    target = fr[:, None] * counts.sum(0)[None]  # (3, K)
    have = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(units)).tolist(), key=lambda u: -counts[u].sum())
    split_of = np.zeros(len(units), dtype=np.int64)
    for u in order:
        shortfall = (target - have) / np.maximum(target, 1e-12)  # (3, K): 1 = empty, 0 = full
        score = shortfall @ counts[u]
        score[fr == 0] = -np.inf
        split_of[u] = int(np.argmax(score))
        have[split_of[u]] += counts[u]
    _fill_empty_splits(split_of, counts.sum(1), fr)
    split_names = [SPLIT_NAMES[split_of[u]] for u in range(len(units))]
    new = list(m.entries)
    for u, members in enumerate(units):
        for i in members:
            new[i] = replace(new[i], split=split_names[u])
    return Manifest(new, m.class_names, m.source)


def columns(m: Manifest) -> dict[str, list]:
    """The manifest as table columns ``path, label, split, group`` (class name, split and group
    written as empty cells when None), for ``medlatent.data.store.save_csv``; read them back
    with :func:`read_prepared`."""
    return {
        "path": [e.path for e in m.entries],
        "label": [m.class_names[e.label] if e.label is not None else "" for e in m.entries],
        "split": [e.split or "" for e in m.entries],
        "group": [e.group or "" for e in m.entries],
    }


def read_prepared(csv_path: str | Path, classes: Sequence[str] | None = None) -> Manifest:
    """Read a manifest written from :func:`columns`.

    Args:
        csv_path: the written CSV.
        classes: the original ``class_names``; needed to get the same label indices back when
            they were not the sorted labels (a user's own order, or a class with no image).

    Raises:
        DataError: as :func:`read_csv` (e.g. a listed image has since been removed).
    """
    return read_csv(csv_path, group_col="group", classes=classes)


def _column_indices(source: str, header: list[str], path_col: str, label_col: str | None,
                    split_col: str | None, group_col: str | None) -> list[int | None]:
    """Position of the path, label, split and group columns (None: not read)."""
    wanted = [(path_col, True), (label_col, label_col not in (None, "label")),
              (split_col, split_col not in (None, "split")), (group_col, group_col is not None)]
    found: list[int | None] = []
    for name, required in wanted:
        if name in header:
            found.append(header.index(name))
        elif required:
            raise DataError(f"{source}: no column '{name}'; the file has columns: {', '.join(header)}")
        else:
            found.append(None)
    return found


def _labels(source: str, cells: list[tuple[int, str]],
            classes: Sequence[str] | None) -> tuple[list[int | None], tuple[str, ...]]:
    """(row, label cell) pairs -> label index per row (None for an empty cell) and class names."""
    given = [(row, c) for row, c in cells if c]
    if classes is not None:
        names = tuple(str(c) for c in classes)
        index = {name: i for i, name in enumerate(names)}
        for row, c in given:
            if c not in index and not (_is_index(c) and int(c) < len(names)):
                raise DataError(f"{source}: row {row}: label '{c}' is not one of the classes ({', '.join(names)}) "
                                f"nor an index below {len(names)}")
        return [None if not c else index[c] if c in index else int(c) for _, c in cells], names
    if given and all(_is_index(c) for _, c in given):
        names = tuple(str(i) for i in range(max(int(c) for _, c in given) + 1))
        return [int(c) if c else None for _, c in cells], names
    names = tuple(sorted({c for _, c in given}))
    index = {name: i for i, name in enumerate(names)}
    return [index[c] if c else None for _, c in cells], names


def _is_index(cell: str) -> bool:
    return cell.isascii() and cell.isdigit()


def _split(source: str, row: int, cell: str) -> str | None:
    """A split cell -> "train" / "val" / "test", or None when empty."""
    if not cell:
        return None
    split = SPLIT_ALIASES.get(cell.lower())
    if split is None:
        raise DataError(f"{source}: row {row}: split '{cell}' is not train, val (valid, validation) or test")
    return split


def _existing_file(source: str, row: int, cell: str, root: Path, path_col: str) -> str:
    """A path cell -> the absolute path of an existing file."""
    if not cell:
        raise DataError(f"{source}: row {row}: empty '{path_col}' cell; expected an image file")
    full = os.path.abspath(cell if os.path.isabs(cell) else root / cell)
    if os.path.isdir(full) and not dicom_files(Path(full)):
        raise DataError(f"{source}: row {row}: '{cell}' is a folder without .dcm files (looked at {full}); "
                        "expected an image file or a DICOM series folder")
    if not os.path.exists(full):
        raise DataError(f"{source}: row {row}: '{cell}' not found (looked at {full})")
    return full


def _where(e: Entry) -> str:
    """Where an entry came from, for messages: its CSV row, or its file when read from a folder."""
    return f"row {e.row}" if e.row else e.path


def _check_groups(entries: list[Entry], source: str) -> None:
    """Raise when one group has images in two splits."""
    first: dict[str, Entry] = {}
    for e in entries:
        if e.group is None or e.split is None:
            continue
        seen = first.setdefault(e.group, e)
        if seen.split != e.split:
            raise DataError(f"{source}: group '{e.group}' is in split '{seen.split}' ({_where(seen)}) and "
                            f"'{e.split}' ({_where(e)}); expected all of a group's images in one split")


def _units(entries: list[Entry]) -> list[list[int]]:
    """Entry indices per unit (a group, or one ungrouped image), sorted by group name / path so
    that the order of the rows does not matter."""
    by_key: dict[tuple[int, str], list[int]] = {}
    for i, e in enumerate(entries):
        key = (0, e.group) if e.group is not None else (1, e.path)
        by_key.setdefault(key, []).append(i)
    return [by_key[key] for key in sorted(by_key)]


def _fill_empty_splits(split_of: np.ndarray, sizes: np.ndarray, fr: np.ndarray) -> None:
    """Give each split with a fraction > 0 and no unit the smallest unit of the split with the
    most units, while that split keeps at least one (in place)."""
    for s in np.flatnonzero(fr > 0):
        if (split_of == s).any():
            continue
        n_units = np.bincount(split_of, minlength=3)
        donor = int(np.argmax(n_units))
        if n_units[donor] < 2:
            return
        candidates = np.flatnonzero(split_of == donor)
        split_of[candidates[np.argmin(sizes[candidates])]] = s
