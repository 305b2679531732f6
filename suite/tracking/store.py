"""Opening a store: in-memory SQLite refused, half-built stores detected (and restarted when
empty), a first probe, and the SQLite tuning (WAL, synchronous, planner statistics)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from suite.errors import UserError, first_line


def open_store(uri: str, make_client: Any) -> Any:
    """Check the store before any work, creating it if new: one UserError naming the URI when
    it is unreachable (within about 10 s), of an unknown kind, read-only or half-built.

    A new SQLite store is created under a file lock (``filelock``): MLflow builds its schema by
    migrations that two processes must not run at once (that left half-built stores)."""
    from filelock import FileLock

    if _in_memory(uri):
        raise UserError(
            f"tracking store {uri}: an in-memory SQLite store loses every run when the "
            "command ends; name a file, e.g. sqlite:///mlflow.db"
        )
    db = sqlite_path(uri)
    if db is None:
        return _probe(uri, make_client)
    # mode bits, not os.access: root may write anything, but a file marked read-only is meant so
    if db.exists() and not db.stat().st_mode & 0o222:
        raise UserError(f"tracking store {uri}: the file is read-only")
    try:  # a new store in a new folder: the folder is made
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"tracking store {uri}: cannot create {db.parent} ({e.strerror})") from None
    if not os.access(db.parent if str(db.parent) else ".", os.W_OK):
        raise UserError(f"tracking store {uri}: its folder {db.parent} is read-only")
    with FileLock(f"{db}.lock", timeout=120):
        _check_half_built(uri, db)
        new = not db.is_file() or db.stat().st_size == 0
        try:
            tune_sqlite(db, created=new)
            client = _probe(uri, make_client)
        except UserError:
            if new:  # its creation failed (disk full, a file-size limit): leave no half store
                for suffix in ("", "-journal", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
            raise
        tune_sqlite(db)  # MLflow's schema is there now: its statistics
        return client


def _in_memory(uri: str) -> bool:
    """``sqlite://``, ``sqlite:///`` (no path: SQLAlchemy's in-memory database),
    ``sqlite:///:memory:`` and SQLite's ``file::memory:`` / ``mode=memory`` forms."""
    if not uri.startswith("sqlite:"):
        return False
    path, _, query = uri.removeprefix("sqlite:").lstrip("/").partition("?")
    return path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in query


# A table this many rows larger than its statistics say is analyzed again: SQLite without
# current ``ANALYZE`` statistics answers MLflow's history query from the wrong index and scans
# that metric for every run (26 ms a run at 1,000 runs, 0.1 ms after ANALYZE; issue 24).
STATS_GROWTH = 2
STATS_MIN_ROWS = 1000
# ANALYZE samples about this many rows per index: seconds become milliseconds on large stores,
# and rough counts are all the planner needs to pick the run's index
ANALYSIS_LIMIT = 1000


def tune_sqlite(db: Path, created: bool = False) -> None:
    """The suite's SQLite stores: a store it is about to create starts in WAL mode (commits
    append to a log instead of rewriting pages; readers do not block the writer), and every
    store's planner statistics are refreshed when the metrics have grown past them. WAL is a
    property of the file, kept by every later connection; ``sqlite_pragmas`` (installed here,
    before MLflow or Optuna connect) sets synchronous=NORMAL on each."""
    import sqlite3

    _install_sqlite_pragmas()
    if not created and not db.is_file():
        return
    con = sqlite3.connect(db, timeout=60)
    try:
        if created:
            con.execute("PRAGMA journal_mode=WAL")
            # a first read maps the WAL index (-shm, 32 kB): where the disk (or a file-size
            # limit) refuses it, say so now; MLflow would retry its engine for ~100 s
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        else:
            refresh_statistics(con)
    except sqlite3.DatabaseError as e:
        if created:
            raise UserError(f"{db}: cannot create an SQLite store there ({e})") from None
        # busy beyond the timeout, or not a database (the probe says which): stats can wait
    finally:
        con.close()


def refresh_statistics(con: Any) -> bool:
    """``ANALYZE`` (sampled) when the ``metrics`` table has no statistics or has grown
    ``STATS_GROWTH`` times past them; whether it ran. ``max(rowid)`` is the cheap row count."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "metrics" not in tables:
        return False
    rows = con.execute("SELECT max(rowid) FROM metrics").fetchone()[0] or 0
    known = 0
    if "sqlite_stat1" in tables:
        stat = con.execute("SELECT stat FROM sqlite_stat1 WHERE tbl = 'metrics'").fetchone()
        known = int(stat[0].split()[0]) if stat else 0
    if rows < STATS_MIN_ROWS or rows <= known * STATS_GROWTH:
        return False
    con.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
    con.execute("ANALYZE")
    con.commit()
    return True


def sqlite_pragmas(dbapi_connection: Any, connection_record: Any = None) -> None:
    """On each new SQLite connection (MLflow's and Optuna's engines): a WAL file commits with
    synchronous=NORMAL, no fsync per commit (durable at checkpoints; a power cut may lose the
    last commits, never corrupt the file). Journal-mode files keep SQLite's default."""
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()
    if mode and str(mode[0]).lower() == "wal":
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _install_sqlite_pragmas() -> None:
    """``sqlite_pragmas`` on every SQLAlchemy pool of this process, once."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "connect", sqlite_pragmas):
        event.listen(Pool, "connect", sqlite_pragmas)


def sqlite_path(uri: str) -> Path | None:
    """The file of an ``sqlite:///relative`` or ``sqlite:////absolute`` store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _check_half_built(uri: str, db: Path) -> None:
    """A store whose creation or migration died (killed, disk full, a file-size limit) is
    half-built: ``_alembic_tmp_*`` tables left behind, or a schema short of what this MLflow
    builds (tables missing, or the alembic revision not its head) - MLflow would re-run the
    migrations over it and fail on ``table ... already exists`` forever. Holding nothing (no
    run, no experiment but Default), it is started again; holding runs, a store with
    ``_alembic_tmp_*`` tables is refused (never touched), and an older MLflow's store is left
    for MLflow to upgrade. A file that is not an SQLite database is refused."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(db)  # a hot journal (a creation that died) is rolled back
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = _one(con, "SELECT version_num FROM alembic_version", "alembic_version", names)
            n_runs = _one(con, "SELECT count(*) FROM runs", "runs", names) or 0
            n_exps = _one(con, "SELECT count(*) FROM experiments", "experiments", names) or 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:  # garbage, truncated, or not SQLite at all
        raise UserError(
            f"tracking store {uri}: {db} is not a readable SQLite database ({e}): "
            "restore it from a backup or move it aside"
        ) from None
    tmp = sorted(n for n in names if n.startswith("_alembic_tmp_"))
    missing, head = _schema_gaps(names)
    if not tmp and not missing and (head is None or version == head):
        return  # complete (or this MLflow's schema could not be read: leave it to MLflow)
    if n_runs and tmp:
        raise UserError(
            f"tracking store {uri} is half-built (an interrupted schema migration "
            f"left {tmp}) and holds {n_runs} run(s): restore it from a backup or move it aside"
        )
    if n_runs or n_exps > 1:
        return  # an older MLflow's store, with runs: MLflow upgrades it (or says why not)
    foreign = sorted(_foreign_tables(names))
    if foreign:  # someone else's database (an Optuna storage, an app's): never started again
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(
            f"tracking store {uri}: {db} is not an MLflow store (it holds other tables: "
            f"{shown}); name another file"
        )
    for suffix in ("", "-journal", "-wal", "-shm"):  # a stale journal must not reach the new one
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _one(con: Any, sql: str, table: str, names: set[str]) -> Any:
    """The single value ``sql`` reads from ``table``, None if the table is not there."""
    row = con.execute(sql).fetchone() if table in names else None
    return row[0] if row else None


def _foreign_tables(names: set[str]) -> set[str]:
    """The tables of ``names`` that no MLflow schema has (nothing when it cannot be read)."""
    try:
        from mlflow.store.db.base_sql_model import Base
    except ImportError:
        return set()
    ours = set(Base.metadata.tables) | {"alembic_version"}
    return {n for n in names - ours if not n.startswith(("_alembic_tmp_", "sqlite_"))}


def _schema_gaps(names: set[str]) -> tuple[set[str], str | None]:
    """(the tables this MLflow's schema has that ``names`` lacks, its alembic head revision);
    (nothing, None) when MLflow's schema cannot be read (its internals moved)."""
    try:
        from mlflow.store.db.base_sql_model import Base
        from mlflow.store.db.utils import _get_latest_schema_revision

        return set(Base.metadata.tables) - names, _get_latest_schema_revision()
    except (ImportError, AttributeError):
        return set(), None


def _probe(uri: str, make_client: Any) -> Any:
    """The client, after one cheap request (which creates a new store); HTTP servers get a
    10 s timeout and no retries for it."""
    http = uri.startswith(("http://", "https://"))
    saved = {k: os.environ.get(k) for k in _HTTP_PROBE_ENV}
    if http:
        os.environ.update(_HTTP_PROBE_ENV)
    try:
        client = make_client(tracking_uri=uri)  # an unknown scheme (foo://) fails here
        client.search_experiments(max_results=1)
        return client
    except Exception as e:
        first = first_line(e)
        what = "unreachable" if http else "cannot be opened"
        if "already exists" in first:  # MLflow re-running migrations over a half-built schema
            what += " (half-built: a schema migration died in it; restore it from a backup)"
        raise UserError(f"tracking store {uri} {what}: {first[:200]}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_HTTP_PROBE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
