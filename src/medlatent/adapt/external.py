"""Loading ViT weights a user has on disk (timm, DINO or MAE checkpoints) into our ViT.

Our ViT keeps MONAI's parameter names; public checkpoints use timm's. The mapping is a table
of renames; the class token's position embedding (timm adds one, MONAI does not) is folded
into the class token, which is exact for a pre-norm ViT; position embeddings are interpolated
to the patch grid of the target image size; RGB patch weights are summed over channels for
grayscale images (as timm does for ``in_chans=1``). Everything that does not map is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from medlatent.errors import CheckpointError
from medlatent.nets.backbones import ViTEncoder, interpolate_positions

# timm name -> MONAI name (regular expressions over the whole key)
RENAMES = [
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embedding.patch_embeddings.\1"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"blocks.\1.attn.out_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"blocks.\1.mlp.linear1.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"blocks.\1.mlp.linear2.\2"),
    (r"^fc_norm\.(weight|bias)$", r"norm.\1"),  # MAE's global-pool models name the last norm so
]
PREFIXES = ("module.", "model.", "backbone.", "encoder.")
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


@dataclass
class LoadReport:
    """What happened to each key of the checkpoint."""

    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in our ViT
    missing: list[str] = field(default_factory=list)  # in our ViT, not in the file
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.missing:
            parts.append(f"missing (left at initialisation): {', '.join(self.missing)}")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:8]) + (" ..." if len(self.unexpected) > 8 else "")
            parts.append(f"unexpected (ignored): {len(self.unexpected)}: {shown}")
        return "; ".join(parts + self.notes)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pt or .pth file, unwrapped from {"model"|"teacher"|"state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for key in ("teacher", "model", "state_dict", "target_encoder", "encoder"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def to_monai_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``model.``, ``backbone.``, ``encoder.``) and rename
    timm keys to MONAI's; keys already in MONAI's naming pass through."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        if key == "pos_embed":
            key = "patch_embedding.position_embeddings"
        out[key] = value
    return out


def vit_from_weights(path: str | Path, in_channels: int, img_size: int, num_heads: int | None = None
                     ) -> tuple[ViTEncoder, LoadReport]:
    """A ViT built to the checkpoint's shapes for ``img_size`` images, with its weights loaded.

    Raises:
        CheckpointError: unreadable file, not a ViT, or an image size the patches do not tile.
    """
    state = to_monai_names(read_state_dict(path))
    conv = state.get("patch_embedding.patch_embeddings.weight")
    if conv is None or "cls_token" not in state:
        raise CheckpointError(f"{path}: not a ViT checkpoint (no patch embedding or class token found)")
    dim, file_channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp = state.get("blocks.0.mlp.linear1.weight")
    heads = num_heads or HEADS.get(dim)
    if heads is None:
        raise CheckpointError(f"{path}: cannot tell the number of attention heads for width {dim}; give it")
    if img_size % patch:
        raise CheckpointError(f"{path}: patch size {patch} does not tile {img_size} px images "
                              f"(use images of a multiple of {patch} px, e.g. --size 224 data)")
    report = LoadReport()
    vit = ViTEncoder(in_channels, img_size, patch, dim, depth, heads, (mlp.shape[0] / dim) if mlp is not None else 4.0,
                     spatial_dims=conv.dim() - 2)
    vit.eval()
    # Class token: timm gives it a position embedding of its own; fold it in.
    pos = state["patch_embedding.position_embeddings"]  # (1, [1 +] G, D)
    grid, d = vit.num_patches, conv.dim() - 2

    def is_grid(n: int) -> bool:
        return n > 0 and round(n ** (1 / d)) ** d == n

    if not is_grid(pos.shape[1]) and is_grid(pos.shape[1] - 1):
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        pos = pos[:, 1:]
        report.notes.append("class-token position embedding folded into the class token")
    if not is_grid(pos.shape[1]):
        raise CheckpointError(f"{path}: position embeddings of shape {tuple(pos.shape)} are not a square grid")
    if pos.shape[1] != grid:
        report.notes.append(f"position embeddings interpolated from {pos.shape[1]} to {grid} patches")
        pos = interpolate_positions(pos, (img_size,) * d, patch)
    state["patch_embedding.position_embeddings"] = pos
    if file_channels != in_channels:
        if in_channels == 1:
            state["patch_embedding.patch_embeddings.weight"] = conv.sum(1, keepdim=True)
            report.notes.append(f"patch weights summed over {file_channels} input channels for grayscale images")
        else:
            raise CheckpointError(f"{path}: weights take {file_channels}-channel images, the data have {in_channels}")
    ours = vit.state_dict()
    usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    report.unexpected = sorted(k for k in state if k not in usable)
    report.missing = sorted(k for k in ours if k not in usable and "norm_cross_attn" not in k)
    report.loaded = sorted(usable)
    vit.load_state_dict(usable, strict=False)
    return vit, report


def init_encoder(encoder: nn.Module, source: str | Path) -> LoadReport:
    """Start ``encoder`` from existing weights (``pretrain --init``), in place.

    ``source`` is a medlatent run folder (its newest encoder), or a ``.safetensors``/``.pt``/
    ``.pth`` file in MONAI, timm, DINO/DINOv2 or MAE layout (ViTs: renamed, class-token
    position folded, positions interpolated, by :func:`vit_from_weights`) or MONAI/torchvision
    layout (ResNets: the same key names; a 3-channel first convolution is summed for grayscale).
    Tensors whose name and shape match are loaded; the rest is reported.

    Raises:
        CheckpointError: unreadable source, or nothing in it matches the encoder.
    """
    path = Path(source)
    ours = encoder.state_dict()
    report = LoadReport()
    if path.is_dir():
        from medlatent.methods.saved import load_encoder

        state = {k: v for k, v in load_encoder(path)[0].state_dict().items()}
    elif isinstance(encoder, ViTEncoder):
        vit, vit_report = vit_from_weights(path, encoder.in_channels, encoder.img_size, encoder.blocks[0].attn.num_heads)
        state, report.notes = vit.state_dict(), vit_report.notes
    else:
        state = to_monai_names(read_state_dict(path))
        first = ours.get("conv1.weight")
        if first is not None and "conv1.weight" in state and state["conv1.weight"].shape[1] != first.shape[1] \
                and first.shape[1] == 1:
            state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
            report.notes.append("first convolution summed over its input channels for grayscale images")
    usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"{path}: no tensor matches the encoder by name and shape (the file has e.g. "
                              f"{', '.join(list(state)[:3])}; the encoder has e.g. {', '.join(list(ours)[:3])})")
    report.loaded = sorted(usable)
    report.unexpected = sorted(k for k in state if k not in usable)
    report.missing = sorted(k for k in ours if k not in usable and "num_batches_tracked" not in k)
    encoder.load_state_dict(usable, strict=False)
    return report

