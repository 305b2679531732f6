"""TNT's inner block as one custom op (``tntbench::inner_block``) backed by the Triton kernels,
and the ``inner_kernel`` switch that decides, per call, whether a Block runs through it.

The op is what torch.compile, autograd, autocast, DDP and the FLOP counters see:
``torch.library.custom_op`` with a fake (shape-only) implementation, so it traces without
running, an autograd formula whose backward is another custom op (the recomputing kernel), and
FLOP formulas counting exactly the multiply-adds of the PyTorch path. Autocast is handled in
``inner_forward``, outside the op: the input is cast to the autocast dtype there (weights stay
fp32 and are rounded to the matmul dtype inside the kernel, as autocast's linears do), so the
op itself sees plain dtypes.

Shapes: x (S, P, C): S sequences (B*N patches) of P pixels, C = inner dim; w the block's
parameters flat in fp32 (``kernels.shapes.param_offsets``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Sequence

import torch
from torch import nn

from suite.errors import UserError

from ..layers import Block, DropPath
from .shapes import MAX_PADDED_DIM, hidden_from_length, shape_fits

INNER_KERNELS = ("auto", "triton", "torch")
# auto picks the kernel on CUDA where it applies: on an H200 (benchmarks/gpu_check.sh,
# reports/gpu/nvidia-h200) TNT-S bf16 training ran 3,296 img/s with it against 2,954 for the
# compiled PyTorch path (2,508 against 1,481 eager), the inner block alone 4.4x faster
AUTO_PICKS_TRITON = True
# GPUs auto trusts the kernel on: bf16 tensor cores (Ampere, sm_80) and newer; it was measured
# on Hopper (sm_90) only, and "triton" still forces it anywhere Triton compiles
AUTO_MIN_CAPABILITY = (8, 0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MODULE = "suite.models.kernels.inner_triton"
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _kernels():
    """The Triton module, imported on first use (so CPU runs never import triton)."""
    from . import inner_triton

    return inner_triton


def check_inner_kernel(value: str, num_pixels: int, inner_dim: int) -> None:
    """A ValueError naming ``model.inner_kernel`` for an unknown setting, or for "triton" with
    a shape the kernel declines."""
    if value not in INNER_KERNELS:
        raise ValueError(
            f"model.inner_kernel = {value!r}: must be one of {', '.join(INNER_KERNELS)}"
        )
    if value == "triton" and not shape_fits(num_pixels, inner_dim):
        raise ValueError(
            f"model.inner_kernel = 'triton': {num_pixels} pixels x inner_dim {inner_dim} do not "
            f"fit the kernel (each padded to a power of two must be <= {MAX_PADDED_DIM}); "
            "use 'torch' or 'auto'"
        )


def interpreted() -> bool:
    """Whether the kernels run (or will run) under Triton's CPU interpreter: TRITON_INTERPRET=1
    is read when ``@triton.jit`` decorates them, so an imported module has decided already."""
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is not None:
        return type(mod.inner_fwd_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _stochastic(block: Block) -> bool:
    """Dropout or stochastic depth in this block that would act in training."""
    drops = (m.p for m in block.modules() if isinstance(m, DropPath | nn.Dropout))
    return block.attn.attn_drop > 0 or any(p > 0 for p in drops)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def use_triton(setting: str, block: Block, x: torch.Tensor) -> bool:
    """Whether this call of ``block`` on ``x`` (S, P, C) goes to the Triton op.

    "torch": never. "auto": with ``AUTO_PICKS_TRITON``, on CUDA GPUs of compute capability
    ``AUTO_MIN_CAPABILITY`` or more with triton installed (PyTorch otherwise, silently).
    "triton": wherever it can run (CUDA; CPU under TRITON_INTERPRET=1; meta/fake tensors,
    which only trace shapes), else a UserError. In every case the kernel declines, and PyTorch
    runs, where dropout or stochastic depth would act (training) or the dtype is not
    fp32/bf16/fp16."""
    if setting == "torch" or (setting == "auto" and not AUTO_PICKS_TRITON):
        return False
    dev = x.device.type
    if setting == "auto" and (
        dev != "cuda"
        or not _TRITON_INSTALLED
        or torch.cuda.get_device_capability(x.device) < AUTO_MIN_CAPABILITY
    ):
        return False
    runs_here = dev in ("cuda", "meta") or (dev == "cpu" and interpreted())
    if setting == "triton" and not runs_here:
        raise UserError(
            f"model.inner_kernel = 'triton' runs on CUDA ({dev} here; on CPU only under "
            "TRITON_INTERPRET=1, for tests): use 'auto' or 'torch'"
        )
    if dev != "meta" and not _TRITON_INSTALLED:
        raise UserError("model.inner_kernel = 'triton': the triton package is not installed")
    if (block.training and _stochastic(block)) or _compute_dtype(x) not in DTYPES:
        return False
    return shape_fits(int(x.shape[1]), int(x.shape[2]))  # ints also under jit.trace


def flat_params(block: Block) -> torch.Tensor:
    """The block's 12 parameter tensors flat in fp32, in ``shapes.Offsets`` order (a zero qkv
    bias where the block has none, as TNT's blocks do)."""
    a, m = block.attn, block.mlp
    qkv_bias = a.qkv.bias if a.qkv.bias is not None else a.qkv.weight.new_zeros(a.qkv.out_features)
    parts = (
        block.norm1.weight,
        block.norm1.bias,
        a.qkv.weight,
        qkv_bias,
        a.proj.weight,
        a.proj.bias,
        block.norm2.weight,
        block.norm2.bias,
        m.fc1.weight,
        m.fc1.bias,
        m.fc2.weight,
        m.fc2.bias,
    )
    return torch.cat([p.reshape(-1).float() for p in parts])


def inner_forward(block: Block, x: torch.Tensor, setting: str) -> torch.Tensor:
    """``block(x)`` for pixel tokens x (S, P, C), through the Triton op where ``setting``
    (``model.inner_kernel``) and this call allow it (``use_triton``)."""
    if not use_triton(setting, block, x):
        return block(x)
    if not torch.compiler.is_compiling() and "torch.utils.flop_counter" in sys.modules:
        register_flop_formulas()  # a FlopCounterMode may be counting
    x = x.to(_compute_dtype(x)).contiguous()  # the autocast dtype, if any, is the kernel's
    eps = block.norm1.eps
    return inner_block(x, flat_params(block), block.attn.num_heads, eps)


# ---------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("tntbench::inner_block", mutates_args=())
def inner_block(
    x: torch.Tensor, w: torch.Tensor, heads: int, eps: float, block_s: int = 0
) -> torch.Tensor:
    """Pre-norm block x + Attn(LN1(x)), then + MLP(LN2(.)), on x (S, P, C); w flat fp32;
    ``block_s`` sequences per program (0: the kernel's choice)."""
    return _kernels().forward(x, w, heads, eps, block_s or None)


@inner_block.register_fake
def _(x: torch.Tensor, w: torch.Tensor, heads: int, eps: float, block_s: int = 0) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("tntbench::inner_block_backward", mutates_args=())
def inner_block_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, heads: int, eps: float, block_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (S, P, C) in x's dtype, dw fp32 like w): the forward recomputed in the kernel."""
    grad = grad.to(x.dtype).contiguous()
    return _kernels().backward(grad, x, w, heads, eps, block_s or None)


@inner_block_backward.register_fake
def _(grad, x, w, heads, eps, block_s):
    return torch.empty_like(x), torch.empty_like(w, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, w, ctx.heads, ctx.eps, ctx.block_s = inputs
    ctx.save_for_backward(x, w)  # only the input: the backward recomputes the rest


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    dx, dw = inner_block_backward(grad, x, w, ctx.heads, ctx.eps, ctx.block_s)
    return dx, dw.to(w.dtype), None, None, None


inner_block.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOPs: the PyTorch path's multiply-adds (linears and the two attention matmuls)


def inner_block_macs(x_shape: Sequence[int], w_len: int) -> int:
    """Multiply-adds of the inner block's forward on x (S, P, C) with w_len parameters (flat):
    qkv C->3C, proj C->C, fc1 C->HID, fc2 HID->C per token, and q k^T, attn v per sequence
    (2 P^2 C over all heads). Norms, softmax, GELU and biases are not multiply-adds."""
    s, p, c = x_shape
    hidden = hidden_from_length(c, w_len)
    return s * p * (4 * c * c + 2 * c * hidden) + 2 * s * p * p * c


def _inner_block_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * inner_block_macs(x_shape, math.prod(w_shape))  # FlopCounterMode: 2 per MAC


def _inner_block_bwd_flops(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # each forward matmul has two in the backward (input and weight grads), as autograd's
    return 4 * inner_block_macs(x_shape, math.prod(w_shape))


_flops_registered = False


def register_flop_formulas() -> None:
    """Teach ``torch.utils.flop_counter`` the two ops (idempotent). Not done at import:
    importing flop_counter imports triton, which must first see TRITON_INTERPRET (tests)
    and which CPU runs never need; ``inner_forward`` calls this once FlopCounterMode has been
    imported, ``suite.profile`` before it counts."""
    global _flops_registered
    if _flops_registered:
        return
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.tntbench.inner_block)(_inner_block_flops)
    register_flop_formula(torch.ops.tntbench.inner_block_backward)(_inner_block_bwd_flops)
    _flops_registered = True
