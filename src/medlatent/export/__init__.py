"""A run's encoder and its preprocessing, written for other ecosystems.

``export_run(run, format)`` writes one folder (default ``<run>/export/<format>``) holding the
model files and ``export.json``: the format, the preprocessing the model expects, provenance
(run, step, method, backbone, data), a usage snippet, and the reload check: the largest
absolute difference between the run's encoder and the export, loaded back the way its
ecosystem loads it, on the same fp32 batches. Formats (see docs/export.md):

- ``monai``: safetensors for ``monai.networks.nets.ResNet`` / ``ViT`` plus the constructor kwargs;
- ``timm``: a ViT in timm's layout with a timm ``config.json`` (the inverse of ``adapt.external``);
- ``torchscript``: ``torch.jit.trace`` of the encoder (any batch size);
- ``onnx``: opset 18, dynamic batch axis (needs ``pip install 'medlatent[export]'``);
- ``bundle``: a MONAI bundle whose ``inference.json`` embeds a folder of images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from medlatent.errors import CheckpointError, ConfigError
from medlatent.export import bundle, monai_format, timm_format, traced
from medlatent.export.common import CHECK_LIMIT, RECORD, check_record, preprocessing, provenance, staged, write_json
from medlatent.methods.saved import LoadedEncoder, open_encoder, read_config


class Format(NamedTuple):
    check: Callable[[LoadedEncoder], None]  # refuses an encoder the format cannot take, before writing
    write: Callable[[LoadedEncoder, Path], dict[str, Any]]
    verify: Callable[[LoadedEncoder, Path, dict[str, Any]], tuple[float | None, str]]


def _any(enc: LoadedEncoder) -> None:
    return None


FORMATS: dict[str, Format] = {
    "monai": Format(_any, monai_format.write, monai_format.verify),
    "timm": Format(timm_format.check, timm_format.write, timm_format.verify),
    "torchscript": Format(_any, traced.write_torchscript, traced.verify_torchscript),
    "onnx": Format(_any, traced.write_onnx, traced.verify_onnx),
    "bundle": Format(bundle.check, bundle.write, bundle.verify),
}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """Write the run's newest encoder in ``fmt``; returns ``export.json``'s contents plus ``path``.

    Raises:
        ConfigError: an unknown format, one this encoder cannot take, or an export that does
            not reproduce the encoder.
        CheckpointError: not a run folder, a run without an encoder, or no checkpoint yet.
    """
    from medlatent.methods.registry import get_method
    from medlatent.train.runs import RunDir

    run = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"{run}: unknown export format '{fmt}' (known: {', '.join(FORMATS)})")
    cfg = read_config(RunDir(run))
    if not get_method(cfg.method).exports_encoder:
        raise CheckpointError(f"{run}: {cfg.method} runs have no encoder to export (it is a generative model)")
    enc = open_encoder(run, "cpu")
    form = FORMATS[fmt]
    form.check(enc)
    target = Path(out) if out is not None else run / "export" / fmt
    with staged(target) as folder:
        record = dict(format=fmt, **form.write(enc, folder))
        record.update(preprocessing=preprocessing(enc), provenance=provenance(enc))
        write_json(folder / RECORD, record)
        diff, how = form.verify(enc, folder, record)
        if diff is not None and diff > CHECK_LIMIT:
            raise ConfigError(f"{run}: the {fmt} export does not reproduce the encoder (max abs diff {diff:.2e}); "
                              f"nothing written")
        record["check"] = check_record(diff, how)
        write_json(folder / RECORD, record)
    return dict(record, path=str(target))


__all__ = ["FORMATS", "export_run"]
