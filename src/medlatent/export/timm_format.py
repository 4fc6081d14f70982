"""timm: a ViT's weights in timm's ``VisionTransformer`` key layout plus a ``config.json`` like
the ones timm reads from the Hugging Face hub.

This is the inverse of :mod:`medlatent.adapt.external` (timm/DINO/MAE weights -> our ViT): the
renames run backwards, the CLS token's position embedding is written as zeros (the CLS token
already holds it, so importing folds back exactly), and MONAI's unused ``norm_cross_attn`` is
left out. Two facts the config carries because timm's defaults differ: our LayerNorms use
eps 1e-5 (timm's ViT 1e-6), and the "mean" read-out normalises the tokens before averaging
(timm ``global_pool="avg"`` with ``fc_norm=False``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from medlatent.errors import ConfigError
from medlatent.export.common import max_abs_diff
from medlatent.methods.saved import LoadedEncoder
from medlatent.nets.backbones import ViTEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ARCHITECTURES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}
LAYER_NORM_EPS = 1e-5  # torch's default, what MONAI's blocks and our final norm use

# MONAI name -> timm name (the inverse of adapt.external.RENAMES)
TO_TIMM = [
    (r"^patch_embedding\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.attn\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
]
SAME = re.compile(r"^(cls_token|norm\.(weight|bias)|blocks\.\d+\.(norm1|norm2)\.(weight|bias)"
                  r"|blocks\.\d+\.attn\.qkv\.(weight|bias))$")
DROPPED = re.compile(r"^blocks\.\d+\.norm_cross_attn\.(weight|bias)$")  # MONAI keeps it for old checkpoints; unused


def check(enc: LoadedEncoder) -> None:
    if not isinstance(enc.encoder, ViTEncoder):
        raise ConfigError(f"{enc.run}: --format timm writes timm's ViT layout; this run's backbone is "
                          f"{enc.backbone} (use --format monai, torchscript or onnx)")
    if enc.spatial_dims != 2:
        raise ConfigError(f"{enc.run}: --format timm: timm's ViTs are 2-D; this run's ViT is 3-D "
                          f"(use --format monai, torchscript or onnx)")
    if enc.out_dim not in ARCHITECTURES:
        raise ConfigError(f"{enc.run}: --format timm: no timm ViT of width {enc.out_dim} "
                          f"(known: {', '.join(map(str, ARCHITECTURES))})")


def to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT's state dict (MONAI names) -> timm ``VisionTransformer`` names and shapes."""
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if DROPPED.match(key):
            continue
        if key == "patch_embedding.position_embeddings":  # (1, L, D) -> (1, 1 + L, D): the CLS slot is 0
            out["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
            continue
        new = key
        for pattern, repl in TO_TIMM:
            new = re.sub(pattern, repl, new)
        if new == key and not SAME.match(key):
            raise ConfigError(f"export: no timm name for the ViT parameter '{key}'")
        out[new] = value
    return out


def timm_config(enc: LoadedEncoder) -> dict[str, Any]:
    vit: ViTEncoder = enc.encoder  # type: ignore[assignment]
    block = vit.blocks[0]
    pool = "token" if vit.pool == "cls" else "avg"
    args = dict(img_size=enc.image_size, patch_size=vit.patch_size, embed_dim=enc.out_dim, depth=len(vit.blocks),
                num_heads=int(block.attn.num_heads), mlp_ratio=block.mlp.linear1.out_features / enc.out_dim,
                in_chans=enc.in_channels, num_classes=0, global_pool=pool, class_token=True, fc_norm=False,
                qkv_bias=True)
    return dict(architecture=ARCHITECTURES[enc.out_dim], num_classes=0, num_features=enc.out_dim,
                global_pool=pool, **{k: v for k, v in args.items() if k not in ("num_classes", "global_pool")},
                layer_norm_eps=LAYER_NORM_EPS, model_args=args,
                pretrained_cfg=dict(input_size=[enc.in_channels, enc.image_size, enc.image_size],
                                    mean=enc.mean, std=enc.std, interpolation="bilinear", crop_pct=1.0,
                                    crop_mode="center", num_classes=0))


USAGE = """import json, timm, torch
from safetensors.torch import load_file

cfg = json.load(open("config.json"))
model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
model.load_state_dict(load_file("model.safetensors"))
for m in model.modules():  # timm's ViT uses eps 1e-6; these weights were trained with 1e-5
    if isinstance(m, torch.nn.LayerNorm):
        m.eps = cfg["layer_norm_eps"]
model.eval()
# x: (B, {shape}) float32, normalised with cfg["pretrained_cfg"]["mean"] / ["std"]
with torch.no_grad():
    features = model(x)  # (B, {dim}): num_classes=0, so the pooled features

# or back into medlatent (LoRA, adapters, fine-tuning): medlatent adapt model.safetensors --data ..."""


def write(enc: LoadedEncoder, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    check(enc)
    save_file(to_timm_names(enc.encoder.state_dict()), str(folder / WEIGHTS), metadata=dict(format="pt"))
    config = timm_config(enc)
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    shape = ", ".join(map(str, config["pretrained_cfg"]["input_size"]))
    return dict(files=[WEIGHTS, CONFIG], architecture=config["architecture"], global_pool=config["global_pool"],
                usage=USAGE.replace("{shape}", shape).replace("{dim}", str(enc.out_dim)))


def verify(enc: LoadedEncoder, folder: Path, record: dict[str, Any]) -> tuple[float, str]:
    """Import the written file back with medlatent's timm importer (timm itself needs torchvision)."""
    from medlatent.adapt.external import vit_from_weights

    config = json.loads((folder / CONFIG).read_text())
    vit, report = vit_from_weights(folder / WEIGHTS, enc.in_channels, enc.image_size, config["num_heads"])
    if report.missing or report.unexpected:
        raise ConfigError(f"{enc.run}: the timm export does not import back ({report.summary()})")
    vit.pool = "cls" if config["global_pool"] == "token" else "mean"
    vit.eval()
    return max_abs_diff(enc, vit), "medlatent.adapt.external.vit_from_weights (the timm/DINO/MAE importer)"
