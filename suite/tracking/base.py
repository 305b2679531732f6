"""The tracking interface: ``Tracker`` and ``Run`` (the no-op ones for tests and dry runs),
the read-only tracker of torchrun's other ranks, flat params, the store's URI, and selecting
runs by status and tags."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from suite.errors import UserError
from suite.tracking.columns import is_param_or_tag_col, tag_col

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
            from suite.tracking.mlflow_store import MlflowTracker

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
        col = tag_col(k)
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
    empty = [c for c in out.columns if is_param_or_tag_col(c) and out[c].isna().all()]
    return out.drop(columns=empty)
