"""Experiment tracking behind a small interface: MLflow, or a no-op for tests and dry runs.

This package is the only place that imports mlflow or names its run-table columns
(``columns``). Its modules, one job each:

- ``base``: the ``Tracker`` and ``Run`` interfaces (no-op), the read-only tracker, flat params,
  the store's URI, selecting runs by status and tags
- ``mlflow_store``: the MLflow tracker and run, the retrying client, ``make_tracker``
- ``sql``: plain-SQL reads of MLflow's database store (runs, metric histories)
- ``store``: opening a store (refusals, half-built stores, probing, SQLite tuning)
- ``ui``: ``tntbench ui``'s server and its process group
- ``columns``: the names of the run table's param, metric and tag columns
- ``env``: environment tags, git, the worker's id, whether a recorded process is gone
"""

from suite.tracking.base import (
    DEFAULT_URI,
    EXPERIMENT_MAX_CHARS,
    PARAM_MAX_CHARS,
    ReadOnlyTracker,
    Run,
    Tracker,
    filter_string,
    flatten,
    resolve_uri,
    select_runs,
)
from suite.tracking.columns import (
    is_param_col,
    is_param_or_tag_col,
    metric_col,
    param_col,
    param_key,
    tag_col,
)
from suite.tracking.env import environment_tags, git, process_is_gone, worker_id
from suite.tracking.mlflow_store import (
    HTTP_BOUNDS,
    MlflowTracker,
    bound_http_retries,
    make_tracker,
)
from suite.tracking.store import open_store, refresh_statistics, sqlite_pragmas, tune_sqlite
from suite.tracking.ui import serve_ui, ui_env

__all__ = [
    "DEFAULT_URI",
    "EXPERIMENT_MAX_CHARS",
    "HTTP_BOUNDS",
    "PARAM_MAX_CHARS",
    "MlflowTracker",
    "ReadOnlyTracker",
    "Run",
    "Tracker",
    "bound_http_retries",
    "environment_tags",
    "filter_string",
    "flatten",
    "git",
    "is_param_col",
    "is_param_or_tag_col",
    "metric_col",
    "param_col",
    "param_key",
    "tag_col",
    "make_tracker",
    "open_store",
    "process_is_gone",
    "refresh_statistics",
    "resolve_uri",
    "select_runs",
    "serve_ui",
    "sqlite_pragmas",
    "tune_sqlite",
    "ui_env",
    "worker_id",
]
