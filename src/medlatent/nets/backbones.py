"""Encoders for medical images from 28 to 224 px, from MONAI networks, in 2-D and 3-D.

Every encoder maps ``(B, C, *spatial)`` to ``(B, out_dim)`` and carries ``out_dim``,
``in_channels``, ``spatial_dims`` and ``prefers_channels_last``. Parameter names are MONAI's,
so pretrained weights load straight into MONAI models: the ResNet's into ``monai.networks.nets.ResNet``
(with the constructor arguments in ``encoder.monai_kwargs``), the ViT's into ``monai.networks.nets.ViT``,
and into the ``vit`` of ``UNETR`` (depth 12, ``qkv_bias=True``, the CLS token left out) only for 16-px
patches, which UNETR fixes: images of 128 px or more with the default patch rule, or
``backbone.patch_size=16``; not the 4- or 8-px patches of 28- and 64-px runs.

By image size (``stem=None``, ``patch_size=None``):

=======  ==================================  ============================
size     ResNet stem (:func:`default_stem`)  ViT patch (tokens)
=======  ==================================  ============================
28       cifar: 3x3 stride 1, no max-pool    4 px (7 x 7 = 49)
64       cifar                               8 px (8 x 8 = 64)
128      imagenet: 7x7 stride 2 + max-pool   16 px (8 x 8 = 64)
224      imagenet                            16 px (14 x 14 = 196, as ViT-B/16)
=======  ==================================  ============================
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.nets import ResNet

from medlatent.config import BackboneConfig
from medlatent.errors import ConfigError

STEMS = ("cifar", "imagenet")
# The first convolution and pooling of each stem, as MONAI ResNet arguments.
_STEM_KWARGS: dict[str, dict[str, Any]] = {
    "cifar": dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True),
    "imagenet": dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False),
}


def default_stem(img_size: int) -> str:
    """``cifar`` below 128 px, ``imagenet`` from 128 px.

    The ImageNet stem (He et al. 2016, Table 1: 7x7 conv stride 2, 3x3 max-pool stride 2)
    divides the side by 4 before the first stage: 224 px reach the last stage at 7 px, as in
    every published ImageNet ResNet, at 1/16 of the CIFAR stem's cost. At 28 px it would leave
    7 px for the first stage and 1 px for the last, hence the CIFAR stem (3x3 stride 1, no
    pool; He et al. 2016, Sec. 4.2) below 128 px: 64 px end at 8 px, 128 px at 4 px."""
    return "cifar" if img_size < 128 else "imagenet"


class ResNetEncoder(ResNet):
    """ResNet (He et al., CVPR 2016) without its classifier: (B, C, *S) -> (B, out_dim), the
    global-average-pooled last stage. Built by MONAI's ``ResNet``; this subclass records
    ``out_dim``, the stem and ``monai_kwargs`` (the exact ``monai.networks.nets.ResNet``
    arguments whose state dict equals this one's).

    Args:
        in_channels: image channels (1 grayscale, 3 RGB).
        spatial_dims: 2 or 3.
        width: channels of the first stage; 64 is the paper's ResNet, 32 half width.
        layers: blocks per stage: (2, 2, 2, 2) ResNet-18, (3, 4, 6, 3) ResNet-50.
        block: ``basic`` (two 3x3 convs) or ``bottleneck`` (1x1, 3x3, 1x1; 4x wider output).
        stem: ``cifar`` or ``imagenet`` (see :func:`default_stem`).
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, width: int = 64,
                 layers: tuple[int, int, int, int] = (2, 2, 2, 2), block: str = "basic",
                 stem: str = "cifar") -> None:
        if stem not in STEMS:
            raise ConfigError(f"backbone.stem: unknown stem '{stem}' (known: {', '.join(STEMS)})")
        kwargs: dict[str, Any] = dict(
            block=block, layers=list(layers), block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=spatial_dims, n_input_channels=in_channels, **_STEM_KWARGS[stem], feed_forward=False)
        super().__init__(**kwargs)
        self.monai_kwargs = kwargs
        self.out_dim = 8 * width * (4 if block == "bottleneck" else 1)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.stem = stem
        self.prefers_channels_last = True


class SmallImageResNet(ResNetEncoder):
    """ResNet-18 for 28-64 px images: 3x3 stride-1 stem, no max-pool, no classifier.

    The CIFAR variant of He et al. (2016): at 28 px the ImageNet stem (7x7 stride 2 plus
    max-pool) would shrink the image to 7 px before the first block. Every 28-px run's
    encoder is this class, so its keys and shapes (and the MONAI export) stay as they were.

    Args:
        in_channels: image channels (1 grayscale, 3 RGB).
        spatial_dims: 2 or 3.
        width: channels of the first stage; 64 is ResNet-18, 32 is the half-width variant
            (~3x faster on a CPU at 28 px, 2.8 M parameters).
        layers: blocks per stage.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, width: int = 64,
                 layers: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__(in_channels, spatial_dims, width, layers, block="basic", stem="cifar")



class EncoderStage(NamedTuple):
    """One stage of a convolutional encoder: ``module`` maps (B, in_channels, *S) to
    (B, out_channels, *S'), S' = S or S downsampled (stride 2, or 4 for the ImageNet stem)."""

    module: nn.Module
    in_channels: int
    out_channels: int


def encoder_stages(encoder: ResNetEncoder) -> list[EncoderStage]:
    """A ResNet's four stages in order: the stem (first convolution, batch norm, ReLU and, for the
    ImageNet stem, the max-pool) with ``layer1``, then ``layer2``, ``layer3`` and ``layer4``.

    Composed they give the last feature map h, (B, out_dim, *S / 8) with the CIFAR stem; the
    encoder's output is its global average, ``encoder(x) == encoder.avgpool(h).flatten(1)``.
    The modules are the encoder's own, not copies: training a stage trains the encoder. Greedy
    layer-wise pretraining (``ssl/autoencoder.py``) trains them one at a time.

    Raises:
        TypeError: ``encoder`` is not a :class:`ResNetEncoder` (a ViT has no such stages).
    """
    if not isinstance(encoder, ResNetEncoder):
        raise TypeError(f"{type(encoder).__name__} has no convolutional stages (a ResNetEncoder has four)")
    stem = [encoder.conv1, encoder.bn1, encoder.act] + ([] if encoder.no_max_pool else [encoder.maxpool])
    modules = [nn.Sequential(*stem, encoder.layer1), encoder.layer2, encoder.layer3, encoder.layer4]
    expansion = 4 if encoder.monai_kwargs["block"] == "bottleneck" else 1
    outs = [w * expansion for w in encoder.monai_kwargs["block_inplanes"]]
    ins = [encoder.in_channels, *outs[:-1]]
    return [EncoderStage(m, c_in, c_out) for m, c_in, c_out in zip(modules, ins, outs)]

VIT_POOLS = ("cls", "mean")


def transformer_block(dim: int, mlp_dim: int, heads: int) -> TransformerBlock:
    """MONAI's pre-norm transformer block with SDPA attention and qkv bias.

    MONAI always creates a ``norm_cross_attn`` LayerNorm (for checkpoint compatibility) even
    without cross-attention; it is frozen here, so it neither counts as trainable nor leaves
    DDP waiting for gradients that never come."""
    block = TransformerBlock(dim, mlp_dim, heads, qkv_bias=True, use_flash_attention=True)
    block.norm_cross_attn.requires_grad_(False)
    return block


class ViTEncoder(nn.Module):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021) from MONAI blocks; output = the CLS
    token, or the mean of the patch tokens (``pool="mean"``, the I-JEPA paper's read-out).

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
        pool: what ``forward`` returns: "cls" (the CLS token) or "mean" (the patch tokens
            averaged, as I-JEPA's paper probes them).
    """

    def __init__(self, in_channels: int, img_size: int, patch_size: int, hidden_size: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 spatial_dims: int = 2, pool: str = "cls") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"ViT: image size {img_size} is not a multiple of patch size {patch_size}")
        if pool not in VIT_POOLS:
            raise ConfigError(f"backbone.pool: unknown read-out '{pool}' (known: {', '.join(VIT_POOLS)})")
        self.pool = pool
        self.patch_embedding = PatchEmbeddingBlock(in_channels, img_size, patch_size, hidden_size,
                                                   num_heads, proj_type="conv",
                                                   pos_embed_type="learnable", spatial_dims=spatial_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList(transformer_block(hidden_size, int(hidden_size * mlp_ratio), num_heads)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.out_dim = hidden_size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.img_size = img_size  # the side its position embeddings were built for
        self.num_patches = (img_size // patch_size) ** spatial_dims
        self.prefers_channels_last = False

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, *S) -> (B, L, D) patch tokens plus position embeddings.

        Images of another size than the one the ViT was built for (DINO's local crops) get the
        position embeddings interpolated to their patch grid (as DINO does). With ``mask``
        (B, L) bool, the masked patches' embeddings are replaced by ``mask_token`` (1, 1, D)
        before their position embeddings are added (iBOT's and DINOv2's masked student)."""
        pe = self.patch_embedding
        t = pe.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, L, D)
        if mask is not None and mask_token is not None:
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (B, L, D)
        pos = pe.position_embeddings  # (1, L0, D)
        if t.shape[1] != pos.shape[1]:
            pos = interpolate_positions(pos, x.shape[2:], self.patch_size)
        return pe.dropout(t + pos)

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, *S) -> (B, 1 + L, D): the CLS token then the patch tokens, after the last norm.

        Args:
            keep: (B, K) indices of the patches to encode (MAE's visible patches, I-JEPA's
                context); the others never enter the transformer.
            mask, mask_token: (B, L) bool and (1, 1, D): patches seen as the mask token
                (:meth:`embed`).
        """
        t = self.embed(x, mask, mask_token)  # (B, L, D)
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, K, D)
        cls = self.cls_token.expand(t.shape[0], -1, -1)  # (B, 1, D)
        t = torch.cat([cls, t], dim=1)  # (B, 1 + L, D)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, D) image representation."""
        t = self.tokens(x)  # (B, 1 + L, D)
        return t[:, 1:].mean(1) if self.pool == "mean" else t[:, 0]

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention from the CLS token to every patch: (B, heads, L).

        DINO's self-attention maps (Caron et al. 2021, Fig. 1) are these, reshaped to the patch grid."""
        t = self.embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for block in self.blocks[:-1]:
            t = block(t)
        last = self.blocks[-1]
        attn = last.attn
        qkv = attn.input_rearrange(attn.qkv(last.norm1(t)))  # (3, B, heads, 1 + L, d)
        q, k = qkv[0], qkv[1]
        weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, heads, 1, 1 + L)
        return weights[:, :, 0, 1:]


def interpolate_positions(pos: torch.Tensor, spatial: tuple[int, ...] | torch.Size, patch_size: int) -> torch.Tensor:
    """Resize (1, L0, D) position embeddings of a square/cubic grid to the grid of ``spatial``."""
    d = len(spatial)
    g0 = round(pos.shape[1] ** (1 / d))
    grid = [s // patch_size for s in spatial]
    p = pos.reshape(1, *([g0] * d), -1).movedim(-1, 1)  # (1, D, g0, g0[, g0])
    mode = "bicubic" if d == 2 else "trilinear"
    p = torch.nn.functional.interpolate(p, size=grid, mode=mode, align_corners=False)
    return p.flatten(2).transpose(1, 2)  # (1, L, D)


def default_patch_size(img_size: int) -> int:
    """4 px up to 32 px images, 8 up to 64, else 16: 7-8 patches a side, 49-64 tokens."""
    return 4 if img_size <= 32 else 8 if img_size <= 64 else 16


# name -> (hidden size D, heads); MLP 4 D, depth 12 (Dosovitskiy et al. 2021, Table 1; DeiT's
# ViT-Ti and ViT-S, Touvron et al. 2021, Table 1).
VIT_PRESETS: dict[str, tuple[int, int]] = {"vit-tiny": (192, 3), "vit-small": (384, 6), "vit-base": (768, 12)}
VIT_ENCODERS = tuple(VIT_PRESETS)
# name -> (first-stage width, blocks per stage, block)
RESNET_PRESETS: dict[str, tuple[int, tuple[int, int, int, int], str]] = {
    "resnet18": (64, (2, 2, 2, 2), "basic"),
    "resnet18-half": (32, (2, 2, 2, 2), "basic"),
    "resnet18-quarter": (16, (2, 2, 2, 2), "basic"),  # 16-32-64-128: 3.3x faster than half width on a CPU
    "resnet50": (64, (3, 4, 6, 3), "bottleneck"),
}
ENCODERS = (*RESNET_PRESETS, *VIT_ENCODERS)


def build_encoder(name: str, in_channels: int, img_size: int, spatial_dims: int = 2,
                  patch_size: int | None = None, depth: int | None = None, pool: str = "cls",
                  stem: str | None = None) -> nn.Module:
    """An encoder by name (see :data:`ENCODERS`).

    Args:
        patch_size: ViT patch side; None: :func:`default_patch_size`.
        depth: ViT blocks; None: the preset's 12.
        pool: ViT read-out (see :class:`ViTEncoder`).
        stem: ResNet stem, ``cifar`` or ``imagenet``; None: :func:`default_stem` of ``img_size``.
    """
    if name in RESNET_PRESETS:
        width, layers, block = RESNET_PRESETS[name]
        stem = stem or default_stem(img_size)
        if block == "basic" and stem == "cifar":  # every run before the ImageNet stem existed
            return SmallImageResNet(in_channels, spatial_dims, width, layers)
        return ResNetEncoder(in_channels, spatial_dims, width, layers, block, stem)
    if name in VIT_PRESETS:
        dim, heads = VIT_PRESETS[name]
        return ViTEncoder(in_channels, img_size, patch_size or default_patch_size(img_size),
                          hidden_size=dim, depth=depth or 12, num_heads=heads, spatial_dims=spatial_dims,
                          pool=pool)
    raise ConfigError(f"backbone.name: unknown encoder '{name}' (known: {', '.join(ENCODERS)})")


def build_backbone(cfg: BackboneConfig, in_channels: int, img_size: int, spatial_dims: int) -> nn.Module:
    """The encoder a run's ``backbone`` config describes (name, patch size, depth, ViT read-out,
    ResNet stem)."""
    stem = cfg.stem  # None: by image size
    return build_encoder(cfg.name, in_channels, img_size, spatial_dims, cfg.patch_size, cfg.depth, cfg.pool, stem)
