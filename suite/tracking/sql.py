"""Plain-SQL reads of MLflow's database store: a run table and metric histories in a few
queries, where MLflow's ORM builds an object per row."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from suite.tracking.columns import METRIC_PREFIX, PARAM_PREFIX, TAG_PREFIX

# ``runs`` on a database store reads MLflow's tables in four queries (runs, params, tags,
# latest metrics) instead of ``search_runs``, whose ORM builds an object per param, tag and
# metric: 6-7 s for 1,000 runs of the suite's shape, against a fraction of a second (issue 24;
# benchmarks/bench_scale.py). False: always ``search_runs`` (the tests compare the two).
SQL_RUNS = True


def sql_engine(client: Any) -> Any:
    """The SQLAlchemy engine behind MLflow's plain database store (SQLite, PostgreSQL,
    MySQL), for ``runs`` to read in four queries; None for a server, another store, or a
    subclass that filters what it returns (workspaces), which go through ``search_runs``.
    ``client`` is the MlflowClient."""
    if not SQL_RUNS:
        return None
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store.engine if type(store) is SqlAlchemyStore else None


def runs_by_sql(engine: Any, experiment_id: str, status: str | None, tags: Mapping) -> Any:
    """What ``search_runs`` returns for the experiment's active runs with ``status`` and tag
    values, as ``MlflowTracker.runs``'s frame: newest first (then by run ID), each run's
    params, latest metrics (NaN where MLflow stored NaN) and tags."""
    import pandas as pd

    where, args = _chosen_runs(experiment_id, status, tags)
    chosen = f"SELECT run_uuid FROM runs WHERE {where}"
    with engine.connect() as con:
        runs = _frame(
            con,
            f"SELECT run_uuid, name, status, start_time FROM runs WHERE {where} "
            "ORDER BY start_time DESC, run_uuid",
            args,
            ["run_id", "run_name", "status", "start_time"],
        )
        parts = [runs.set_index("run_id")]
        for table, prefix, value in (
            ("params", PARAM_PREFIX, "value"),
            ("latest_metrics", METRIC_PREFIX, "CASE WHEN is_nan THEN NULL ELSE value END"),
            ("tags", TAG_PREFIX, "value"),
        ):
            query = f"SELECT run_uuid, key, {value} FROM {table} WHERE run_uuid IN ({chosen})"
            long = _frame(con, query, args, ["run_id", "key", "value"])
            if table == "latest_metrics":
                long["value"] = long["value"].astype(float)  # NULL (MLflow's NaN) -> NaN
            wide = long.pivot(index="run_id", columns="key", values="value")
            parts.append(wide.add_prefix(prefix))
    if runs.empty:
        return runs
    out = pd.concat(parts, axis=1).loc[runs["run_id"]]
    out.columns.name = None
    return out.rename_axis("run_id").reset_index()


def _chosen_runs(
    experiment_id: str, status: str | None, tags: Mapping
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (on MLflow's runs table) of the experiment's active runs with
    ``status`` and tag values, and its bound arguments."""
    where = ["experiment_id = :exp", "lifecycle_stage = 'active'"]
    args: dict[str, Any] = {"exp": int(experiment_id)}
    if status is not None:
        where.append("status = :status")
        args["status"] = status
    for i, (k, v) in enumerate(tags.items()):
        where.append(f"run_uuid IN (SELECT run_uuid FROM tags WHERE key = :k{i} AND value = :v{i})")
        args[f"k{i}"], args[f"v{i}"] = k, str(v)
    return " AND ".join(where), args


def _frame(con: Any, query: str, args: dict[str, Any], columns: list[str]) -> Any:
    """A query's rows as a DataFrame with ``columns``."""
    import pandas as pd
    from sqlalchemy import text

    # rows as plain tuples: pandas probes SQLAlchemy's Row objects attribute by attribute
    return pd.DataFrame(map(tuple, con.execute(text(query), args)), columns=columns)


def histories_by_sql(engine: Any, run_ids: list[str], key: str) -> list[tuple[str, int, float]]:
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
