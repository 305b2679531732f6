"""Child processes that never outlive the process that started them, even one killed -9:
a torchrun launcher and its ranks (``run_launcher``), a server and everything it starts
(``start_guarded``). Linux's ``prctl(PR_SET_PDEATHSIG)`` does it (``die_with_parent``);
elsewhere these run as plain children.

Without it, SIGTERM to ``matrix --gpus-per-cell 2`` two seconds in left both ranks orphaned,
blocked in C++ retrying a dead rendezvous for 30 minutes at ~800 MB each, deaf to SIGTERM;
and ``tntbench ui`` killed -9 left its MLflow server serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import suppress
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# the pid of the process that started a guard or launcher, and of a launcher, as children see
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
        "import sys; from suite.procs import torchrun_main; sys.exit(torchrun_main(sys.argv[1:]))"
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
    code = "import sys; from suite.procs import guard_main; sys.exit(guard_main(sys.argv[1:]))"
    env = {**popen.pop("env", os.environ), OWNER_ENV: str(os.getpid())}
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, start_new_session=True, **popen
    )
