"""How a model runs: ``torch.compile`` chosen by one rule, its first call timed apart, and a
fallback to eager when compilation fails.

``train.compile``, the matrix's inference profile and ``tntbench profile --compile`` all read
the same setting through ``resolve_compile``:

- ``"auto"`` (the default): whole-model ``torch.compile`` on CUDA, eager elsewhere. On an H100
  whole-model compile took our TNT-S from 1,370 to 2,676 img/s (bf16 training, batch 128; the
  first step took 70 s), regional compile to 2,262 (``../shared/reference/gpu_h100_baseline.md``).
  On 2 CPU cores whole-model compile measured 0.95x eager and regional 1.07x in bf16, none in
  fp32 (``reports/cpu/README.md``), at 10-60 s of compiling: not worth it by default.
- ``true`` / ``false``: whole-model compile, or eager, on any device.
- ``"regional"``: each block compiled in place (``suite.models.compile_blocks``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from suite.config import check_compile_setting
from suite.models import compile_blocks


def resolve_compile(setting: bool | str, device: torch.device) -> str:
    """``"whole"``, ``"regional"`` or ``"eager"`` for a compile setting on ``device``."""
    check_compile_setting(setting, "compile")
    if setting == "auto":
        return "whole" if device.type == "cuda" else "eager"
    if setting in (True, "true"):
        return "whole"
    if setting == "regional":
        return "regional"
    return "eager"


@dataclass
class Compiled:
    """What to call, how it ended up compiled, and what compiling cost."""

    fn: nn.Module
    mode: str  # "whole", "regional" or "eager" (also after a fallback)
    compile_s: float = 0.0  # the first call(s), compilation included; 0 when eager
    fallback: str = ""  # why compilation was abandoned ("" = it was not)


def compile_model(
    model: nn.Module, mode: str, first_call: Callable[[nn.Module], object], device: torch.device
) -> Compiled:
    """``model`` compiled as ``mode`` and called once through ``first_call(fn)``, timed apart
    (compilation happens on the first call, so it never lands in a throughput figure).

    ``first_call`` must leave no trace (a forward, or a forward + backward whose gradients the
    caller clears). If compiling fails, one warning line goes to stderr and the eager model is
    returned with ``fallback`` saying why; the eager model then runs as if never compiled.
    """
    if mode == "eager":
        return Compiled(model, "eager")
    if mode == "whole":
        fn = torch.compile(model)
    else:  # in place, on the model inside a DDP wrapper: the wrapper stays what is called
        compile_blocks(getattr(model, "module", model))
        fn = model
    t0 = time.perf_counter()
    try:
        first_call(fn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        raise  # not a compiler failure: the caller names the batch size
    except Exception as e:  # dynamo/inductor errors have no common public base class
        if mode == "regional":
            _uncompile_blocks(getattr(model, "module", model))
        torch.compiler.reset()
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(
            f"warning: torch.compile ({mode}) failed, running eager: {reason[:300]}",
            file=sys.stderr,
            flush=True,
        )
        return Compiled(model, "eager", 0.0, reason[:500])
    return Compiled(fn, mode, time.perf_counter() - t0)


def _uncompile_blocks(model: nn.Module) -> None:
    """Undo ``compile_blocks``: ``nn.Module.compile`` keeps the compiled call in this
    attribute, and ``None`` is its "not compiled" value (there is no public undo)."""
    for blk in getattr(model, "blocks", []):
        blk._compiled_call_impl = None


def oom_message(key: str, batch_size: int, device: torch.device) -> str:
    """One line for a CUDA out-of-memory: the batch-size knob, the device and the peak."""
    where = str(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        total = torch.cuda.get_device_properties(device).total_memory / 2**20
        where = f"{device} ({torch.cuda.get_device_name(device)}, {total:,.0f} MB)"
        torch.cuda.empty_cache()
    else:
        peak = 0.0
    return (
        f"{key} = {batch_size} does not fit in memory on {where}: out of memory at a peak "
        f"of {peak:,.0f} MB allocated; lower {key}"
    )
