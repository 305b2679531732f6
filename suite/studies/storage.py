"""Optuna storages for searches and matrix queues: open one from a URL, and hold a lock on it.

A URL is an RDB storage (``sqlite:///...``, ``postgresql+psycopg://...``) or a path ending in
``.journal`` (a journal file, for several processes on one machine without a database). RDB
storages run heartbeats, so a trial whose worker died is failed and queued again by Optuna.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from suite.errors import UserError, redact, unredacted_for_connect


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
    url = unredacted_for_connect(url)
    path = journal_path(url)
    if path is not None:
        if not path.strip():
            raise UserError(f"--storage {url}: no file after 'journal:' (journal:PATH)")
        _writable_file(path, url)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise UserError(
            f"--storage {url}: not an Optuna storage URL (sqlite:///..., "
            f"postgresql+psycopg://..., or a path ending in .journal)"
        )
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":  # a new folder is made
        db = Path(url.removeprefix("sqlite:///").partition("?")[0])  # no ?options
        _writable_file(str(db), url)  # its folder made, the file writable: else one line
        # a file the suite creates starts in WAL mode, committed with synchronous=NORMAL:
        # Optuna commits ~27 times a trial, each an fsync'd page rewrite otherwise (issue 24)
        from suite.tracking import tune_sqlite

        new = not db.is_file() or db.stat().st_size == 0
        try:
            tune_sqlite(db, created=new)
        except UserError as e:
            if new:  # nothing half-made left behind
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
            raise UserError(f"--storage {url}: {e}") from None
    try:
        # Optuna builds a new database's schema on first open: two processes doing that at
        # once collide (a unique violation in PostgreSQL's catalog), so one at a time
        with storage_lock(url, "optuna-schema"):
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry),
                engine_kwargs=_engine_kwargs(url),
            )
    except (optuna.exceptions.StorageInternalError, ImportError, Exception) as e:
        raise UserError(redact(f"--storage {url}: cannot open ({type(e).__name__}: {e})")) from None


@contextlib.contextmanager
def readonly_storage(url: str) -> Iterator[Any]:
    """The storage behind a URL read back from a store (a search's ``search.storage`` param),
    opened so that nothing can be written into it, or None when it is not an existing storage.

    A report or a status only reads, and the URL came from a store a user may have received:
    opening it as ``open_storage`` does would create Optuna's tables in whatever database it
    names. So an SQLite file is opened with SQLite's read-only mode (a file that is not a study
    store then fails to open instead of gaining tables), a PostgreSQL connection in a read-only
    transaction mode, and a journal file is read from a copy.
    """
    import shutil
    import tempfile

    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    quiet_optuna()
    url = unredacted_for_connect(url)
    path = journal_path(url)
    if path is not None:
        if not Path(path).is_file():
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="tntbench-journal-") as tmp:
            copy = shutil.copyfile(path, Path(tmp) / "copy.journal")
            yield JournalStorage(JournalFileBackend(str(copy)))
        return
    kwargs: dict[str, Any] = {"skip_table_creation": True}
    if url.startswith("sqlite:///"):
        local = Path(url.removeprefix("sqlite:///"))
        if not local.is_file():  # opening a missing file would create an empty database
            yield None
            return
        url = f"sqlite:///file:{local.resolve()}?mode=ro&uri=true"
    elif url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {
            "connect_args": {"options": "-c default_transaction_read_only=on"},
            "pool_pre_ping": True,
        }
    else:  # other servers: no read-only switch the suite knows, so not opened at all
        yield None
        return
    yield RDBStorage(url, **kwargs)


def _writable_file(path: str, url: str) -> None:
    """Make the storage file's folder and check that the file can be written (opened for
    appending, nothing written), so that a folder that cannot be made (its parent a file),
    read-only or an immutable file is one line naming --storage, not a traceback from inside
    Optuna at its first write."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--storage {url}: {p} is a folder; name a file inside it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        # an empty file left by the probe is an empty journal, or an empty SQLite database
        with open(p, "ab"):
            pass
    except OSError as e:
        where = e.filename or p
        raise UserError(
            f"--storage {url}: cannot write {where} ({e.strerror or type(e).__name__})"
        ) from None


def check_not_tracking_store(url: str, tracking_uri: str) -> None:
    """The MLflow store given as --storage: Optuna's tables would go into MLflow's database
    (both keep an ``alembic_version`` table: each would read the other's schema version), or
    a journal would be appended to the SQLite file. Refused with one line."""

    def same(a: str, b: str) -> bool:
        pa, pb = _local_file(a), _local_file(b)
        if pa is not None or pb is not None:
            return pa is not None and pb is not None and pa == pb
        return _without_driver(a) == _without_driver(b)

    if tracking_uri and same(url, tracking_uri):
        raise UserError(
            f"--storage {url}: this is the MLflow tracking store (the tracking URI); give "
            "Optuna a storage of its own (another file or database)"
        )


def _local_file(url: str) -> Path | None:
    """The resolved file of an SQLite URL or a journal path; None for servers."""
    path = journal_path(url)
    if path is None and url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").partition("?")[0]
    if path is None or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def _without_driver(url: str) -> str:
    """``postgresql+psycopg://...`` and ``postgresql://...`` name the same database."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.partition('+')[0]}{sep}{rest.rstrip('/')}"


def _engine_kwargs(url: str) -> dict[str, Any] | None:
    """A server's connections checked before use (a restarted server drops them), and on
    PostgreSQL a 10 s connect timeout: a server gone from the network is an error in seconds,
    not a hang (libpq waits forever by default)."""
    if url.startswith("sqlite"):
        return None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


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
    engine = create_engine(url, poolclass=_null_pool(), **(_engine_kwargs(url) or {}))
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


def reap_dead_workers(
    study: Any, max_retry: int, requeue: Callable[[Any], tuple[dict, dict]]
) -> list[int]:
    """Fail the RUNNING trials whose worker died and queue each again, at most ``max_retry``
    times in a row (a trial that kills its worker every time is then given up); the numbers of
    the trials failed. The matrix's cells and the search's trials both come back this way.

    A worker is dead when its heartbeat is stale (RDB storages: Optuna fails the trial and its
    storage's callback queues it again, with the same limit) or, on this host, when its process
    is gone (any storage, the journal file included). ``requeue(trial)`` gives the parameters
    and user attributes of the trial that takes its place."""
    import optuna
    from optuna.trial import TrialState

    from suite.tracking import process_is_gone

    optuna.storages.fail_stale_trials(study)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if not host or not process_is_gone(host, int(pid), t.datetime_start):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        failed.append(t.number)
        retries = int(t.user_attrs.get("retries", 0)) + 1
        if retries <= max_retry:
            params, attrs = requeue(t)
            attrs = {**attrs, "retry_of": t.number, "retries": retries}
            study.enqueue_trial(params, user_attrs=attrs)
    return failed
