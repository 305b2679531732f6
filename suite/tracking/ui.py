"""``tntbench ui``: ``mlflow server`` on the store, and stopping its process group."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from suite.errors import redact
from suite.tracking.base import resolve_uri


class _Stop(Exception):
    """SIGTERM arrived while the UI ran."""


def ui_env(jobs: bool = False) -> dict[str, str]:
    """The environment of the server ``tntbench ui`` starts: MLflow's job runner (GenAI jobs:
    a Huey consumer and its workers, 12 processes and 2.4 GB against 4 and 0.6 GB without, and
    a first search over 1,000 runs 22-33 s against 8 s; issue 24) only with ``--jobs``."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}


def serve_ui(
    uri: str | None = None, port: int = 0, host: str = "127.0.0.1", jobs: bool = False
) -> int:
    """Run ``mlflow server`` on the store (loopback, a free port by default) until Ctrl-C or
    SIGTERM, which stop the server's whole process group (its own session) too; MLflow's job
    execution only with ``jobs`` (``ui_env``)."""
    import signal
    import socket
    import threading

    from suite.procs import start_guarded

    uri = resolve_uri(uri)
    if not port:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    print(f"MLflow UI for {redact(uri)} at http://{host}:{port}  (Ctrl-C stops it)", flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop(signum)

    sigs = (signal.SIGTERM, signal.SIGINT)
    main = threading.current_thread() is threading.main_thread()
    old = [signal.getsignal(s) for s in sigs] if main else []
    if main:
        signal.signal(signal.SIGTERM, on_term)
    # its own session: a terminal's Ctrl-C reaches only us, and we stop the whole group;
    # guarded, so that the group stops too when this process is killed -9
    proc = start_guarded(cmd, env=ui_env(jobs))
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        for s in sigs if main else ():  # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        _stop_group(proc)
        for s, h in zip(sigs if main else (), old, strict=True):
            signal.signal(s, h)


def _stop_group(proc: Any, grace: float = 10.0) -> None:
    """SIGTERM to the process group of ``proc`` (a session leader), SIGKILL after ``grace``."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader ended: its group's other members get the grace period too
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            break
    proc.wait()
