"""Timed steps: synthetic input on the device, warm-up steps, then timed steps each ended by a
device synchronize (timm's benchmark.py); inference under ``inference_mode``, training as
forward + backward + SGD step (lr 1e-4, momentum 0.9). Each timed window is watched by
``suite.noise``: a disturbed one is timed again and, if it stays so, reported noisy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite import noise
from suite.errors import UserError
from suite.runtime import autocast, compile_model, oom_message, resolve_compile


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Timing:
    step_ms: float  # median (of the repeats' medians)
    p90_ms: float
    img_per_s: float
    peak_mb: float
    compile_s: float
    compile: str = "eager"  # the compile mode that ran: whole, regional or eager
    compile_fallback: str = ""  # why compiling failed ("" = it did not)
    p10_ms: float = 0.0
    repeats: list[dict[str, Any]] = field(default_factory=list)  # each repeat's figures
    conditions: dict[str, float] = field(default_factory=dict)  # suite.noise.window_metrics
    noisy_reason: str = ""  # why the figure cannot be trusted ("" = it can)


def _loss(out: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(nn.functional.cross_entropy(o.float(), y) for o in outs)


@dataclass(frozen=True)
class TimingOptions:
    """How ``time_model`` times a model: built once from the config or the command line.

    A timed window goes on past ``steps`` until it has lasted ``min_window_s`` (at most
    ``noise.MAX_WINDOW_STEPS`` steps), so that ``suite.noise`` can judge it; a disturbed window
    is timed again up to ``retries`` times and reported noisy if it stays so. ``repeat``
    independent windows give the median of their medians.
    """

    mode: str  # infer: forward under inference_mode; train: forward, backward, SGD step
    dtype: str  # fp32, or autocast to bf16/fp16
    warmup: int  # untimed steps, the first (compiling) one included
    steps: int  # timed steps per window, at least
    # a train.compile setting (suite.runtime.resolve_compile): the first step compiles and is
    # timed apart as compile_s; a failed compile falls back to eager, saying why
    compile: bool | str = False
    repeat: int = 1
    retries: int = noise.RETRIES
    min_window_s: float = noise.MIN_WINDOW_S


def time_model(
    model: nn.Module,
    img_size: int,
    batch_size: int,
    opts: TimingOptions,
    *,
    device: torch.device,
    num_classes: int = 1000,
) -> Timing:
    """Median, p10 and p90 step time of ``model`` on synthetic batches of ``batch_size``, with
    the conditions the windows ran in (``suite.noise``); img/s is computed from all the steps
    timed, compile time is reported apart and never counted in throughput."""
    model = model.to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), device=device)
    step = _step(model, x, y, opts.mode, opts.dtype, device)
    try:
        # the first call compiles (and is the first warm-up step)
        c = compile_model(model, resolve_compile(opts.compile, device), step, device)
        for _ in range(max(opts.warmup - 1, 0)):
            step(c.fn)
        sync(device)
        reset_peak_memory(device)

        window = _window(step, c.fn, opts.steps, device, opts.min_window_s)
        runs = [noise.measure(window, device, opts.retries) for _ in range(opts.repeat)]
    except torch.cuda.OutOfMemoryError:
        raise UserError(oom_message("--batch-size", batch_size, device)) from None
    t = noise.combine(runs)
    for r in t.repeats:
        r["img_per_s"] = batch_size / r["step_ms"] * 1e3
    return Timing(
        t.step_s * 1e3,
        t.p90_s * 1e3,
        batch_size / t.step_s,
        peak_memory_mb(device),
        c.compile_s,
        c.mode,
        c.fallback,
        p10_ms=t.p10_s * 1e3,
        repeats=t.repeats,
        conditions=t.metrics,
        noisy_reason=t.reason,
    )


def _window(
    step: Callable[[Callable], None],
    fn: Callable,
    steps: int,
    device: torch.device,
    min_s: float = noise.MIN_WINDOW_S,
) -> Callable[[], list[float]]:
    """One timed window: calls of ``step(fn)``, each ended by a synchronize, at least ``steps``
    of them and more until the window has lasted ``min_s`` (``noise.window_done``)."""

    def window() -> list[float]:
        times = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            step(fn)
            sync(device)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if noise.window_done(len(times), t1 - start, steps, min_s):
                return times

    return window


def _step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, dtype: str, device: torch.device
) -> Callable[[Callable], None]:
    """One timed step of ``fn`` (the model, or its compiled form): inference under
    inference_mode, or training (forward, cross-entropy, backward, SGD step)."""
    if mode != "train":
        model.eval()

        def infer(fn: Callable[[torch.Tensor], Any]) -> None:
            with torch.inference_mode(), autocast(device, dtype):
                fn(x)

        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def train(fn: Callable[[torch.Tensor], Any]) -> None:
        with autocast(device, dtype):
            loss = _loss(fn(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return train
