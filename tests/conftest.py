import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NoReturn

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (and when @triton.jit decorates):
# without CUDA, its CPU interpreter runs the Triton kernels (tests/test_triton_inner.py). On
# CUDA machines triton compiles for the GPU as usual (tests/test_cuda.py runs the kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


CHECKOUT = Path(__file__).resolve().parents[1]
# ignored paths that tools write (caches, environments, builds): everything else that appears,
# ignored or not (./mlruns, ./mlflow.db, ./runs, reports/...), is a test writing into the checkout
TOOL_PATHS = [".tox", ".venv", ".pytest_cache", ".ruff_cache", "build", "dist", "wheelhouse"]
TOOL_GLOBS = ["**/__pycache__/**", "**/*.egg-info/**"]


def checkout_state(root: Path = CHECKOUT) -> set[str] | None:
    """``git status`` lines of ``root``, ignored files included (tool caches aside); None when
    it is not a git checkout or git is missing."""
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    spec = [f":(exclude){p}" for p in TOOL_PATHS] + [f":(exclude,glob){g}" for g in TOOL_GLOBS]
    cmd = ["git", "-C", str(root), "status", "--porcelain", "--ignored", "--untracked-files=all"]
    done = subprocess.run([*cmd, "--", ".", *spec], capture_output=True, text=True)
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = checkout_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a test wrote into the checkout (a path new in git status)."""
    before = session.config.stash.get(_BEFORE, None)
    after = checkout_state() if before is not None else None
    new = sorted((after or set()) - (before or set()))
    if not new:
        return
    msg = f"tests wrote into the checkout {CHECKOUT} (new in git status):\n  " + "\n  ".join(new)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(msg, red=True, bold=True)
    else:
        print(msg, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pg_unavailable(reason: str) -> NoReturn:
    """Fail under CI (the server is part of .ci/run), skip elsewhere."""
    reason += " (.ci/run starts a server; install the extra with pip install -e '.[postgres]')"
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"PostgreSQL needed under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of the PostgreSQL server in TNTBENCH_PG_URL, after a real connection."""
    url = os.environ.get("TNTBENCH_PG_URL", "").strip()
    if not url:
        _pg_unavailable("TNTBENCH_PG_URL is not set")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    shown = url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:  # missing driver, bad URL, server down, auth: all mean "unavailable"
        _pg_unavailable(f"cannot connect to {shown}: {type(exc).__name__}: {exc}")
    return url


@pytest.fixture
def pg_storage_url(pg_url: str):
    """URL of a fresh, empty database (dropped afterwards), so tests never share Optuna studies."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"tntbench_{uuid.uuid4().hex[:16]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")  # no CREATE DATABASE in a txn
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        finally:
            # FORCE (PostgreSQL >= 13) ends connections still pooled by the test's engines
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


class Evil:
    """A pickle that runs ``touch MARKER`` when unpickled: planted in checkpoints and data
    files, it must never be loaded (tests check that the marker never appears)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
