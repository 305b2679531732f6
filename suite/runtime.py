"""How a model runs, the same for training, profiling, the matrix and viz: the device, the
precision (autocast), seeding, torchrun's ranks, parameter counts, and ``torch.compile`` chosen
by one rule with its first call timed apart and a fallback to eager when compilation fails.

``train.compile``, the matrix's inference profile and ``tntbench profile --compile`` all read
the same setting through ``resolve_compile``:

- ``"auto"`` (the default): whole-model ``torch.compile`` on CUDA, eager elsewhere. On an H100
  whole-model compile took our TNT-S from 1,370 to 2,676 img/s (bf16 training, batch 128; the
  first step took 70 s), regional compile to 2,262 (``../shared/reference/gpu_h100_baseline.md``).
  On 2 CPU cores whole-model compile measured 0.95x eager and regional 1.07x in bf16, none in
  fp32 (``reports/cpu/README.md``), at 10-60 s of compiling: not worth it by default.
- ``true`` / ``false``: whole-model compile, or eager, on any device.
- ``"regional"``: each block compiled in place (``suite.models.compile_blocks``).

Worker processes (a search's or a matrix's ``--workers``) start through ``spawn_workers``, so a
SIGTERM or Ctrl-C ends each worker's run and trial as an interrupt does, never left RUNNING.
A torchrun cell starts through ``run_launcher``: its launcher and ranks die with their parent
(``die_with_parent``), so no rank is ever left orphaned on a dead rendezvous.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.config import PRECISIONS, check_compile_setting
from suite.errors import Terminated, UserError, sigterm_as_interrupt
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


# ---------------------------------------------------------------------------------------------
# torchrun: a launcher and its ranks that never outlive the process that started them

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# the pid of the process that started the launcher, and of the launcher, as the children see
# them in their environment: a child whose parent is no longer that pid was orphaned already
OWNER_ENV = "TNTBENCH_LAUNCHER_OWNER"
LAUNCHER_ENV = "TNTBENCH_LAUNCHER_PID"


def die_with_parent(sig: int, parent: int | None) -> None:
    """Linux: ``sig`` to this process as soon as its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Without it a rank whose launcher died (kill -9, a SIGTERM before torchrun's own handlers
    were in place) is orphaned: blocked in C++ retrying the dead rendezvous for 30 minutes,
    deaf to SIGTERM, with its memory held. ``parent``, the pid that started this process: if
    it died before the prctl took effect, exit now. Elsewhere than Linux: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(128 + int(sig))


def rank_dies_with_launcher() -> None:
    """In a torchrun rank started by ``run_launcher``: SIGKILL when the launcher dies (the
    process that started the launcher then records the cell's run as KILLED)."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and os.environ.get("LOCAL_RANK") is not None:
        die_with_parent(signal.SIGKILL, int(launcher))


def torchrun_main(argv: list[str]) -> int:
    """The torchrun launcher (``torch.distributed.run``) with ``argv``, as started by
    ``run_launcher``: SIGTERM when its starter dies, which it passes on to its ranks."""
    die_with_parent(signal.SIGTERM, int(os.environ[OWNER_ENV]))
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks' environment is a copy of this
    from torch.distributed.run import main as torchrun

    torchrun(argv)
    return 0


def run_launcher(argv: list[str], grace_s: float = 20.0) -> int:
    """``torchrun ARGV`` in a process group of its own, waited for; its exit status.

    Its stderr is relayed line by line. On any exception here (SIGTERM as ``Terminated``,
    Ctrl-C) it is stopped with its ranks: SIGTERM, which torchrun passes on to them, then
    after ``grace_s`` SIGKILL to the launcher and to every process under it (the ranks have
    their own sessions; they also follow the launcher through ``die_with_parent``). From then
    on its output is withheld (each rank's "terminated" line, torchrun's traceback): the
    command says it in one line. The exception is then raised again."""
    code = (
        "import sys; from suite.runtime import torchrun_main; sys.exit(torchrun_main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env={**os.environ, OWNER_ENV: str(os.getpid())},
        stderr=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C reaches this process alone, which stops it
        text=True,
        errors="replace",
    )
    quiet = threading.Event()

    def relay() -> None:
        for line in proc.stderr:  # read to the end even when quiet: a full pipe would block it
            if not quiet.is_set():
                sys.stderr.write(line)
                sys.stderr.flush()

    thread = threading.Thread(target=relay, daemon=True, name="torchrun-stderr")
    thread.start()
    try:
        return proc.wait()
    except BaseException:
        quiet.set()
        stop_launcher(proc, grace_s)
        raise
    finally:
        thread.join(timeout=5)


def stop_launcher(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the launcher, SIGKILL to it and to what is left under it after ``grace_s``;
    SIGTERM and Ctrl-C are ignored meanwhile, so that a second one cannot cut this short."""
    import psutil

    sigs = (signal.SIGTERM, signal.SIGINT)
    main = threading.current_thread() is threading.main_thread()
    old = [signal.signal(s, signal.SIG_IGN) for s in sigs] if main else []
    try:
        try:
            under = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            under = []
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for p in under:  # ranks that outlived it (they die with it: this is a second net)
            with suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(under, timeout=10)
    finally:
        for s, h in zip(sigs if main else (), old, strict=True):
            signal.signal(s, h)


class _GroupStop(Exception):
    """SIGTERM or Ctrl-C reached ``guard_main``."""


def guard_main(argv: list[str], grace_s: float = 10.0) -> int:
    """Run ``argv`` in this process's group (a session of its own, made by the caller) and
    stop the whole group - ``argv`` and whatever it started, e.g. ``mlflow server``'s uvicorn
    - when this process gets SIGTERM or Ctrl-C, or when its parent dies, even by kill -9
    (``die_with_parent``): a server is never left serving behind a dead ``tntbench ui``.
    Started with its parent's pid in ``OWNER_ENV``."""

    def on_term(signum: int, frame: Any) -> None:
        raise _GroupStop(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_term)
    die_with_parent(signal.SIGTERM, int(os.environ[OWNER_ENV]))
    child = subprocess.Popen(argv)
    try:
        return child.wait()
    except _GroupStop:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # the group's SIGTERM below reaches this one too
        os.killpg(0, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace_s)
        os.killpg(0, signal.SIGKILL)  # what is left of the group, this process included
        return 143


def start_guarded(argv: list[str], **popen: Any) -> subprocess.Popen:
    """``argv`` under ``guard_main``, in a session of its own (its group is stopped whole)."""
    code = "import sys; from suite.runtime import guard_main; sys.exit(guard_main(sys.argv[1:]))"
    env = {**popen.pop("env", os.environ), OWNER_ENV: str(os.getpid())}
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, start_new_session=True, **popen
    )
