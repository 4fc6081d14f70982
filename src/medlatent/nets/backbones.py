"""Encoders for small medical images, from MONAI networks, in 2-D and 3-D.

Every encoder maps ``(B, C, *spatial)`` to ``(B, out_dim)`` and carries ``out_dim``,
``in_channels``, ``spatial_dims`` and ``prefers_channels_last``. Parameter names are MONAI's,
so pretrained weights load straight into MONAI models (the ViT's into ``monai.networks.nets.ViT``
or the ``vit`` of ``UNETR``; the ResNet's into ``monai.networks.nets.ResNet``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.nets import ResNet

from medlatent.errors import ConfigError


class SmallImageResNet(ResNet):
    """ResNet-18 for 28-64 px images: 3x3 stride-1 stem, no max-pool, no classifier.

    The CIFAR variant of He et al. (2016): at 28 px the ImageNet stem (7x7 stride 2 plus
    max-pool) would shrink the image to 7 px before the first block. Built by MONAI's ``ResNet``
    (which has these options); this subclass only records ``out_dim`` and friends.

    Args:
        in_channels: image channels (1 grayscale, 3 RGB).
        spatial_dims: 2 or 3.
        width: channels of the first stage; 64 is ResNet-18, 32 is the half-width variant
            (~3x faster on a CPU at 28 px, 2.8 M parameters).
        layers: blocks per stage.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, width: int = 64,
                 layers: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__(block="basic", layers=list(layers),
                         block_inplanes=[width, 2 * width, 4 * width, 8 * width],
                         spatial_dims=spatial_dims, n_input_channels=in_channels,
                         conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, feed_forward=False)
        self.out_dim = 8 * width
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.prefers_channels_last = True


class ViTEncoder(nn.Module):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021) from MONAI blocks; output = CLS token.

    Attention is PyTorch's scaled-dot-product kernel (MONAI ``use_flash_attention``).
    Attribute names match ``monai.networks.nets.ViT(classification=True)``.

    Args:
        in_channels: image channels.
        img_size: image side in pixels.
        patch_size: patch side; ``img_size`` must be a multiple of it.
        hidden_size: token dimension D (192 tiny, 384 small).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of D.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, img_size: int, patch_size: int, hidden_size: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"ViT: image size {img_size} is not a multiple of patch size {patch_size}")
        self.patch_embedding = PatchEmbeddingBlock(in_channels, img_size, patch_size, hidden_size,
                                                   num_heads, proj_type="conv",
                                                   pos_embed_type="learnable", spatial_dims=spatial_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, int(hidden_size * mlp_ratio), num_heads, qkv_bias=True,
                             use_flash_attention=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.out_dim = hidden_size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** spatial_dims
        self.prefers_channels_last = False

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, 1 + L, D): the CLS token then L patch tokens, after the last norm."""
        t = self.patch_embedding(x)  # (B, L, D), position embeddings added
        cls = self.cls_token.expand(t.shape[0], -1, -1)  # (B, 1, D)
        t = torch.cat([cls, t], dim=1)  # (B, 1 + L, D)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]  # (B, D)


def default_patch_size(img_size: int) -> int:
    """4 px up to 32 px images, 8 up to 64, else 16: 7-8 patches a side, 49-64 tokens."""
    return 4 if img_size <= 32 else 8 if img_size <= 64 else 16


ENCODERS = ("resnet18", "resnet18-half", "resnet18-quarter", "vit-tiny", "vit-small")


def build_encoder(name: str, in_channels: int, img_size: int, spatial_dims: int = 2,
                  patch_size: int | None = None) -> nn.Module:
    """An encoder by name (see :data:`ENCODERS`)."""
    if name == "resnet18":
        return SmallImageResNet(in_channels, spatial_dims, width=64)
    if name == "resnet18-half":
        return SmallImageResNet(in_channels, spatial_dims, width=32)
    if name == "resnet18-quarter":  # 16-32-64-128: 3.3x faster than half width on a CPU
        return SmallImageResNet(in_channels, spatial_dims, width=16)
    if name in ("vit-tiny", "vit-small"):
        dim, heads = (192, 3) if name == "vit-tiny" else (384, 6)
        return ViTEncoder(in_channels, img_size, patch_size or default_patch_size(img_size),
                          hidden_size=dim, depth=12, num_heads=heads, spatial_dims=spatial_dims)
    raise ConfigError(f"backbone.name: unknown encoder '{name}' (known: {', '.join(ENCODERS)})")
