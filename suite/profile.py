"""Params, GMACs (fvcore, cross-checked by PyTorch), throughput, latency, peak memory and MFU.

Units: "GMACs" is 1e9 fused multiply-adds, the papers' "FLOPs" column and fvcore's unit.
PyTorch's FlopCounterMode counts 2 per multiply-add; we halve it. Elementwise ops (norms,
softmax, GELU, additions) are not multiply-adds and neither counter includes them.

Timing (``suite.timing``) follows timm's benchmark.py, and ``suite.noise`` watches each timed
window: a figure measured while other processes took the cores is timed again, and reported
noisy (``211*`` in the table, the ``timing_noisy`` tag on a logged run) if it stays disturbed.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from suite.errors import UserError
from suite.models import create_model, get_entry, model_img_size
from suite.models.kernels import inner_block_macs, register_flop_formulas
from suite.runtime import (
    DTYPES,
    check_precision,
    count_params,
    resolve_device,
)

# peak_memory_mb and time_model are imported from here by fit and the matrix: re-exported
from suite.timing import Timing, TimingOptions, sync, time_model
from suite.timing import peak_memory_mb as peak_memory_mb
from suite.timing import reset_peak_memory as reset_peak_memory

# ---------------------------------------------------------------------------------------------
# FLOPs


def _shape(v: Any) -> list[int] | None:
    t = v.type()
    return list(t.sizes()) if hasattr(t, "sizes") and t.sizes() is not None else None


def _sdpa_macs_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: q k^T and attn v, in MACs.

    q (B, H, N, Dh), k (B, H, S, Dh), v (B, H, S, Dv); softmax ignored like other elementwise ops.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    *batch, n, dh = q
    s, dv = k[-2], v[-1]
    return math.prod(batch) * n * s * (dh + dv)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FlopCounterMode formula (2 per MAC) for the CPU flash kernel, which PyTorch leaves out."""
    *batch, n, dh = query_shape
    return 2 * math.prod(batch) * n * key_shape[-2] * (dh + value_shape[-1])


def _inner_block_macs_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for TNT's fused inner block (``tntbench::inner_block``): the MACs of the
    PyTorch inner Block it replaces, from x (S, P, C) and the flat parameter vector."""
    return inner_block_macs(_shape(inputs[0]), math.prod(_shape(inputs[1])))


def _zero(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


# ops that carry multiply-adds: if one of these is ever unsupported, the count is wrong
MAC_OPS = {
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::einsum",
    "aten::_convolution",
    "aten::conv2d",
    "aten::scaled_dot_product_attention",
    "tntbench::inner_block",
}


@dataclass
class FlopCount:
    gmacs_fvcore: float
    gmacs_torch: float
    unsupported: dict[str, int] = field(default_factory=dict)


def count_flops(model: nn.Module, img_size: int, in_chans: int = 3) -> FlopCount:
    """GMACs of one image's forward pass, by fvcore (with an SDPA handle) and by PyTorch."""
    with warnings.catch_warnings():  # fvcore's focal loss is torch.jit.script-ed at import
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()  # TNT's fused inner block, where inner_kernel picks it
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    try:
        fca = FlopCountAnalysis(model, x)
        fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs_jit)
        fca.set_op_handle("tntbench::inner_block", _inner_block_macs_jit)
        # norms are elementwise, not multiply-adds: drop fvcore's rough 5/element estimate so
        # both counters measure the same thing (it is <0.5% of TNT-S/DeiT-S either way).
        # A zero handle, since fvcore 0.1.5's set_op_handle(name, None) keeps the default one.
        fca.set_op_handle("aten::layer_norm", _zero)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        fv = fca.total() / 1e9
        unsupported = dict(fca.unsupported_ops())
        aten = torch.ops.aten
        cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
            model(x)
        tc = fc.get_total_flops() / 2e9
    finally:
        model.train(was_training)
    return FlopCount(fv, tc, unsupported)


# ---------------------------------------------------------------------------------------------
# Timing, memory, peak FLOP/s

# spec-sheet dense tensor-core peaks (TFLOP/s) for bf16/fp16, by device-name substring
SPEC_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]


def matmul_peak_tflops(device: torch.device, dtype: str, seconds: float = 0.5) -> float:
    """Peak FLOP/s of this device and dtype, measured by a large matmul (best of repeats)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    best = math.inf
    a @ b
    sync(device)
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e12


def spec_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in SPEC_TFLOPS if k in name), None)


# ---------------------------------------------------------------------------------------------
# One profile row per model


@dataclass
class ProfileRow:
    model: str
    params_m: float
    trainable_params_m: float
    gmacs_fvcore: float
    gmacs_torch: float
    img_per_s: float
    step_ms: float
    p90_ms: float
    peak_mb: float
    mfu: float
    img_size: int
    batch_size: int
    mode: str
    dtype: str
    device: str
    device_name: str
    compile: str  # whole, regional or eager (as run: a failed compile falls back to eager)
    compile_s: float
    compile_fallback: str
    peak_tflops_measured: float
    mfu_spec: float | None
    unsupported_ops: dict[str, int]
    p10_ms: float = 0.0
    repeat: int = 1  # independent timed windows; img/s is the median of theirs
    img_per_s_min: float = 0.0  # the spread across repeats
    img_per_s_max: float = 0.0
    timings: list[dict[str, Any]] = field(default_factory=list)  # each repeat's figures
    conditions: dict[str, float] = field(default_factory=dict)  # suite.noise's metric names
    timing_noisy: bool = False
    timing_noisy_reason: str = ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class ProfileOptions:
    """How ``profile_model`` measures each model: ``tntbench profile``'s options. ``None``
    means the model's input size, or the device's default batch size, warm-up and steps."""

    img_size: int | None = None
    batch_size: int | None = None  # 256 on CUDA, 16 (>= 128 px) or 64 on CPU
    mode: str = "infer"  # infer or train (suite.timing.TimingOptions)
    dtype: str = "fp32"
    compile: bool | str = False
    warmup: int | None = None  # 10 on CUDA, 3 on CPU
    steps: int | None = None  # 40 on CUDA, 10 on CPU
    repeat: int = 1

    def check(self) -> None:
        """A UserError naming the option that is out of range."""
        for key in ("batch_size", "img_size", "steps", "repeat"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if self.warmup is not None and self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")

    def batch(self, device: torch.device, img_size: int) -> int:
        if self.batch_size:
            return self.batch_size
        return 256 if device.type == "cuda" else 16 if img_size >= 128 else 64

    def timing(self, device: torch.device) -> TimingOptions:
        cuda = device.type == "cuda"
        return TimingOptions(
            mode=self.mode,
            dtype=self.dtype,
            warmup=self.warmup if self.warmup is not None else (10 if cuda else 3),
            steps=self.steps if self.steps is not None else (40 if cuda else 10),
            compile=self.compile,
            repeat=self.repeat,
        )


def profile_model(
    name: str,
    opts: ProfileOptions | None = None,
    *,
    device: str | torch.device = "auto",
    peak_tflops: float | None = None,
    **overrides: Any,
) -> ProfileRow:
    """One model's row; ``overrides`` go to its constructor, ``peak_tflops`` (default:
    measured) is what MFU divides by."""
    opts = opts or ProfileOptions()
    dev = device if isinstance(device, torch.device) else resolve_device(device, key="--device")
    check_precision(opts.dtype, dev, "--dtype")
    model, size = _build(name, opts.img_size, overrides)
    total, trainable = count_params(model)
    flops = count_flops(model, size)
    bs = opts.batch(dev, size)
    t = time_model(model, size, bs, opts.timing(dev), device=dev, num_classes=model.num_classes)
    peak = peak_tflops or matmul_peak_tflops(dev, opts.dtype)
    # model FLOPs: forward = 2 x MACs per image, training = 3 x forward
    achieved = (6 if opts.mode == "train" else 2) * flops.gmacs_fvcore * 1e9 * t.img_per_s / 1e12
    spec = spec_tflops(dev, opts.dtype)
    return ProfileRow(
        model=name,
        params_m=total / 1e6,
        trainable_params_m=trainable / 1e6,
        gmacs_fvcore=flops.gmacs_fvcore,
        gmacs_torch=flops.gmacs_torch,
        img_per_s=t.img_per_s,
        step_ms=t.step_ms,
        p90_ms=t.p90_ms,
        peak_mb=t.peak_mb,
        mfu=achieved / peak,
        img_size=size,
        batch_size=bs,
        mode=opts.mode,
        dtype=opts.dtype,
        device=dev.type,
        device_name=device_name(dev),
        compile=t.compile,
        compile_s=t.compile_s,
        compile_fallback=t.compile_fallback,
        peak_tflops_measured=peak,
        mfu_spec=achieved / spec if spec else None,
        unsupported_ops=flops.unsupported,
        **_noise_fields(t),
    )


def _noise_fields(t: Timing) -> dict[str, Any]:
    """The row's timing conditions: the spread across repeats, and whether it is noisy."""
    rates = [r["img_per_s"] for r in t.repeats]
    return {
        "p10_ms": t.p10_ms,
        "repeat": len(t.repeats),
        "img_per_s_min": min(rates),
        "img_per_s_max": max(rates),
        "timings": t.repeats,
        "conditions": t.conditions,
        "timing_noisy": bool(t.noisy_reason),
        "timing_noisy_reason": t.noisy_reason,
    }


def _build(name: str, img_size: int | None, overrides: dict[str, Any]) -> tuple[nn.Module, int]:
    """The registered model with its overrides, and its input size."""
    if img_size is not None:
        overrides = {**overrides, "img_size": img_size}
    try:
        model = create_model(name, **overrides)
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None
    return model, model_img_size(name, overrides)


TABLE_COLUMNS = {
    "model": "model",
    "params_m": "params M",
    "gmacs_fvcore": "GMACs fvcore",
    "gmacs_torch": "GMACs torch",
    "img_per_s": "img/s",
    "step_ms": "step ms",
    "peak_mb": "peak MB",
    "mfu": "MFU",
}


def format_table(rows: list[ProfileRow]) -> str:
    """The console table; a figure measured in disturbed conditions reads ``211*``, with a
    footnote saying why (``suite.noise``), so a wrong number never looks like a right one."""
    import pandas as pd

    df = pd.DataFrame([asdict(r) for r in rows])[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    df["img/s"] = [f"{r.img_per_s:.1f}{'*' if r.timing_noisy else ''}" for r in rows]
    if any(r.repeat > 1 for r in rows):
        spread = [f"{r.img_per_s_min:.1f}-{r.img_per_s_max:.1f}" for r in rows]
        df.insert(df.columns.get_loc("img/s") + 1, "img/s min-max", spread)
    r0 = rows[0]
    head = (
        f"{r0.mode} | {r0.dtype} | batch {r0.batch_size} | {r0.device_name}"
        f"{'' if r0.compile == 'eager' else ' | compiled: ' + r0.compile}"
        f"{'' if r0.repeat == 1 else f' | median of {r0.repeat} repeats'}"
        " | GMACs = 1e9 multiply-adds (fvcore's 'flop')"
    )
    body = df.to_string(
        index=False,
        formatters={
            "params M": "{:.2f}".format,
            "GMACs fvcore": "{:.3f}".format,
            "GMACs torch": "{:.3f}".format,
            "step ms": "{:.1f}".format,
            "peak MB": "{:.0f}".format,
            "MFU": "{:.1%}".format,
        },
    )
    notes = [
        f"* {r.model}: timing disturbed, do not trust it: {r.timing_noisy_reason}"
        for r in rows
        if r.timing_noisy
    ]
    return "\n".join([head, body, *notes])


def profile_models(
    names: list[str], opts: ProfileOptions, *, device: str = "auto"
) -> list[ProfileRow]:
    """One row per model, on one device and dtype whose peak FLOP/s is measured once."""
    opts.check()
    dev = resolve_device(device, key="--device")
    check_precision(opts.dtype, dev, "--dtype")
    for name in names:
        get_entry_or_fail(name)
    peak = matmul_peak_tflops(dev, opts.dtype)
    return [profile_model(n, opts, device=dev, peak_tflops=peak) for n in names]


def uncounted_ops_lines(rows: list[ProfileRow]) -> list[str]:
    """What neither FLOP counter counted: a warning for ops that carry multiply-adds."""
    lines = []
    for r in rows:
        missing = sorted(op for op in r.unsupported_ops if op in MAC_OPS)
        if missing:
            lines.append(f"WARNING {r.model}: ops with multiply-adds left uncounted: {missing}")
        rest = sorted(op for op in r.unsupported_ops if op not in MAC_OPS)
        if rest:
            lines.append(
                f"{r.model}: not counted (elementwise, no multiply-adds): {', '.join(rest)}"
            )
    return lines


def get_entry_or_fail(name: str) -> None:
    try:
        get_entry(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def log_profile_row(tracker: Any, row: ProfileRow) -> None:
    """One MLflow run per row: its figures and timing conditions as metrics (the stable names
    of ``suite.noise.window_metrics``), and the tag ``timing_noisy`` (its reason) when the
    timing was disturbed."""
    entry = get_entry(row.model)
    tags = {"model": row.model, "family": entry.family, "kind": "profile"}
    tags.update(device=row.device, device_name=row.device_name, dtype=row.dtype, mode=row.mode)
    if row.compile_fallback:
        tags["compile_fallback"] = row.compile_fallback
    if row.timing_noisy:
        tags["timing_noisy"] = row.timing_noisy_reason
    with tracker.run("profile", run_name=f"{row.model}/{row.mode}/{row.dtype}", tags=tags) as run:
        d = asdict(row)
        unsupported = d.pop("unsupported_ops")
        params = {k: d.pop(k) for k in ("img_size", "batch_size", "compile", "repeat")}
        params["model"] = row.model
        run.log_params(params)
        numeric = {
            k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        run.log_metrics({**numeric, **row.conditions})
        run.log_dict({"unsupported_ops": unsupported, **asdict(row)}, "profile.json")
