"""Where a run runs: environment tags (versions, git, host), the worker's id, and whether a
recorded process is gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def environment_tags() -> dict[str, str]:
    """git commit and dirty flag, suite/torch/CUDA versions, host: tags for every run."""
    import platform

    import torch

    import suite

    tags = {
        "suite_version": suite.__version__,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "host": platform.node(),
    }
    here = Path(suite.__file__).resolve().parent.parent
    commit = git(["rev-parse", "HEAD"], here)
    if commit:
        tags["git_commit"] = commit
        tags["git_dirty"] = str(bool(git(["status", "--porcelain", "--untracked-files=no"], here)))
    return tags


def git(args: list[str], cwd: str | Path | None = None) -> str:
    """``git ARGS`` in ``cwd``, its output stripped; "" when git is missing, fails or hangs."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def worker_id() -> str:
    """``host:pid`` of this process, tagged on what it runs (trials, cells)."""
    import platform

    return f"{platform.node()}:{os.getpid()}"


def process_is_gone(host: str, pid: int, started: Any) -> bool:
    """Whether the process ``pid`` on ``host`` that started work at ``started`` (a datetime, or
    epoch milliseconds) has died: only knowable on this host; a pid now held by a process that
    began later was reused, so the original is gone."""
    import platform

    import psutil

    if host != platform.node() or pid == os.getpid():
        return False
    if pid <= 0:  # recorded without a pid (older runs): nothing can still be running it here
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet waited for by its parent
            return True
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    start_s = started.timestamp() if hasattr(started, "timestamp") else float(started) / 1000
    return created > start_s + 1.0
