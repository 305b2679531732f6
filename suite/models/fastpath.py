"""Fast paths chosen by measurement: which attention kernel, and oneDNN's fp32 CPU linear.

Every rule here is a measured choice, never a change in what is computed: the written-out
attention and ``F.scaled_dot_product_attention`` give the same result (tests/test_models.py),
and so do ``Linear`` and ``nn.Linear``. The figures behind each rule are in the docstrings, with
where and when they were measured (the CPU ones also in ``reports/cpu/README.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many tokens a sequence is "short": the written-out attention wins on CPU (fp32)
# and on CUDA. On CPU, fp32, flash attention measured 8% faster at 197 tokens (DeiT-S, TNT-S's
# outer) and 1.3x slower at TNT's 16 pixel tokens; on an H100 the written-out form of TNT-S's
# inner attention (16 tokens) was 3.1x faster than the flash kernel.
SDPA_MIN_TOKENS = 64


def use_sdpa(device_type: str, seq_len: int, head_dim: int, cpu_autocast: bool = False) -> bool:
    """Whether attention over ``seq_len`` tokens of ``head_dim`` channels should go to
    ``F.scaled_dot_product_attention`` (True) or be written out (False).

    CUDA (bf16; one H100 80GB, torch 2.11.0+cu130, measured 2026-11-26 at 80cdbbb): only the
    flash kernel accepts a head dim that is not a multiple of 8 (memory-efficient and cuDNN
    refuse it), and for TNT-S's inner attention (head dim 6, 16 tokens, B x 196 sequences) it
    was 3.1x slower than the written-out form (fwd+bwd 8.06 vs 2.59 ms for 65,535 sequences):
    our TNT-S trained at 744 img/s with SDPA inside, 1,370 written out (timm: 1,081). SDPA wins
    where the fused kernels are at home: the outer attention (197 tokens, head dim 64), where
    our DeiT-S with SDPA matched timm's fused attention (4,771 vs 4,671 img/s). So on CUDA: SDPA
    only for head dims that are multiples of 8 and sequences of at least ``SDPA_MIN_TOKENS``.

    CPU (2-core AMD EPYC, ``reports/cpu/README.md``): under bf16 autocast PyTorch's CPU flash
    kernel measured about twice as slow as the written-out form (TNT-S train step 1.66 vs
    1.39 s at batch 8), so never there; in fp32 flash pays off from ``SDPA_MIN_TOKENS`` (TNT-S
    block fwd+bwd at batch 16: 41 ms written out vs 53 ms flash for the 16-token inner
    attention; the 197-token outer attention 8% faster with flash).

    Other devices (MPS, XPU, ...): SDPA, PyTorch's own dispatch.
    """
    if device_type == "cuda":
        return head_dim % 8 == 0 and seq_len >= SDPA_MIN_TOKENS
    if device_type == "cpu":
        return not cpu_autocast and seq_len >= SDPA_MIN_TOKENS
    return True


# oneDNN's linear, as torch.compile's CPU backend uses it; absent in builds without mkldnn.
# Both are private PyTorch APIs: where either is missing, Linear is plain nn.Linear.
try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover
    _get_current_dispatch_mode = None
_DNNL_LINEAR = (
    _get_current_dispatch_mode is not None
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


class _DnnlLinearFn(torch.autograd.Function):
    """fp32 CPU linear through oneDNN for y = x W^T + b and dx = dy W.

    oneDNN measured 10-30% faster than MKL's sgemm (F.linear's CPU path) for these shapes on
    an AVX-512 AMD EPYC; dW = dy^T x stays on MKL, which was faster there. Whole fp32 train
    step: TNT-S 3.4%, DeiT-S 6% (benchmarks/bench_tnt_speed.py). No double backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.mkldnn._linear_pointwise(g, weight.t(), None, "none", [], "")
            gx = gx.view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear (same parameters) that runs fp32 CPU matmuls through oneDNN, see _DnnlLinearFn.

    Everything else (autocast, CUDA, torch.compile, ``dnnl = False``) is plain F.linear, and
    so is any call under ``torch.jit.trace`` or a dispatch mode, so FLOP counters (fvcore,
    torch.utils.flop_counter) see the aten matmuls they know.
    """

    dnnl = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.dnnl
            and _DNNL_LINEAR
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and _get_current_dispatch_mode() is None
        ):
            return _DnnlLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# CUDA's flash and memory-efficient SDPA kernels put the batch in a grid dimension capped at
# 65,535 blocks; TNT's inner attention has B x 196 sequences (B >= 335 overflows), so chunk.
SDPA_MAX_BATCH = 65535


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention on (B, H, N, Dh), in batch chunks of at most
    ``max_batch`` (default: ``SDPA_MAX_BATCH`` on CUDA, no chunks elsewhere)."""
    if max_batch is None:
        max_batch = SDPA_MAX_BATCH if q.device.type == "cuda" else q.shape[0]
    if q.shape[0] <= max_batch:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    parts = zip(q.split(max_batch), k.split(max_batch), v.split(max_batch), strict=True)
    outs = [F.scaled_dot_product_attention(a, b, c, dropout_p=dropout_p) for a, b, c in parts]
    return torch.cat(outs)
