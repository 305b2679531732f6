"""How a model runs, the same for training, profiling, the matrix and viz: the device, the
precision (autocast), seeding, torchrun's ranks, parameter counts, and ``torch.compile`` chosen
by one rule with its first call timed apart and a fallback to eager when compilation fails.

``train.compile``, the matrix's inference profile and ``tntbench profile --compile`` all read
the same setting through ``resolve_compile``:

- ``"auto"`` (the default): whole-model ``torch.compile`` on CUDA, eager elsewhere. On an H100
  whole-model compile took our TNT-S from 1,370 to 2,676 img/s (bf16 training, batch 128; the
  first step took 70 s), regional compile to 2,262 (one H100 80GB, torch 2.11.0+cu130, measured
  2026-11-26 at 80cdbbb).
  On 2 CPU cores whole-model compile measured 0.95x eager and regional 1.07x in bf16, none in
  fp32 (``reports/cpu/README.md``), at 10-60 s of compiling: not worth it by default.
- ``true`` / ``false``: whole-model compile, or eager, on any device.
- ``"regional"``: each block compiled in place (``suite.models.compile_blocks``).

Worker processes (a search's or a matrix's ``--workers``) start through ``spawn_workers``, so a
SIGTERM or Ctrl-C ends each worker's run and trial as an interrupt does, never left RUNNING.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.config import PRECISIONS, check_compile_setting
from suite.errors import Terminated, UserError, first_line, sigterm_as_interrupt
from suite.models import compile_blocks

# precision names (train.amp, profile --dtype) -> autocast dtypes; fp32 runs without autocast
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(DTYPES) == set(PRECISIONS)


# ---------------------------------------------------------------------------------------------
# Device, ranks, seeding, parameters


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto`` (CUDA if there is one), ``cpu``, ``cuda`` (this rank's GPU) or ``cuda:N``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key} = '{name}': no CUDA device is available on this machine")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise UserError(f"{key} = '{name}': must be auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ---------------------------------------------------------------------------------------------
# Precision


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware has it (CUDA, CPU with native bf16), else fp16 on
    older GPUs and fp32 on CPU; the other names as they are."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(name: str, device: torch.device, key: str) -> None:
    """A UserError naming ``key`` when the device cannot run that precision."""
    if name not in DTYPES:
        raise UserError(f"{key} = '{name}': must be one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise UserError(f"{key} = 'fp16' needs a CUDA device (use bf16 on CPU)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key} = 'bf16' is not supported by this GPU; use fp16")


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


# ---------------------------------------------------------------------------------------------
# torch.compile


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
        reason = f"{type(e).__name__}: {first_line(e) if str(e).strip() else ''}"
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


def _worker_entry(target: Callable[..., None], args: tuple) -> None:
    """A spawned worker: SIGTERM raises ``Terminated`` as in the command, and an interrupt
    (its runs and trials already closed on the way out) exits 130 without a traceback."""
    try:
        with sigterm_as_interrupt():
            target(*args)
    except KeyboardInterrupt:
        sys.exit(130)


def spawn_workers(
    target: Callable[..., None], args: list[tuple], grace_s: float = 30
) -> list[int | None]:
    """``target(*a)`` in a fresh spawned process for each ``a`` (no inherited threads or CUDA
    state), waited for. Ctrl-C reaches the workers too (the terminal's process group), so they
    are given ``grace_s`` to close their cells; a SIGTERM (``Terminated``) reached only this
    process, so it is passed on at once. Workers still alive after that are terminated.
    Returns the workers' exit codes (0: each did its work)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, args=(target, a)) for a in args]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
        return [p.exitcode for p in procs]
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            for p in procs:
                p.terminate()
        for p in procs:
            p.join(timeout=grace_s)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        raise


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def clamp_workers(
    workers: int,
    cells: int,
    gpus_per_cell: int,
    cuda: bool,
    command: str = "matrix",
    unit: str = "cell",
) -> int:
    """``workers`` lowered to what can run at once here: no more than the cells left (an
    idle worker only splits the cores further), and on CPU no more than the cores (divided
    by a cell's gloo processes); a one-line note on stderr when lowered. 16 workers for 2
    cells on 2 cores each got 1/8 of a core: 4x slower, and nothing said so."""
    limit = max(1, cells)
    if not cuda:
        limit = min(limit, max(1, cpu_cores() // max(gpus_per_cell, 1)))
    if workers <= limit:
        return workers
    why = f"{cells} {unit}(s) to run" + ("" if cuda else f", {cpu_cores()} CPU core(s) here")
    print(f"note: {command}: --workers {workers} lowered to {limit} ({why})", file=sys.stderr)
    return limit
