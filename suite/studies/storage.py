"""Optuna storages for searches and matrix queues: open one from a URL, and hold a lock on it.

A URL is an RDB storage (``sqlite:///...``, ``postgresql+psycopg://...``) or a path ending in
``.journal`` (a journal file, for several processes on one machine without a database). RDB
storages run heartbeats, so a trial whose worker died is failed and queued again by Optuna.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from suite.errors import UserError


def quiet_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def journal_path(url: str) -> str | None:
    """The file of a journal storage URL, None for an RDB URL."""
    if url.endswith(".journal") or url.startswith("journal:"):
        return url.removeprefix("journal:")
    return None


def open_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int) -> Any:
    """The storage behind ``url``; an RDB one with heartbeats every ``heartbeat_interval`` s,
    whose trials silent for ``grace_period`` s are failed and queued again (``max_retry``)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    quiet_optuna()
    path = journal_path(url)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise UserError(
            f"--storage {url}: not an Optuna storage URL (sqlite:///..., "
            f"postgresql+psycopg://..., or a path ending in .journal)"
        )
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":  # a new folder is made
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # a file the suite creates starts in WAL mode, committed with synchronous=NORMAL:
        # Optuna commits ~27 times a trial, each an fsync'd page rewrite otherwise (issue 24)
        from suite.tracking import tune_sqlite

        tune_sqlite(db, created=not db.is_file() or db.stat().st_size == 0)
    try:
        # Optuna builds a new database's schema on first open: two processes doing that at
        # once collide (a unique violation in PostgreSQL's catalog), so one at a time
        with storage_lock(url, "optuna-schema"):
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            )
    except (optuna.exceptions.StorageInternalError, ImportError, Exception) as e:
        raise UserError(f"--storage {url}: cannot open ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """An exclusive lock named ``name`` on the storage, held across processes and machines:
    a PostgreSQL advisory lock on a server, a lock file beside an SQLite or journal file.
    Optuna hands each waiting trial to one worker; this guards what it does not: two workers
    enqueueing the same cells, or re-queueing the same dead worker's cell, at once."""
    path = journal_path(url)
    if path is None and url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
    if path is not None:
        from filelock import FileLock

        with FileLock(f"{path}.{hashlib.sha256(name.encode()).hexdigest()[:8]}.lock"):
            yield
        return
    if not url.startswith("postgresql"):  # other servers: Optuna's own guarantees only
        yield
        return
    from sqlalchemy import create_engine, text

    # a signed 64-bit key from the name: pg_advisory_lock takes a bigint
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = create_engine(url, poolclass=_null_pool())
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
