"""Find MedMNIST files locally or download them, always verified by md5, written atomically.

Lookup order for a file: the data folder (an explicit ``data_dir``, else ``$MEDLATENT_DATA``,
else ``~/.cache/medlatent``), then the ``medmnist`` package's cache ``~/.medmnist`` (its fixed
default root; the package reads no environment variable for it, so neither do we: point
``$MEDLATENT_DATA`` at another root). Both hold the official file names (``bloodmnist.npz`` at
28 px, ``bloodmnist_64.npz`` ...). A file in the data folder is used after its md5 matches the
catalogue, and a wrong md5 there is an error (it is the file the user pointed us at). A file in
``~/.medmnist`` is used only when its md5 matches; one that does not is skipped, and named in
the error only if nothing else is found (the download fails too). A download always goes to the
data folder, to a temporary name renamed only once its md5 matches, so an interrupted or
corrupted download never leaves a file that looks complete; ``~/.medmnist`` is never written.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from medlatent.data.catalogue import MedMNISTInfo
from medlatent.errors import DataError

ENV_VAR = "MEDLATENT_DATA"
MIRROR_VAR = "MEDLATENT_MIRROR"  # base URL of a mirror holding the MedMNIST files (http(s):// or file://)
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> md5, per process


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder where data files are looked for and downloaded to."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "medlatent"


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a file, cached per process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        h = hashlib.md5()
        with path.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


def medmnist_cache() -> Path:
    """``~/.medmnist``: where the ``medmnist`` package keeps the files it downloaded."""
    return Path.home() / ".medmnist"


def local_path(info: MedMNISTInfo, size: int = 28, data_dir: str | None = None) -> Path:
    """Where the file for ``info`` at ``size`` lives locally, or would be downloaded to.

    The data folder's file when it exists (its md5 is checked by :func:`fetch`), else a copy in
    ``~/.medmnist`` whose md5 matches, else the data folder's path (the download destination)."""
    _check_size(info, size)
    dest = data_root(data_dir) / info.filename(size)
    if dest.is_file():
        return dest
    cached = medmnist_cache() / info.filename(size)
    if cached.is_file() and md5sum(cached) == info.md5[size]:
        return cached
    return dest


def is_present(info: MedMNISTInfo, size: int = 28, data_dir: str | None = None) -> bool:
    """True when the file exists in the data folder (md5 checked when used) or, verified, in
    ``~/.medmnist``."""
    return local_path(info, size, data_dir).is_file()


def fetch(info: MedMNISTInfo, size: int = 28, data_dir: str | None = None,
          timeout_s: float = 60.0) -> Path:
    """Return the verified local file for ``info`` at ``size``, downloading it if absent.

    Raises:
        DataError: wrong md5 of the data folder's file; download impossible (offline) with the
            URL, md5 and destination to put the file by hand (and the ``~/.medmnist`` copy that
            was skipped for its md5, if any); or a download with the wrong md5.
    """
    found = local_path(info, size, data_dir)
    expected = info.md5[size]
    if found.is_file():
        got = md5sum(found)
        if got != expected:
            raise DataError(f"{found}: md5 is {got}, expected {expected} (official {info.filename(size)}); "
                            f"the file is corrupt, truncated or not the official one: delete it and download again")
        return found
    dest = found  # not found anywhere: download into the data folder
    cached = medmnist_cache() / info.filename(size)
    skipped = f"; skipped {cached} (md5 {md5sum(cached)}, not the official file)" if cached.is_file() else ""
    url = source_url(info, size)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest.parent}: cannot create data folder ({e.strerror}); set {ENV_VAR} or --data-dir") from None
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        got = _download(url, tmp, timeout_s)
        if got != expected:
            raise DataError(f"{url}: downloaded file has md5 {got}, expected {expected}; not saved{skipped}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DataError(f"cannot download {info.filename(size)} from {url} ({reason}); "
                        f"put the file with md5 {expected} at {dest}{skipped}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def source_url(info: MedMNISTInfo, size: int = 28) -> str:
    """The official Zenodo address, or the file's address on ``$MEDLATENT_MIRROR`` when set."""
    mirror = os.environ.get(MIRROR_VAR)
    return f"{mirror.rstrip('/')}/{info.filename(size)}" if mirror else info.url(size)


def _download(url: str, tmp: Path, timeout_s: float) -> str:
    h = hashlib.md5()
    req = urllib.request.Request(url, headers={"User-Agent": "medlatent"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r, tmp.open("wb") as f:
        while block := r.read(1 << 20):
            h.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _check_size(info: MedMNISTInfo, size: int) -> None:
    if size not in info.md5:
        raise DataError(f"{info.name} is published at sizes {', '.join(map(str, info.sizes))}, not {size}")
