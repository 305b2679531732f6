"""ViT (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021), with DeiT's distillation token.

Tokens: [cls, (dist), patch_1 .. patch_N], shape (B, 1 + distilled + N, D).
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import ViTConfig
from .layers import (
    PatchEmbed,
    check_divisible,
    classifier,
    drop_path_rates,
    init_weights,
    patch_block,
)


class VisionTransformer(nn.Module):
    """ViT/DeiT from a ``ViTConfig``: patch embedding, ``depth`` blocks, class-token head (and
    DeiT's distillation head)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        check_divisible("embed_dim", config.embed_dim, "num_heads", config.num_heads)
        self.config = config
        d = config.embed_dim
        self.embed_dim, self.num_classes = d, config.num_classes
        self.distilled = config.distilled
        self.num_prefix = 2 if config.distilled else 1
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, d)
        tokens = self.num_prefix + self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if config.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d)) if config.pos_embed else None
        self.pos_drop = nn.Dropout(config.drop_rate) if config.drop_rate > 0 else nn.Identity()
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(patch_block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = classifier(d, config.num_classes)
        self.head_dist = classifier(d, config.num_classes) if config.distilled else None
        self.apply(init_weights)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (DeiT, timm)."""
        return {"cls_token", "dist_token", "pos_embed"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, prefix + N, D), positions added: the first block's input."""
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normed tokens (B, prefix + N, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> dict[int, torch.Tensor]:
        """The tokens entering each block in ``indices`` (0-based; ``depth`` is the last
        block's output, before the final norm), as forward_features computes them."""
        x = self.embed(x)
        out = {0: x} if 0 in indices else {}
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in indices:
                out[i] = x
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(x[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            # both heads for the distillation loss (class head vs label, dist head vs teacher)
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))
