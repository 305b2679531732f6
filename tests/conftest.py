import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
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


# ---------------------------------------------------------------------------------------------
# The tiny training run the tests share: one dict, given as --set strings or as TOML text

TINY_RUN: Mapping[str, object] = MappingProxyType(
    {
        "model.depth": 1,
        "data.train_size": 128,
        "data.val_size": 64,
        "train.epochs": 1,
        "train.batch_size": 32,
        "tracking.system_metrics": False,
    }
)
"""The smallest run worth training (seconds on a CPU): every test file's tiny settings are
these plus its own differences. No model name: a matrix or search names its models, and
``--set model.name`` is refused there (the default model is tnt_nano)."""


def tiny(changes: dict[str, object] | None = None) -> dict[str, object]:
    """``TINY_RUN`` with ``changes`` on top, as a new dict (the shared one is read-only)."""
    return {**TINY_RUN, **(changes or {})}


def toml_value(value: object) -> str:
    """``value`` as TOML writes it, which is also what ``--set KEY=VALUE`` parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: quotes, backslashes escaped
    raise TypeError(f"no TOML value for {value!r}")


def tiny_sets(changes: dict[str, object] | None = None) -> list[str]:
    """The tiny run as ``KEY=VALUE`` strings, for ``--set`` (or ``load_config``'s sets)."""
    return [f"{key}={toml_value(v)}" for key, v in tiny(changes).items()]


def set_args(sets: list[str]) -> list[str]:
    """``["--set", s]`` for each of ``sets``: a command line's arguments."""
    return [a for s in sets for a in ("--set", s)]


def tiny_toml(changes: dict[str, object] | None = None) -> str:
    """The tiny run as a config file's TOML text: one [section] per first key part."""
    tables: dict[str, list[str]] = {}
    for key, v in tiny(changes).items():
        section, name = key.split(".", 1)
        tables.setdefault(section, []).append(f"{name} = {toml_value(v)}")
    return "".join(
        f"[{s}]\n" + "".join(f"{line}\n" for line in lines) for s, lines in tables.items()
    )


# ---------------------------------------------------------------------------------------------
# Loopback servers: a port the OS picks, an MLflow server waited for until it answers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now (the OS picks it: never a fixed one,
    so parallel test runs and other programs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether the MLflow server (or ``tntbench ui``) at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until_answers(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``url`` answers; fail the test when ``proc`` (the server, or the command that
    starts one) ends first or ``timeout`` s pass (mlflow server starts slowly on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if proc.poll() is not None:
            pytest.fail(f"the server process ended (exit {proc.returncode}) before {url} answered")
        if time.monotonic() > deadline:
            pytest.fail(f"no answer from {url} within {timeout:.0f} s")
        time.sleep(0.5)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (a server started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def start_mlflow_server(
    backend_store_uri: str, artifacts: Path, port: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """A loopback ``mlflow server`` on ``port`` (its own session: ``kill_group`` ends it whole),
    one worker, waited for until it answers; (the process, its URL)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend_store_uri, "--workers", "1"]
    cmd += ["--artifacts-destination", str(artifacts)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=artifacts.parent,  # anything it writes beside its store, never in the checkout
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(url, proc)
    except BaseException:
        kill_group(proc)
        raise
    return proc, url


@pytest.fixture
def start_mlflow(tmp_path: Path):
    """``start_mlflow(backend_store_uri=None, port=None, env=None) -> (process, URL)``: a
    loopback ``mlflow server`` waited for until it answers, its artifacts in ``tmp_path``; by
    default on a free port with an SQLite store in ``tmp_path``. A test may kill one
    (``kill_group``) and start another on the same port; every one started is killed (its
    whole process group) after the test."""
    started: list[subprocess.Popen] = []

    def start(
        backend_store_uri: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen, str]:
        backend_store_uri = backend_store_uri or f"sqlite:///{tmp_path}/server.db"
        proc, url = start_mlflow_server(
            backend_store_uri, tmp_path / "artifacts", port or free_port(), env
        )
        started.append(proc)
        return proc, url

    try:
        yield start
    finally:
        for proc in started:
            kill_group(proc)
