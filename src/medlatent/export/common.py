"""What every export format shares: the preprocessing and provenance records, the staged
output folder (nothing half-written is left behind), and the reload check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from medlatent.errors import ConfigError
from medlatent.methods.saved import LoadedEncoder

RECORD = "export.json"  # in every export folder: what was exported, how to feed it, the reload check
CHECK_BATCHES = (2, 3)  # two batch sizes: traced graphs must not have fixed the batch dimension
CHECK_LIMIT = 1e-4  # a reload further from the encoder than this is a broken export, not rounding


def preprocessing(enc: LoadedEncoder) -> dict[str, Any]:
    """How raw images become the encoder's input (what ``LoadedEncoder.preprocess`` does)."""
    d, s = enc.spatial_dims, enc.image_size
    resize = "bilinear, antialiased when shrinking" if d == 2 else "trilinear"
    layout = "(B, C, D, H, W)" if d == 3 else "(B, C, H, W)"
    return dict(
        input_shape=[enc.in_channels] + [s] * d, layout=layout, dtype="float32", in_channels=enc.in_channels,
        image_size=s, spatial_dims=d, mean=enc.mean, std=enc.std,
        steps=["uint8 / 255 (other integers / their type's maximum; floats taken as [0, 1])",
               *(["grayscale repeated to 3 channels, alpha dropped"] if enc.in_channels == 3 else []),
               f"centre-crop to a square and resize to {s} px ({resize}), "
               "clamp to [0, 1] (images already that size are left as they are)",
               "(x - mean) / std per channel"],
        python="medlatent.load_encoder(run).preprocess(images)")


def provenance(enc: LoadedEncoder) -> dict[str, Any]:
    import monai

    from medlatent import __version__

    return dict(run=str(enc.run.resolve()), step=enc.step, method=enc.method, backbone=enc.backbone, data=enc.data,
                out_dim=enc.out_dim, medlatent=__version__, torch=torch.__version__, monai=monai.__version__,
                exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds.

    An existing ``out`` is replaced only when it is empty or an earlier export (it holds
    ``export.json``); anything else is refused, so a wrong ``--out`` never deletes user files."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / RECORD).is_file())):
        raise ConfigError(f"{out}: exists and is not an earlier export; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def check_batch(enc: LoadedEncoder, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed standard-normal batch shaped like preprocessed images: (n, C, *S)."""
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, enc.in_channels, *([enc.image_size] * enc.spatial_dims), generator=g)


@torch.no_grad()
def max_abs_diff(enc: LoadedEncoder, candidate: Callable[[torch.Tensor], Any]) -> float:
    """Largest |encoder(x) - candidate(x)| over :data:`CHECK_BATCHES` (fp32, CPU)."""
    worst = 0.0
    for n in CHECK_BATCHES:
        x = check_batch(enc, n)
        ref = enc.encoder(x).float()
        got = torch.as_tensor(candidate(x)).float()
        if got.shape != ref.shape:
            raise ConfigError(f"{enc.run}: the exported model gives {tuple(got.shape)} for a batch of {n}, "
                              f"the encoder {tuple(ref.shape)}")
        worst = max(worst, float((got - ref).abs().max()))
    return worst


def check_record(diff: float | None, how: str) -> dict[str, Any]:
    return dict(max_abs_diff=diff, how=how, batch_sizes=list(CHECK_BATCHES),
                input="standard-normal batches shaped like preprocessed images, seed 0", device="cpu, fp32")
