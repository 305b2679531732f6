"""The models' architecture knobs, one frozen dataclass per family (as nanoGPT's GPTConfig).

A registry entry is one of these (``registry.py``), ``create_model(name, **overrides)`` is
``dataclasses.replace`` on it, and a model is built from one: ``TNT(TNTConfig(...))``. The
field names are the knobs a run config's ``[model]`` may set; their defaults are ViT-B/16 and
TNT-S, at 224px, for ImageNet's 1000 classes. No torch here: only values and the shapes they
imply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerConfig:
    """What ViT, DeiT and TNT share: the image cut into patches, the transformer over the patch
    tokens (TNT's outer one), the classifier head and the regularisation."""

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns its class token's features
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth of the last block (0 at the first)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ViTConfig(TransformerConfig):
    """ViT (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021)."""

    distilled: bool = False  # DeiT's distillation token and second head
    pos_embed: bool = True


@dataclass(frozen=True)
class TNTConfig(TransformerConfig):
    """TNT (Han et al. 2021): the outer transformer's knobs (TNT-S's widths, no qkv bias, as the
    official code) and the inner one's, over the pixels of each patch."""

    embed_dim: int = 384
    num_heads: int = 6
    qkv_bias: bool = False
    pixel_size: int = 4  # each patch is (patch_size / pixel_size)^2 pixel tokens
    inner_dim: int = 24
    inner_heads: int = 4
    inner_mlp_ratio: float = 4.0
    patch_pos_embed: bool = True
    pixel_pos_embed: bool = True
    # "auto" | "triton" | "torch": whether the inner blocks run as the fused Triton kernel
    # (suite.models.kernels.inner_op.use_triton decides per call)
    inner_kernel: str = "auto"

    @property
    def num_pixels(self) -> int:
        return (self.patch_size // self.pixel_size) ** 2


ModelConfig = ViTConfig | TNTConfig
