"""Transformer iN Transformer (Han et al. 2021, arXiv 2103.00112), as its official code defines it.

Shapes: B batch, N = (img/patch)^2 patches, P = (patch/pixel)^2 pixels per patch,
c inner dim, D outer dim. Pixel tokens live as (B*N, P, c): every patch is one short
sequence for the inner transformer; patch tokens as (B, 1 + N, D) with the class token first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TNTConfig
from .fastpath import Linear
from .kernels.inner_op import check_inner_kernel, inner_forward
from .layers import (
    Block,
    check_divisible,
    check_input,
    classifier,
    drop_path_rates,
    init_weights,
    patch_block,
)

LN_EPS = 1e-5  # the official code and timm's TNT use nn.LayerNorm's default


class PixelEmbed(nn.Module):
    """Image (B, C, H, W) -> pixel tokens (B*N, P, c).

    Each patch is cut out and convolved on its own (kernel 7, padding 3, stride = pixel size),
    so the zero padding stops at the patch border exactly as in the official code.
    """

    def __init__(self, config: TNTConfig) -> None:
        super().__init__()
        check_divisible("img_size", config.img_size, "patch_size", config.patch_size)
        check_divisible("patch_size", config.patch_size, "pixel_size", config.pixel_size)
        self.img_size = config.img_size
        self.patch_size = config.patch_size
        self.grid = config.img_size // config.patch_size
        self.num_patches = config.num_patches
        self.pixel_grid = config.patch_size // config.pixel_size
        self.num_pixels = config.num_pixels
        self.proj = nn.Conv2d(
            config.in_chans, config.inner_dim, kernel_size=7, padding=3, stride=config.pixel_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.img_size)
        B, C = x.shape[:2]
        g, p = self.grid, self.patch_size
        # (B, C, g, p, g, p) -> (B, g, g, C, p, p) -> (B*N, C, p, p), patches in row-major order
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C, p, p)
        x = self.proj(x)  # (B*N, c, p/s, p/s)
        return x.flatten(2).transpose(1, 2)  # (B*N, P, c)


class TNTBlock(nn.Module):
    """Inner block on pixels, pixel->patch projection added to patch tokens, outer block."""

    def __init__(self, config: TNTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        c, d = config.inner_dim, config.embed_dim
        pixels_dim = config.num_pixels * c
        self.inner = Block(
            c,
            config.inner_heads,
            mlp_ratio=config.inner_mlp_ratio,
            qkv_bias=config.qkv_bias,
            drop=config.drop_rate,
            attn_drop=config.attn_drop_rate,
            drop_path=drop_path,
            eps=LN_EPS,
        )
        # whether self.inner runs as the fused Triton kernel: see TNTConfig.inner_kernel
        self.inner_kernel = config.inner_kernel
        # LN(P*c) -> Linear(P*c -> D, no bias) -> LN(D), added to the patch tokens without DropPath
        self.proj_norm1 = nn.LayerNorm(pixels_dim, eps=LN_EPS)
        self.proj = Linear(pixels_dim, d, bias=False)
        self.proj_norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.outer = patch_block(config, drop_path, eps=LN_EPS)

    def forward(
        self, pixel: torch.Tensor, patch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixel = inner_forward(self.inner, pixel, self.inner_kernel)  # (B*N, P, c)
        B, N1, _ = patch.shape
        # (B*N, P, c) -> (B, N, P*c): a view, each patch's pixels flattened pixel-major
        delta = self.proj_norm2(self.proj(self.proj_norm1(pixel.reshape(B, N1 - 1, -1))))
        # class token untouched: delta padded with one zero row (cheaper backward than a cat)
        patch = patch + F.pad(delta, (0, 0, 1, 0))
        return pixel, self.outer(patch)


class TNT(nn.Module):
    """TNT from a ``TNTConfig``: pixel embedding, the patch tokens made from it, ``depth`` TNT
    blocks, class-token head."""

    def __init__(self, config: TNTConfig) -> None:
        super().__init__()
        check_divisible("embed_dim", config.embed_dim, "num_heads", config.num_heads)
        check_divisible("inner_dim", config.inner_dim, "inner_heads", config.inner_heads)
        self.config = config
        c, d = config.inner_dim, config.embed_dim
        self.inner_dim, self.embed_dim, self.num_classes = c, d, config.num_classes
        self.distilled = False
        self.pixel_embed = PixelEmbed(config)
        N, P = config.num_patches, config.num_pixels
        self.num_patches, self.num_pixels = N, P
        check_inner_kernel(config.inner_kernel, P, c)
        # one (P, c) pixel position table shared by every patch
        self.pixel_pos = nn.Parameter(torch.zeros(1, P, c)) if config.pixel_pos_embed else None
        # initial patch tokens from their pixels: LN(P*c) -> Linear -> LN(D)
        self.norm1_proj = nn.LayerNorm(P * c, eps=LN_EPS)
        self.proj = nn.Linear(P * c, d)
        self.norm2_proj = nn.LayerNorm(d, eps=LN_EPS)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_pos = nn.Parameter(torch.zeros(1, N + 1, d)) if config.patch_pos_embed else None
        self.pos_drop = nn.Dropout(config.drop_rate) if config.drop_rate > 0 else nn.Identity()
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(TNTBlock(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = classifier(d, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        self.apply(init_weights)
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (DeiT, timm)."""
        return {"cls_token", "patch_pos", "pixel_pos"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (pixel tokens (B*N, P, c), patch tokens (B, 1 + N, D)), positions
        added: what enters the first block."""
        B = x.shape[0]
        pixel = self.pixel_embed(x)  # (B*N, P, c)
        if self.pixel_pos is not None:
            pixel = pixel + self.pixel_pos
        patch = self.norm2_proj(self.proj(self.norm1_proj(pixel.reshape(B, self.num_patches, -1))))
        patch = torch.cat([self.cls_token.expand(B, -1, -1), patch], dim=1)  # (B, 1 + N, D)
        if self.patch_pos is not None:
            patch = patch + self.patch_pos
        return pixel, self.pos_drop(patch)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normed patch tokens (B, 1 + N, D)."""
        pixel, patch = self.embed(x)
        for blk in self.blocks:
            pixel, patch = blk(pixel, patch)
        return self.norm(patch)

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The (pixel, patch) tokens entering each block in ``indices`` (0-based; ``depth`` is
        the last block's output, before the final norm), as forward_features computes them."""
        pixel, patch = self.embed(x)
        out = {0: (pixel, patch)} if 0 in indices else {}
        for i, blk in enumerate(self.blocks, start=1):
            pixel, patch = blk(pixel, patch)
            if i in indices:
                out[i] = (pixel, patch)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
