"""The MLflow-backed tracker and run, the client that retries a locked SQLite store, and the
bounds on MLflow's HTTP retries."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from suite.errors import UserError, first_line, redact, redact_data, unredacted_for_connect
from suite.tracking.base import (
    EXPERIMENT_MAX_CHARS,
    PARAM_MAX_CHARS,
    ReadOnlyTracker,
    Run,
    Tracker,
    filter_string,
    resolve_uri,
)
from suite.tracking.columns import metric_col, param_col, tag_col
from suite.tracking.sql import histories_by_sql, runs_by_sql, sql_engine
from suite.tracking.store import open_store, sqlite_path


class _MlflowRun(Run):
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for k, v in params.items():
            text = redact(str(v))  # a storage or tracking URL's password never reaches the store
            if len(text) > PARAM_MAX_CHARS:  # MLflow refuses longer: a hash, and say so
                digest = hashlib.sha256(text.encode()).hexdigest()[:16]
                print(
                    f"warning: param {k} is {len(text):,} characters, over MLflow's "
                    f"{PARAM_MAX_CHARS:,}: logged as its sha256 {digest}; the full value is in "
                    "the config.toml artifact",
                    file=sys.stderr,
                )
                text = f"sha256:{digest} ({len(text)} chars; see config.toml)"
            items.append(Param(k, text))
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metric_rows([(step or 0, metrics)])

    def log_metric_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Many steps' metrics in as few requests as MLflow allows (1000 metrics each).

        Synchronous on purpose: the trainer calls this once per epoch, after the timed loop,
        where one batched request costs milliseconds; MLflow's asynchronous queue instead
        costs up to a second per run in its shutdown (measured, benchmarks/bench_tracking.py).
        """
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for step, m in rows for k, v in m.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items, synchronous=True)

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, link: bool = False
    ) -> None:
        if link and self._link_artifact(Path(path), artifact_path):
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _link_artifact(self, path: Path, artifact_path: str | None) -> bool:
        """Hard-link ``path`` into a local artifact folder (what MLflow's local repository's
        copy would be, byte for byte, without a second copy on disk); False where the
        artifacts are elsewhere (a server, S3) or the link fails (another disk)."""
        from urllib.parse import urlparse

        from mlflow.utils.file_utils import local_file_uri_to_path

        uri = self.client.get_run(self.run_id).info.artifact_uri
        if urlparse(uri).scheme not in ("", "file"):
            return False
        dst = Path(local_file_uri_to_path(uri)) / (artifact_path or "") / path.name
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            os.link(path, dst)
        except OSError:
            return False
        return True

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, redact_data(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dataset(self, info: Any, context: str) -> None:
        """A ``DataInfo`` (suite.training.data) as an MLflow dataset input: name, digest,
        source, size."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource(
            tags={"source": info.source, "train_size": info.train_size, "val_size": info.val_size}
        )
        ds = MetaDataset(source, name=info.name, digest=info.digest)
        tag = InputTag("mlflow.data.context", context)
        entry = DatasetInput(ds._to_mlflow_entity(), [tag])
        # Parallel workers may insert the same dataset record at once: one wins, the other's
        # unique-constraint error means it exists now, and logging again links to it.
        for attempt in range(4):
            try:
                self.client.log_inputs(self.run_id, datasets=[entry])
                return
            except Exception as e:
                if not _is_unique_violation(e) or attempt == 3:
                    raise
                time.sleep(0.05 * 2**attempt)

    def log_model(self, model: Any, name: str = "model") -> None:
        import mlflow

        mlflow.set_tracking_uri(self.client.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name=name)

    def start_system_metrics(self) -> None:
        """CPU/memory (psutil) and GPU (pynvml) sampled in a background thread by MLflow."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=5, tracking_uri=self.client.tracking_uri
            )
            self._monitor.start()
        except Exception as e:  # a missing psutil/pynvml must not stop training
            self.set_tags({"system_metrics_error": str(e)[:500]})

    def fail(self, error: str, status: str = "FAILED") -> None:
        self.set_tags({"error": error[:5000]})
        self.end(status)
        self.ended = True

    def end(self, status: str = "FINISHED") -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.finish()
        # set_terminated also drains MLflow's asynchronous queue, if anything used it
        self.client.set_terminated(self.run_id, status=status)


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    """``e``, what caused it, and so on, each with SQLAlchemy's wrapped driver error
    (``.orig``): how MLflow passes a database error on."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        if isinstance(orig, BaseException):
            yield orig
        e = e.__cause__ or e.__context__


def _is_server_lost(e: BaseException) -> bool:
    """A tracking server that stopped answering (refused, timed out, or 5xx until MLflow's
    retries ran out): MLflow raises a bare MlflowException whose context is requests'
    error."""
    import requests

    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    return any(isinstance(x, (*lost, requests.exceptions.RetryError)) for x in _causes(e))


def _record_end(run: _MlflowRun, error: str, status: str) -> None:
    """End ``run`` with ``status`` and ``error``, on the way out of an exception: a server
    lost meanwhile cannot record it, and must not bury the exception under its own."""
    try:
        run.set_tags({"error": error})
        run.end(status)
    except Exception as e:
        if not _is_server_lost(e):
            raise


# MLflow retries an HTTP request 7 times with doubling back-off (and a 120 s timeout each):
# a server killed mid-run blocked training for 511 s before the error. The suite's calls wait
# about 10 s for a server that is gone (refused), ~1 min for one that hangs; a user's own
# settings of these variables win.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def bound_http_retries() -> None:
    for k, v in HTTP_BOUNDS.items():
        os.environ.setdefault(k, v)


# what a tracking server's answer says when its database refused a duplicate row
_UNIQUE_TEXTS = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed")


def _is_unique_violation(e: BaseException) -> bool:
    """SQLAlchemy's IntegrityError (SQLite, PostgreSQL), as MLflow passes it on; through a
    tracking server, its REST error, which carries only the database's message."""
    from sqlalchemy.exc import IntegrityError

    return any(
        isinstance(x, IntegrityError) or any(t in str(x) for t in _UNIQUE_TEXTS) for x in _causes(e)
    )


def _is_sqlite_busy(e: BaseException | None) -> bool:
    """SQLite's SQLITE_BUSY or SQLITE_LOCKED, however MLflow and SQLAlchemy wrapped it."""
    import sqlite3

    busy = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return any(
        isinstance(x, sqlite3.OperationalError) and x.sqlite_errorcode in busy for x in _causes(e)
    )


class _RetryingClient:
    """MlflowClient whose calls retry, with backoff, when SQLite says "database is locked"
    (parallel search workers writing to one local store)."""

    def __init__(self, client: Any, tries: int = 8) -> None:
        self._client, self._tries = client, tries

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for i in range(self._tries):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if not _is_sqlite_busy(e) or i == self._tries - 1:
                        raise
                    time.sleep(0.05 * 2**i)

        return call


class MlflowTracker(Tracker):
    def __init__(self, uri: str | None = None) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow's INFO lines (database creation, migrations) are noise on a user's terminal
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = resolve_uri(unredacted_for_connect(uri) if uri else uri)
        if self.uri.startswith(("http://", "https://")):
            bound_http_retries()
        self.client = _RetryingClient(open_store(self.uri, MlflowClient))

    def experiment_id(self, name: str) -> str:
        if len(name) > EXPERIMENT_MAX_CHARS:
            raise UserError(
                f"experiment name of {len(name)} characters: MLflow takes at most "
                f"{EXPERIMENT_MAX_CHARS} (tracking.experiment)"
            )
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":  # restoring it unasked would revive its runs
                raise UserError(
                    f"MLflow experiment {name!r} was deleted in {self.uri}: restore it "
                    f"(MLFLOW_TRACKING_URI={self.uri} mlflow experiments restore "
                    f"--experiment-id {exp.experiment_id}) or pick another tracking.experiment"
                )
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=self._artifact_location(name))

    def _artifact_location(self, experiment: str) -> str | None:
        """On an SQLite store, artifacts go beside the store (``<store dir>/mlruns/...``), not
        into ``./mlruns`` of whatever folder the command ran in; servers choose their own."""
        db = sqlite_path(self.uri)
        if db is None:
            return None
        digest = hashlib.sha256(experiment.encode()).hexdigest()[:12]
        return (db.resolve().parent / "mlruns" / digest).as_uri()

    @contextmanager
    def run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ) -> Iterator[Run]:
        """A new run, or with ``run_id`` the same run reopened (``--resume``)."""
        all_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            run = _MlflowRun(self.client, run_id)
            run.set_tags(all_tags)
            if "error" in self.client.get_run(run_id).data.tags:  # a failure that is over now
                self.client.delete_tag(run_id, "error")
        else:
            exp_id = self.experiment_id(experiment)
            r = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
            run = _MlflowRun(self.client, r.info.run_id)
        try:
            yield run
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as suite.errors.Terminated
            _record_end(run, f"interrupted ({e or 'KeyboardInterrupt'})", "KILLED")
            raise
        except BaseException as e:
            if _is_server_lost(e):  # nothing can be recorded there: say so in one line
                first = first_line(e)
                raise UserError(
                    f"tracking server {self.uri} unreachable mid-run ({first[:300]}): run "
                    f"{run.run_id} stays RUNNING there with its checkpoint kept; once the "
                    f"server is back, resume it (tntbench train --resume {run.run_id}, or "
                    "rerun the matrix)"
                ) from None
            # an exception may name its own status (a pruned search trial ends KILLED)
            _record_end(run, f"{type(e).__name__}: {e}"[:5000], getattr(e, "run_status", "FAILED"))
            raise
        else:
            if not getattr(run, "ended", False):
                run.end("FINISHED")

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def experiment_names(self) -> list[str]:
        return [e.name for e in self.client.search_experiments()]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def metric_histories(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        # MLflow's client has no bulk history call, its database store has (the server's
        # get-history-bulk): used where the store is one, else one request per run
        store = getattr(getattr(self.client._client, "_tracking_client", None), "store", None)
        bulk = getattr(store, "get_metric_history_bulk", None)
        engine = self._sql_engine()
        if bulk is None and engine is None:
            return super().metric_histories(run_ids, key)
        out: dict[str, list[tuple[int, float]]] = {rid: [] for rid in run_ids}
        for i in range(0, len(run_ids), 500):  # well under SQLite's bound parameters
            chunk = run_ids[i : i + 500]
            if engine is not None:  # plain rows: the ORM's objects cost 60 us a point
                for rid, step, value in histories_by_sql(engine, chunk, key):
                    out[rid].append((step, value))
                continue
            for m in bulk(chunk, key, max_results=2**31 - 1):
                out[m.run_id].append((m.step, m.value))
        return out

    def attach(self, run_id: str) -> Run:
        return _MlflowRun(self.client, run_id)

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        out = []
        for f in self.client.list_artifacts(run_id, path or None):
            out.extend(self.list_artifacts(run_id, f.path) if f.is_dir else [f.path])
        return out

    def download_artifacts(self, run_id: str, path: str, dst: str | Path) -> Path:
        # one progress bar per file is noise in a report's output (set it to true to see them)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def read_only(self) -> Tracker:
        return ReadOnlyTracker(real=self)

    def checkpoint_from_uri(self, uri: str, dst: str | Path | None = None) -> Path:
        """The checkpoint file behind ``runs:/<run id>[/<artifact path>.pt]`` or
        ``models:/<name>/<version or @alias>`` (the registered model's source run), downloaded
        into ``dst`` (default: a new temporary folder, the caller's to remove): the run's
        ``checkpoints/best.pt`` artifact unless the URI names a ``.pt`` file."""
        try:
            if uri.startswith("models:/"):
                name, _, ref = uri.removeprefix("models:/").partition("/")
                if ref.startswith("@"):
                    mv = self.client.get_model_version_by_alias(name, ref[1:])
                else:
                    mv = self.client.get_model_version(name, ref)
                run_id, path = mv.run_id, ""
            else:
                run_id, _, path = uri.removeprefix("runs:/").partition("/")
            path = path if path.endswith(".pt") else "checkpoints/best.pt"
            dst = Path(dst or tempfile.mkdtemp(prefix="tntbench-teacher-"))
            return self.download_artifacts(run_id, path, dst)
        except UserError:
            raise
        except Exception as e:
            first = first_line(e)
            raise UserError(f"{uri}: no checkpoint to read there ({first[:200]})") from None

    def runs(self, experiment: str, status: str | None = None, **tags: str) -> Any:
        import pandas as pd

        where = filter_string(status, **tags)

        exp = self.client.get_experiment_by_name(experiment)
        engine = self._sql_engine()
        if exp is not None and engine is not None:
            return runs_by_sql(engine, exp.experiment_id, status, tags)
        rows = []
        if exp is not None:
            token = None
            while True:
                page = self.client.search_runs(
                    [exp.experiment_id], where, max_results=1000, page_token=token
                )
                for r in page:
                    row = {
                        "run_id": r.info.run_id,
                        "run_name": r.info.run_name,
                        "status": r.info.status,
                        "start_time": r.info.start_time,
                    }
                    row.update({param_col(k): v for k, v in r.data.params.items()})
                    row.update({metric_col(k): v for k, v in r.data.metrics.items()})
                    row.update({tag_col(k): v for k, v in r.data.tags.items()})
                    rows.append(row)
                token = page.token
                if not token:
                    break
        return pd.DataFrame(
            rows, columns=None if rows else ["run_id", "run_name", "status", "start_time"]
        )

    def _sql_engine(self) -> Any:
        """The database engine ``runs`` and ``metric_histories`` read by plain SQL, or None."""
        return sql_engine(self.client._client)


# ``runs`` on a database store reads MLflow's tables in four queries (runs, params, tags,
# latest metrics) instead of ``search_runs``, whose ORM builds an object per param, tag and


def make_tracker(uri: str | None = None, enabled: bool = True, rank: int = 0) -> Tracker:
    """The store's tracker; the no-op one when tracking is off; for a torchrun rank other than
    0, lookups only (``ReadOnlyTracker``: only rank 0 records)."""
    if not enabled:
        return Tracker()
    return MlflowTracker(uri) if rank == 0 else ReadOnlyTracker(uri)
