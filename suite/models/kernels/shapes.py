"""The fused inner block's shapes, without triton: what ``inner_op`` decides with (does a shape
fit the kernel, how wide is the MLP) and what ``inner_triton`` launches with (its compile-time
constants and the parameter offsets, by name).

Shapes: S sequences (B*N patches) of P pixel tokens with C channels, NH heads of Dh = C / NH,
HID = MLP hidden width. In a program: BS sequences, padded to PP >= 16 pixels and CP >= 16
channels (powers of two, masked); the MLP runs in chunks of HB hidden channels.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_PADDED_DIM = 64  # the kernel's largest padded pixel count and inner dim: one tile each
HIDDEN_CHUNK = 32  # HB: MLP hidden channels per step


class Dims(NamedTuple):
    """The kernels' compile-time constants (their ``D``) for one shape."""

    P: int  # pixel tokens per sequence
    C: int  # channels (TNT's inner dim)
    HID: int  # MLP hidden width
    NH: int  # attention heads
    PP: int  # P padded to a power of two >= 16
    CP: int  # C padded likewise
    HB: int  # MLP hidden channels per step
    BS: int  # sequences per program
    EPS: float  # the LayerNorms' epsilon
    SCALE: float  # attention scale, Dh ** -0.5


class Offsets(NamedTuple):
    """Where each parameter tensor starts in the flat fp32 vector ``w`` (the kernels' ``O``),
    in the order ``inner_op.flat_params`` writes them, and its total length."""

    ln1_w: int
    ln1_b: int
    qkv_w: int  # (3C, C): q, k, v rows
    qkv_b: int  # (3C,), zeros where the block has no qkv bias
    proj_w: int
    proj_b: int
    ln2_w: int
    ln2_b: int
    fc1_w: int  # (HID, C)
    fc1_b: int
    fc2_w: int  # (C, HID)
    fc2_b: int
    total: int


def padded(n: int) -> int:
    """``n`` padded to a power of two, at least 16 (tl.dot's smallest tile side)."""
    return max(16, 1 << (n - 1).bit_length())


def shape_fits(num_pixels: int, inner_dim: int) -> bool:
    """Whether the kernel keeps this shape in one tile: both padded to <= 64."""
    return padded(num_pixels) <= MAX_PADDED_DIM and padded(inner_dim) <= MAX_PADDED_DIM


def param_offsets(c: int, hidden: int) -> Offsets:
    """The offsets in the flat parameter vector (a qkv bias slot always), then its length."""
    sizes = [c, c, 3 * c * c, 3 * c, c * c, c, c, c, hidden * c, hidden, c * hidden, c]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return Offsets(*offs)


def hidden_from_length(c: int, length: int) -> int:
    """HID from the flat vector's length: 4c^2 + 9c fixed, plus (2c + 1) per hidden channel."""
    return (length - 4 * c * c - 9 * c) // (2 * c + 1)


def dims(
    p: int, c: int, hidden: int, heads: int, eps: float, block_s: int | None, rows: int = 64
) -> Dims:
    """The kernels' constants for this shape; ``block_s`` sequences per program, or as many
    as fill ``rows``."""
    pp, cp = padded(p), padded(c)
    bs = block_s or max(1, rows // pp)
    return Dims(p, c, hidden, heads, pp, cp, HIDDEN_CHUNK, bs, eps, (c // heads) ** -0.5)
