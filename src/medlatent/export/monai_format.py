"""MONAI: the encoder's weights (safetensors) for ``monai.networks.nets.ResNet`` / ``ViT``, with
the class, its exact constructor arguments and the read-out that gives the run's features.

Our ResNet is MONAI's ``ResNet`` built with ``feed_forward=False`` (no ``fc``): its forward
returns the global-average-pooled last stage, (B, out_dim), which is the run's feature. Our ViT
uses MONAI's blocks and names; ``monai.networks.nets.ViT(classification=True)`` returns
``(x, hidden_states)``: with ``num_classes = hidden_size``, no ``post_activation`` and the
identity written into ``classification_head`` (exact: a product with 1 and sums of zeros), ``x``
is the normalised CLS token, our "cls" read-out; the "mean" read-out is
``vit.norm(hidden_states[-1])[:, 1:].mean(1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medlatent.errors import ConfigError
from medlatent.export.common import max_abs_diff
from medlatent.methods.saved import LoadedEncoder
from medlatent.nets.backbones import ResNetEncoder, ViTEncoder

WEIGHTS = "model.safetensors"


def monai_network(encoder: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], str]:
    """(MONAI class path, constructor kwargs, state dict for it, read-out) of one of our encoders."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    if isinstance(encoder, ResNetEncoder):
        return "monai.networks.nets.ResNet", dict(encoder.monai_kwargs), state, "pooled"
    if isinstance(encoder, ViTEncoder):
        d = encoder.out_dim
        block = encoder.blocks[0]
        kwargs = dict(in_channels=encoder.in_channels, img_size=encoder.img_size, patch_size=encoder.patch_size,
                      hidden_size=d, mlp_dim=int(block.mlp.linear1.out_features), num_layers=len(encoder.blocks),
                      num_heads=int(block.attn.num_heads), proj_type="conv", pos_embed_type="learnable",
                      classification=True, num_classes=d, post_activation=None, qkv_bias=True, dropout_rate=0.0,
                      spatial_dims=encoder.spatial_dims)
        state["classification_head.weight"] = torch.eye(d)
        state["classification_head.bias"] = torch.zeros(d)
        return "monai.networks.nets.ViT", kwargs, state, encoder.pool
    raise ConfigError(f"export: no MONAI class for a {type(encoder).__name__} encoder")


def build(class_path: str, kwargs: dict[str, Any]) -> nn.Module:
    from monai.networks import nets

    return getattr(nets, class_path.rsplit(".", 1)[1])(**kwargs)


def features(net: nn.Module, x: torch.Tensor, readout: str) -> torch.Tensor:
    """The run's features from the MONAI network (what the usage snippet computes)."""
    if readout == "pooled":
        return net(x)
    out, hidden = net(x)
    return out if readout == "cls" else net.norm(hidden[-1])[:, 1:].mean(1)


READOUTS = {
    "pooled": ("forward returns the global-average-pooled last stage, (B, out_dim) (feed_forward=False: no fc)",
               "features = net(x)"),
    "cls": ("forward returns (x, hidden_states); x is the normalised CLS token (classification_head holds the "
            "identity)", "features = net(x)[0]"),
    "mean": ("forward returns (x, hidden_states); the run's read-out is the mean of the normalised patch tokens",
             "features = net.norm(net(x)[1][-1])[:, 1:].mean(1)"),
}


def usage(class_path: str, readout: str, shape: list[int], out_dim: int) -> str:
    name = class_path.rsplit(".", 1)[1]
    return "\n".join([
        "import json, torch",
        "from safetensors.torch import load_file",
        f"from monai.networks.nets import {name}",
        "",
        "spec = json.load(open(\"export.json\"))",
        f"net = {name}(**spec[\"kwargs\"])",
        f"net.load_state_dict(load_file(\"{WEIGHTS}\"))",
        "net.eval()",
        f"# x: (B, {', '.join(map(str, shape))}) float32, preprocessed as spec[\"preprocessing\"] says",
        "with torch.no_grad():",
        f"    {READOUTS[readout][1]}  # (B, {out_dim})",
    ])


def write(enc: LoadedEncoder, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    class_path, kwargs, state, readout = monai_network(enc.encoder)
    save_file(state, str(folder / WEIGHTS), metadata=dict(format="pt", monai_class=class_path))
    shape = [enc.in_channels] + [enc.image_size] * enc.spatial_dims
    return dict(files=[WEIGHTS], **{"class": class_path}, kwargs=kwargs, readout=readout,
                readout_note=READOUTS[readout][0], usage=usage(class_path, readout, shape, enc.out_dim))


def verify(enc: LoadedEncoder, folder: Path, record: dict[str, Any]) -> tuple[float, str]:
    from safetensors.torch import load_file

    net = build(record["class"], record["kwargs"])
    net.load_state_dict(load_file(str(folder / WEIGHTS)))  # strict: every key matches
    net.eval()
    return max_abs_diff(enc, lambda x: features(net, x, record["readout"])), \
        f"{record['class']}(**kwargs).load_state_dict(strict=True), read-out {record['readout']}"
