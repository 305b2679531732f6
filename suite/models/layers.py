"""The one set of transformer layers that ViT, DeiT and TNT are all built from.

Shapes: B batch, N tokens, D channels, H heads, Dh = D // H head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TransformerConfig
from .fastpath import SDPA_MIN_TOKENS, Linear, sdpa, use_sdpa


def check_divisible(name_a: str, a: int, name_b: str, b: int) -> None:
    """Raise a ValueError naming both values when ``b`` does not divide ``a``."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{name_a}={a} is not divisible by {name_b}={b}")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (scaled to keep the mean)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # (B, 1, 1, ...) mask: one coin per sample, broadcast over tokens and channels
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    ``fused=True`` runs ``F.scaled_dot_product_attention``; ``fused=False`` writes the same
    computation out (softmax(q k^T / sqrt(Dh)) v), which the tests compare against.
    ``fused=None`` (default) picks per call by the measured rule in ``fastpath.use_sdpa``
    (device, sequence length, head dim). Under CPU bf16 the written-out softmax runs in fp32
    for short rows (see forward).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        check_divisible("dim", dim, "num_heads", num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused: bool | None = None
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, H, N, Dh): q, k, v each (B, H, N, Dh)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        fused = self.fused
        if fused is None:
            cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            fused = use_sdpa(x.device.type, N, self.head_dim, cpu_autocast)
        if fused:
            x = sdpa(q, k, v, dropout_p=drop)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn.dtype == torch.bfloat16 and x.device.type == "cpu" and N < SDPA_MIN_TOKENS:
                # PyTorch's CPU bf16 softmax (fwd+bwd) measured 3x slower than an fp32 softmax
                # plus the two casts for rows of 16 (TNT-S train step 4.7% faster in bf16), 2x
                # faster for rows of 197; the result is the fp32 softmax rounded to bf16
                attn = attn.float().softmax(dim=-1).to(attn.dtype)
            else:
                attn = attn.softmax(dim=-1)
            if drop > 0:
                attn = F.dropout(attn, p=drop)
            x = attn @ v  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def patch_block(config: TransformerConfig, drop_path: float, eps: float = 1e-6) -> Block:
    """The block over patch tokens that ``config`` describes: ViT's, and TNT's outer one."""
    return Block(
        config.embed_dim,
        config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop=config.drop_rate,
        attn_drop=config.attn_drop_rate,
        drop_path=drop_path,
        eps=eps,
    )


def classifier(dim: int, num_classes: int) -> nn.Module:
    """The linear head on a class token; no head (identity) for ``num_classes`` 0."""
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) by a stride-``patch_size`` convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        check_divisible("img_size", img_size, "patch_size", patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, N, D)


def check_input(x: torch.Tensor, img_size: int) -> None:
    if x.ndim != 4 or x.shape[-2:] != (img_size, img_size):
        raise ValueError(
            f"input shape {tuple(x.shape)} does not match the model's img_size={img_size}"
        )


def compile_blocks(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Regional ``torch.compile``: each of ``model.blocks`` compiled in place.

    The blocks are identical modules, so dynamo traces one and reuses it for the rest: compile
    time is about one block's rather than the whole model's, and the state dict keeps its
    names (no ``_orig_mod.``). ``kwargs`` go to ``torch.compile`` (e.g. ``mode=
    "reduce-overhead"`` for CUDA graphs). Measured on 2 CPU cores, TNT-S training: 1.07x over
    eager in bf16, none in fp32, 10-16 s to compile (reports/cpu/); the embeddings and head
    stay eager (a few % of the time).
    """
    for blk in model.blocks:
        blk.compile(**kwargs)
    return model


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (DeiT, TNT)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def init_weights(module: nn.Module) -> None:
    """trunc-normal(0.02) for linear weights, zero biases, unit LayerNorms (DeiT, TNT)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
