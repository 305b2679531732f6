"""Experiment tracking behind a small interface: MLflow, or a no-op for tests and dry runs.

This is the only module that imports mlflow.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from suite.errors import UserError, redact, redact_data, unredacted_for_connect

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's limits: a param value's length and an experiment name's
PARAM_MAX_CHARS = 6000
EXPERIMENT_MAX_CHARS = 500


def resolve_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an SQLite file in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: nested config as flat MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Run:
    """One tracked run. The no-op base class is what tests and untracked runs use."""

    run_id: str = ""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_metric_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, link: bool = False
    ) -> None:
        """Copy the file into the run's artifacts; with ``link``, a hard link to it instead
        where the artifacts are a local folder on the same disk (one copy of a checkpoint)."""

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_dataset(self, info: Any, context: str) -> None: ...

    def log_model(self, model: Any, name: str = "model") -> None: ...

    def start_system_metrics(self) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def fail(self, error: str, status: str = "FAILED") -> None:
        """End the run now as FAILED (or KILLED) with ``error`` as a tag; the ``with`` block
        that opened it then leaves it so."""
        self.ended = True


class Tracker:
    """Starts runs; the no-op tracker returns no-op runs."""

    uri: str = ""

    @contextmanager
    def run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ) -> Iterator[Run]:
        yield Run()

    def get_run(self, run_id: str) -> Any:
        raise LookupError("tracking is off: no runs to look up")

    def experiment_names(self) -> list[str]:
        return []

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return []

    def metric_histories(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        """``key``'s (step, value) history of each run, read in as few queries as the store
        allows (one per metric and 500 runs on a database store, not one per run)."""
        return {rid: self.metric_history(rid, key) for rid in run_ids}

    def attach(self, run_id: str) -> Run:
        """An existing run, to log more onto it (its status is left as it is)."""
        return Run()

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        """Paths of the files under ``path`` in the run's artifacts (recursively)."""
        return []

    def download_artifacts(self, run_id: str, path: str, dst: str | Path) -> Path:
        raise LookupError("tracking is off: no artifacts to download")

    def runs(self, experiment: str, status: str | None = None, **tags: str) -> Any:
        """Runs of ``experiment`` as a pandas DataFrame: run_id, run_name, status, start_time,
        and one column per param (``params.x``), metric (``metrics.x``) and tag (``tags.x``);
        only those with ``status`` (FINISHED, RUNNING, ...) and the given tag values."""
        import pandas as pd

        return pd.DataFrame(columns=["run_id", "run_name", "status", "start_time"])

    def checkpoint_from_uri(self, uri: str, dst: str | Path | None = None) -> Path:
        raise UserError(f"{uri}: tracking is off, so MLflow URIs cannot be read")

    def read_only(self) -> Tracker:
        """This tracker for a torchrun rank other than 0: lookups go to the store, runs are
        no-ops (only rank 0 records). The no-op tracker has nothing to look up anyway."""
        return self


class ReadOnlyTracker(Tracker):
    """The store's lookups (a run's tags, metric history, artifacts) without recording:
    what torchrun's other ranks need to resume a cut-short run, whose checkpoint folder only
    the store knows. The store is opened on the first lookup, so that ranks which never look
    anything up never race rank 0 creating it."""

    def __init__(self, uri: str | None = None, real: Tracker | None = None) -> None:
        self.uri = resolve_uri(uri) if real is None else real.uri
        self._real = real

    def _store(self) -> Tracker:
        if self._real is None:
            self._real = MlflowTracker(self.uri)
        return self._real

    def get_run(self, run_id: str) -> Any:
        return self._store().get_run(run_id)

    def experiment_names(self) -> list[str]:
        return self._store().experiment_names()

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self._store().metric_history(run_id, key)

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        return self._store().list_artifacts(run_id, path)

    def download_artifacts(self, run_id: str, path: str, dst: str | Path) -> Path:
        return self._store().download_artifacts(run_id, path, dst)

    def runs(self, experiment: str, status: str | None = None, **tags: str) -> Any:
        return self._store().runs(experiment, status, **tags)

    def checkpoint_from_uri(self, uri: str, dst: str | Path | None = None) -> Path:
        return self._store().checkpoint_from_uri(uri, dst)


def filter_string(status: str | None = None, **tags: str) -> str:
    """An MLflow search filter: ``attributes.status`` and ``tags.<key>`` equal to the values,
    each quoted so that any value (quotes included) is matched literally."""
    parts = [f"tags.{k} = {_quote(str(v))}" for k, v in tags.items()]
    if status is not None:
        parts.append(f"attributes.status = {_quote(status)}")
    return " and ".join(parts)


def _quote(value: str) -> str:
    # MLflow's filter parser takes '...' or "..." and has no escape inside either
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"{value!r}: a name with both ' and \" cannot be searched for in MLflow")


def select_runs(runs: Any, status: str | None = None, **tags: str) -> Any:
    """The rows of a ``Tracker.runs`` frame that ``runs(experiment, status, **tags)`` would have
    returned: a command that needs several subsets reads the store once and selects here."""
    mask = runs["status"] == status if status is not None else runs["run_id"].notna()
    for k, v in tags.items():
        col = f"tags.{k}"
        if col not in runs:
            mask &= False
            break
        mask &= runs[col] == str(v)
    out = runs[mask].reset_index(drop=True)
    if out.empty:  # as the store answers no runs: the four columns alone
        return out[["run_id", "run_name", "status", "start_time"]]
    # as the store would: no column for a param or tag none of the selected runs has (a
    # study's params.search.storage is not a trial's searched parameter); params and tags
    # are strings, so an empty column is a missing key (a metric may be NaN: kept)
    empty = [c for c in out.columns if c.startswith(("params.", "tags.")) and out[c].isna().all()]
    return out.drop(columns=empty)


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


def _is_unique_violation(e: BaseException) -> bool:
    """SQLAlchemy's IntegrityError (SQLite, PostgreSQL), as MLflow passes it on."""
    from sqlalchemy.exc import IntegrityError

    return any(isinstance(x, IntegrityError) for x in _causes(e))


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
        db = _sqlite_path(self.uri)
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
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
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
                for rid, step, value in _histories_by_sql(engine, chunk, key):
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
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{uri}: no checkpoint to read there ({first[:200]})") from None

    def runs(self, experiment: str, status: str | None = None, **tags: str) -> Any:
        import pandas as pd

        where = filter_string(status, **tags)

        exp = self.client.get_experiment_by_name(experiment)
        engine = self._sql_engine()
        if exp is not None and engine is not None:
            return _runs_by_sql(engine, exp.experiment_id, status, tags)
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
                    row.update({f"params.{k}": v for k, v in r.data.params.items()})
                    row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
                    row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
                    rows.append(row)
                token = page.token
                if not token:
                    break
        return pd.DataFrame(
            rows, columns=None if rows else ["run_id", "run_name", "status", "start_time"]
        )

    def _sql_engine(self) -> Any:
        """The SQLAlchemy engine behind MLflow's plain database store (SQLite, PostgreSQL,
        MySQL), for ``runs`` to read in four queries; None for a server, another store, or a
        subclass that filters what it returns (workspaces), which go through ``search_runs``."""
        if not SQL_RUNS:
            return None
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(self.client._client, "_tracking_client", None), "store", None)
        return store.engine if type(store) is SqlAlchemyStore else None


# ``runs`` on a database store reads MLflow's tables in four queries (runs, params, tags,
# latest metrics) instead of ``search_runs``, whose ORM builds an object per param, tag and
# metric: 6-7 s for 1,000 runs of the suite's shape, against a fraction of a second (issue 24;
# benchmarks/bench_scale.py). False: always ``search_runs`` (the tests compare the two).
SQL_RUNS = True


def _runs_by_sql(engine: Any, experiment_id: str, status: str | None, tags: Mapping) -> Any:
    """What ``search_runs`` returns for the experiment's active runs with ``status`` and tag
    values, as ``MlflowTracker.runs``'s frame: newest first (then by run ID), each run's
    params, latest metrics (NaN where MLflow stored NaN) and tags."""
    import pandas as pd
    from sqlalchemy import text

    where = ["experiment_id = :exp", "lifecycle_stage = 'active'"]
    args: dict[str, Any] = {"exp": int(experiment_id)}
    if status is not None:
        where.append("status = :status")
        args["status"] = status
    for i, (k, v) in enumerate(tags.items()):
        where.append(f"run_uuid IN (SELECT run_uuid FROM tags WHERE key = :k{i} AND value = :v{i})")
        args[f"k{i}"], args[f"v{i}"] = k, str(v)
    chosen = f"SELECT run_uuid FROM runs WHERE {' AND '.join(where)}"
    with engine.connect() as con:
        # rows as plain tuples: pandas probes SQLAlchemy's Row objects attribute by attribute
        runs = pd.DataFrame(
            map(
                tuple,
                con.execute(
                    text(
                        f"SELECT run_uuid, name, status, start_time FROM runs WHERE "
                        f"{' AND '.join(where)} ORDER BY start_time DESC, run_uuid"
                    ),
                    args,
                ),
            ),
            columns=["run_id", "run_name", "status", "start_time"],
        )
        parts = [runs.set_index("run_id")]
        for table, prefix, value in (
            ("params", "params.", "value"),
            ("latest_metrics", "metrics.", "CASE WHEN is_nan THEN NULL ELSE value END"),
            ("tags", "tags.", "value"),
        ):
            rows = con.execute(
                text(f"SELECT run_uuid, key, {value} FROM {table} WHERE run_uuid IN ({chosen})"),
                args,
            )
            long = pd.DataFrame(map(tuple, rows), columns=["run_id", "key", "value"])
            if table == "latest_metrics":
                long["value"] = long["value"].astype(float)  # NULL (MLflow's NaN) -> NaN
            wide = long.pivot(index="run_id", columns="key", values="value")
            parts.append(wide.add_prefix(prefix))
    if runs.empty:
        return runs
    out = pd.concat(parts, axis=1).loc[runs["run_id"]]
    out.columns.name = None
    return out.rename_axis("run_id").reset_index()


def _histories_by_sql(engine: Any, run_ids: list[str], key: str) -> list[tuple[str, int, float]]:
    """(run ID, step, value) of ``key`` for the runs, in the order of MLflow's bulk history
    (run, timestamp, step, value); NaN where MLflow stored NaN."""
    from sqlalchemy import bindparam, text

    query = text(
        "SELECT run_uuid, step, CASE WHEN is_nan THEN NULL ELSE value END FROM metrics "
        "WHERE key = :key AND run_uuid IN :ids ORDER BY run_uuid, timestamp, step, value"
    ).bindparams(bindparam("ids", expanding=True))
    with engine.connect() as con:
        rows = con.execute(query, {"key": key, "ids": list(run_ids)})
        return [(r, int(s), math.nan if v is None else float(v)) for r, s, v in rows]


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
    db = _sqlite_path(uri)
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
        tune_sqlite(db, created=new)
        try:
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
        else:
            refresh_statistics(con)
    except sqlite3.DatabaseError:  # busy beyond the timeout, or not a database (the probe says)
        pass
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


def _sqlite_path(uri: str) -> Path | None:
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
    for suffix in ("", "-journal", "-wal", "-shm"):  # a stale journal must not reach the new one
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _one(con: Any, sql: str, table: str, names: set[str]) -> Any:
    """The single value ``sql`` reads from ``table``, None if the table is not there."""
    row = con.execute(sql).fetchone() if table in names else None
    return row[0] if row else None


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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
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


def make_tracker(uri: str | None = None, enabled: bool = True, rank: int = 0) -> Tracker:
    """The store's tracker; the no-op one when tracking is off; for a torchrun rank other than
    0, lookups only (``ReadOnlyTracker``: only rank 0 records)."""
    if not enabled:
        return Tracker()
    return MlflowTracker(uri) if rank == 0 else ReadOnlyTracker(uri)
