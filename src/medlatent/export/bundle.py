"""A MONAI bundle that embeds a folder of images: ``python -m monai.bundle run`` writes
``embeddings.npz`` (``embeddings`` (N, D), ``files`` (N,) relative to the folder).

Layout (MONAI Bundle Specification)::

    configs/metadata.json    versions, task, network_data_format (inputs and outputs)
    configs/inference.json   preprocessing (MONAI transforms), the network, the run
    configs/logging.conf     MONAI's usual logging set-up
    models/model.ts          TorchScript: the encoder and its read-out (what inference runs)
    models/model.pt          state dict for ``network_def`` (MONAI ResNet / ViT), torch.load(weights_only=True)
    scripts/__init__.py      the two transforms MONAI has no exact equivalent of, and the writer
    docs/README.md           how to run it

The bundle needs torch, numpy, pillow and MONAI only (not medlatent). Its preprocessing is
``LoadedEncoder.preprocess``: ``LoadImage`` (PIL, rows first as medlatent reads PNGs),
``ScaleIntensityRange`` 0-255 -> 0-1, grayscale/alpha to the encoder's channels, centre square
and resize with torch's antialiasing (MONAI's ``Resize`` smooths with a Gaussian instead), and
``NormalizeIntensity`` with the run's per-channel mean and std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlatent.errors import ConfigError
from medlatent.export import monai_format, traced
from medlatent.export.common import check_batch, max_abs_diff, provenance
from medlatent.methods.saved import LoadedEncoder

LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]

SCRIPTS = '''"""Helpers of configs/inference.json (written by medlatent export; needs torch, numpy and MONAI only)."""

import os

import numpy as np
import torch
from monai.transforms import Transform


def list_images(folder, extensions):
    """Image files under ``folder`` (any depth), sorted."""
    extensions = tuple(e.lower() for e in extensions)
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(extensions) and not name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(extensions)}); pass --dataset_dir FOLDER")
    return files


class MatchChannels(Transform):
    """(C, *S) -> (channels, *S): grayscale repeated for an RGB encoder, an alpha channel dropped."""

    def __init__(self, channels):
        self.channels = channels

    def __call__(self, img):
        img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        if img.shape[0] == 4 and self.channels == 3:
            img = img[:3]
        if img.shape[0] == 1 and self.channels == 3:
            img = img.expand(3, *img.shape[1:])
        if img.shape[0] != self.channels:
            raise ValueError(f"image has {img.shape[0]} channels; the encoder takes {self.channels}")
        return img


class CenterSquareResize(Transform):
    """Centre-crop to a square, resize to ``size`` (bilinear, antialiased when shrinking), clamp
    to [0, 1]; images already ``size`` px are left as they are (as medlatent prepares images)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        spatial = tuple(img.shape[1:])
        if spatial == (self.size,) * len(spatial):
            return img
        side = min(spatial)
        img = img[(slice(None),) + tuple(slice((s - side) // 2, (s - side) // 2 + side) for s in spatial)]
        if side != self.size:
            img = torch.nn.functional.interpolate(img[None], size=(self.size,) * len(spatial), mode="bilinear",
                                                  align_corners=False, antialias=side > self.size)[0]
        return img.clamp(0, 1)


def write_embeddings(network, dataloader, files, dataset_dir, output_dir, device):
    """Run the network over every batch; write <output_dir>/embeddings.npz (embeddings, files)."""
    out = []
    with torch.no_grad():
        for batch in dataloader:
            out.append(network(batch.to(device)).float().cpu())
    embeddings = torch.cat(out).numpy()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "embeddings.npz")
    tmp = os.path.join(output_dir, ".embeddings.tmp.npz")
    names = np.array([os.path.relpath(f, dataset_dir) for f in files])
    np.savez(tmp, embeddings=embeddings, files=names)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(embeddings)} embeddings of dimension {embeddings.shape[1]}")
    return path
'''


def check(enc: LoadedEncoder) -> None:
    if enc.spatial_dims != 2:
        raise ConfigError(f"{enc.run}: --format bundle reads 2-D image files (PNG, JPEG, TIFF); this run is 3-D "
                          f"(use --format torchscript, onnx or monai)")


def inference_config(enc: LoadedEncoder, class_path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "imports": ["$import os", "$import torch", "$import scripts"],
        "bundle_root": ".",
        "dataset_dir": "",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "image_extensions": EXTENSIONS,
        "batch_size": 64,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": class_path, **kwargs},
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        "datalist": "$scripts.list_images(@dataset_dir, @image_extensions)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImage", "reader": "PILReader", "reverse_indexing": False, "image_only": True,
             "ensure_channel_first": True, "dtype": "float32"},
            {"_target_": "ScaleIntensityRange", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0, "b_max": 1.0},
            {"_target_": "scripts.MatchChannels", "channels": enc.in_channels},
            {"_target_": "scripts.CenterSquareResize", "size": enc.image_size},
            {"_target_": "NormalizeIntensity", "subtrahend": enc.mean, "divisor": enc.std, "channel_wise": True},
            {"_target_": "EnsureType", "data_type": "tensor", "track_meta": False},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": 0},
        "run": ["$scripts.write_embeddings(@network, @dataloader, @datalist, @dataset_dir, @output_dir, @device)"],
    }


def metadata(enc: LoadedEncoder, class_path: str) -> dict[str, Any]:
    import monai

    p = provenance(enc)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medlatent from {enc.run.name} at step {enc.step}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": f"{enc.data} {enc.method} {enc.backbone} encoder",
        "task": "Image embedding (self-supervised encoder)",
        "description": f"{enc.method} {enc.backbone} encoder pretrained with medlatent on {enc.data}: images to "
                       f"{enc.out_dim}-dimensional embeddings (inference writes eval/embeddings.npz)",
        "authors": "medlatent export",
        "copyright": "the run's owner",
        "data_source": enc.data,
        "data_type": "png",
        "image_classes": f"{enc.in_channels}-channel images, 8-bit",
        "medlatent": p,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "unknown", "num_channels": enc.in_channels,
                "spatial_shape": [enc.image_size] * enc.spatial_dims, "dtype": "float32",
                "value_range": [0, 255], "is_patch_data": False,
                "channel_def": {str(i): name for i, name in enumerate(["gray"] if enc.in_channels == 1 else
                                                                      ["R", "G", "B"][:enc.in_channels])},
            }},
            "outputs": {"pred": {
                "type": "embedding", "format": "features", "num_channels": enc.out_dim, "spatial_shape": [],
                "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": {},
            }},
        },
        "network_def_class": class_path,
    }


README = """# {name}

Exported by `medlatent export {run} --format bundle` (step {step}). Embeds a folder of 2-D images:

```
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/images --output_dir /path/to/out
```

writes `/path/to/out/embeddings.npz`: `embeddings` ({dim} floats per image) and `files` (paths relative to
the folder), in sorted file order. Run it from this folder or pass `--bundle_root` as this folder's path.
Images: 8-bit PNG/JPEG/BMP/TIFF, any size (centre-cropped to a square and resized to {size} px), grayscale
or RGB as the encoder takes them ({channels} channel(s)); then normalised with the run's mean {mean} and
std {std}.

`models/model.ts` is the TorchScript encoder the inference runs; `models/model.pt` holds the same weights
as a state dict for `network_def` in `configs/inference.json` ({cls}).
"""


def write(enc: LoadedEncoder, folder: Path) -> dict[str, Any]:
    check(enc)
    class_path, kwargs, state, readout = monai_format.monai_network(enc.encoder)
    for sub in ("configs", "models", "scripts", "docs"):
        (folder / sub).mkdir()
    traced.save(traced.trace(enc.encoder, check_batch(enc, 2)), folder / "models" / "model.ts")
    torch.save(state, folder / "models" / "model.pt")
    config = inference_config(enc, class_path, kwargs)
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(enc, class_path), indent=1) + "\n")
    (folder / "configs" / "logging.conf").write_text(LOGGING)
    (folder / "scripts" / "__init__.py").write_text(SCRIPTS)
    (folder / "docs" / "README.md").write_text(README.format(
        name=metadata(enc, class_path)["name"], run=enc.run.name, step=enc.step, dim=enc.out_dim,
        size=enc.image_size, channels=enc.in_channels, mean=[round(m, 4) for m in enc.mean],
        std=[round(s, 4) for s in enc.std], cls=class_path))
    files = ["configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.ts",
             "models/model.pt", "scripts/__init__.py", "docs/README.md"]
    return dict(files=files, readout=readout, usage="\n".join([
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --bundle_root . --dataset_dir /path/to/images --output_dir /path/to/out",
        "# -> /path/to/out/embeddings.npz: embeddings (N, D), files (N,)",
    ]))


def verify(enc: LoadedEncoder, folder: Path, record: dict[str, Any]) -> tuple[float, str]:
    model = traced.load(folder / "models" / "model.ts")
    diff = max_abs_diff(enc, model)
    net = monai_format.build(*_network_def(folder))
    net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    net.eval()
    diff = max(diff, max_abs_diff(enc, lambda x: monai_format.features(net, x, record["readout"])))
    return diff, "torch.jit.load(models/model.ts); network_def + torch.load(models/model.pt, weights_only=True)"


def _network_def(folder: Path) -> tuple[str, dict[str, Any]]:
    spec = dict(json.loads((folder / "configs" / "inference.json").read_text())["network_def"])
    return spec.pop("_target_"), spec
