"""TorchScript and ONNX: the encoder as a graph with its read-out, fixed image size, any batch size.

TorchScript is ``torch.jit.trace`` of the fp32 encoder on the CPU (``torch.jit.script`` cannot
compile our ViT's Python: position interpolation, token subsets; tracing records the operations
for the run's image size, and the batch size stays free). ONNX
uses PyTorch's exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnx`` and
``onnxscript``) at opset :data:`OPSET` with a dynamic batch axis; the reload check runs it in
``onnxruntime`` when that is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medlatent.errors import ConfigError
from medlatent.export.common import check_batch, max_abs_diff
from medlatent.methods.saved import LoadedEncoder

TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
OPSET = 18  # ONNX opset; onnxruntime >= 1.14 runs it
INPUT, OUTPUT = "image", "embedding"


def trace(encoder: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the ViT's size checks: constant at this size
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: TorchScript is deprecated, still loads
        return torch.jit.trace(encoder.eval(), example, check_trace=False)


def save(module: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(path))


def load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def write_torchscript(enc: LoadedEncoder, folder: Path, name: str = TORCHSCRIPT) -> dict[str, Any]:
    save(trace(enc.encoder, check_batch(enc, 2)), folder / name)
    shape = ", ".join(map(str, [enc.in_channels] + [enc.image_size] * enc.spatial_dims))
    return dict(files=[name], usage="\n".join([
        "import torch",
        "",
        f"model = torch.jit.load(\"{name}\", map_location=\"cpu\").eval()",
        f"# x: (B, {shape}) float32, preprocessed as export.json's \"preprocessing\" says",
        "with torch.no_grad():",
        f"    features = model(x)  # (B, {enc.out_dim})",
    ]))


def verify_torchscript(enc: LoadedEncoder, folder: Path, record: dict[str, Any]) -> tuple[float, str]:
    model = load(folder / record["files"][0])
    return max_abs_diff(enc, model), "torch.jit.load"


def write_onnx(enc: LoadedEncoder, folder: Path) -> dict[str, Any]:
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):  # the exporter needs both
        raise ConfigError(f"{enc.run}: --format onnx needs onnx and onnxscript: pip install 'medlatent[export]'")
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes, progress lines
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(enc.encoder.eval(), (check_batch(enc, 2),), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(folder / ONNX))
    except ConfigError:
        raise
    except Exception as e:  # the exporter raises many types; say which model and why
        raise ConfigError(f"{enc.run}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    finally:
        quiet.setLevel(level)
    files = sorted(p.name for p in folder.iterdir() if p.name.startswith(ONNX))  # model.onnx[.data]
    shape = ", ".join(map(str, [enc.in_channels] + [enc.image_size] * enc.spatial_dims))
    return dict(files=files, opset=OPSET, input=INPUT, output=OUTPUT, dynamic_axes={INPUT: {"0": "batch"},
                                                                                     OUTPUT: {"0": "batch"}},
                usage="\n".join([
                    "import numpy as np, onnxruntime as ort",
                    "",
                    f"session = ort.InferenceSession(\"{ONNX}\", providers=[\"CPUExecutionProvider\"])",
                    f"# x: (B, {shape}) float32 numpy, preprocessed as export.json's \"preprocessing\" says",
                    f"features = session.run([\"{OUTPUT}\"], {{\"{INPUT}\": x}})[0]  # (B, {enc.out_dim})",
                ]))


def verify_onnx(enc: LoadedEncoder, folder: Path, record: dict[str, Any]) -> tuple[float | None, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "not checked: onnxruntime is not installed (pip install 'medlatent[export]')"
    session = ort.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
    return max_abs_diff(enc, lambda x: session.run([OUTPUT], {INPUT: x.numpy()})[0]), \
        "onnxruntime.InferenceSession (CPUExecutionProvider)"
