"""Studies at a real size (issue 24): the suite's SQLite stores in WAL mode with current
planner statistics, histories read in bulk, the report reading the store once, checkpoints
sized for studies, and ``tntbench ui`` without MLflow's job runner unless asked."""

import os
import sqlite3
from pathlib import Path

import pytest
from conftest import tiny_sets

from suite.tracking import make_tracker, refresh_statistics, select_runs


def test_new_store_is_wal_with_normal_sync_and_current_statistics(tmp_path, monkeypatch):
    import suite.tracking.store as store

    db = tmp_path / "mlflow.db"
    tracker = make_tracker(f"sqlite:///{db}")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine = tracker.client._client._tracking_client.store.engine
    with engine.connect() as c:  # MLflow's own connections commit without an fsync each
        assert c.exec_driver_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    # an existing store in rollback-journal mode stays so (only stores the suite creates)
    # (a complete MLflow store, copied out of the new one: a file without MLflow's tables is a
    # half-built store, started again as a new one)
    other = tmp_path / "theirs.db"
    con.execute("VACUUM INTO ?", (str(other),))
    sqlite3.connect(other).execute("PRAGMA journal_mode=DELETE").fetchone()
    assert sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    make_tracker(f"sqlite:///{other}")
    assert sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    monkeypatch.setattr(store, "STATS_MIN_ROWS", 50)
    ids = []
    for i in range(3):
        with tracker.run("e", f"r{i}") as run:
            run.log_metric_rows([(s, {"val_top1": 10.0 * i + s, "loss": 1.0}) for s in range(20)])
        ids.append(run.run_id)
    assert refresh_statistics(con)  # 120 rows, no statistics yet: analyzed
    stat = con.execute("SELECT stat FROM sqlite_stat1 WHERE tbl = 'metrics'").fetchone()
    assert stat is not None and int(stat[0].split()[0]) >= 100
    assert not refresh_statistics(con)  # current: not again
    with tracker.run("e", "big") as run:
        run.log_metric_rows([(s, {f"m{k}": 1.0 for k in range(10)}) for s in range(30)])
    assert refresh_statistics(con)  # grown past twice its statistics: analyzed again
    con.close()

    # the bulk read equals the per-run reads, each run's steps in order
    bulk = tracker.metric_histories([*ids, run.run_id], "val_top1")
    assert bulk == {rid: tracker.metric_history(rid, "val_top1") for rid in [*ids, run.run_id]}
    assert bulk[ids[2]] == [(s, 20.0 + s) for s in range(20)] and bulk[run.run_id] == []


def test_select_runs_and_sql_reads_match_what_mlflow_searches(tmp_path, monkeypatch):
    """``runs`` read by SQL equals MLflow's ``search_runs`` (order, params, NaN and latest
    metrics, tags, filters, deleted runs left out), and ``select_runs`` over one read equals
    the store's filters."""
    import math

    import pandas as pd

    import suite.tracking.sql as sql

    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    kinds = [("trial", "a"), ("trial", "b"), ("study", "a"), ("cell", "")]
    for i, (kind, study) in enumerate(kinds):
        with tracker.run("e", f"r{i}", {"kind": kind, "study": study}) as run:
            run.log_params({"p": i, f"only{i}": "x"})
            run.log_metric_rows([(1, {"m": 1.0 + i, "n": math.nan}), (2, {"m": 10.0 + i})])
            if i == 1:
                run.fail("x")
    with tracker.run("e", "deleted", {"kind": "trial"}) as run:
        pass
    tracker.client.delete_run(run.run_id)
    queries = [
        ((), {}),
        (("FINISHED",), {"kind": "trial"}),
        ((None,), {"kind": "trial", "study": "a"}),
        ((None,), {"kind": "nosuch"}),
    ]
    for args, tags in queries:
        by_sql = tracker.runs("e", *args, **tags)
        monkeypatch.setattr(sql, "SQL_RUNS", False)
        by_mlflow = tracker.runs("e", *args, **tags)
        monkeypatch.setattr(sql, "SQL_RUNS", True)
        assert list(by_sql["run_id"]) == list(by_mlflow["run_id"])  # newest first
        pd.testing.assert_frame_equal(
            by_sql[sorted(by_sql.columns)], by_mlflow[sorted(by_mlflow.columns)], check_dtype=False
        )
    everything = tracker.runs("e")
    assert everything["metrics.m"].tolist() == [13.0, 12.0, 11.0, 10.0]  # the latest step's
    assert everything["metrics.n"].isna().all() and len(everything) == 4
    for status, tags in [
        (None, {"kind": "trial"}),
        ("FINISHED", {"kind": "trial"}),
        (None, {"kind": "trial", "study": "a"}),
        ("FAILED", {}),
        (None, {"nosuch": "x"}),
    ]:
        want = tracker.runs("e", status, **tags)
        got = select_runs(everything, status, **tags)
        assert set(got["run_id"]) == set(want["run_id"])
        # the columns the store's own filter gives (no other runs' params and tags)
        keys = [c for c in want if c.startswith(("params.", "tags."))]
        assert sorted(c for c in got if c.startswith(("params.", "tags."))) == sorted(keys)


def test_report_reads_the_store_once(tmp_path, monkeypatch):
    """Every run of each experiment read once per report, and the learning curves in one
    bulk read (not one history query per run)."""
    from suite.outputs.report import build_report
    from suite.tracking import MlflowTracker

    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    with tracker.run("abl", "matrix/m", {"kind": "matrix", "matrix": "m"}):
        pass
    for i in range(4):
        tags = {"kind": "cell", "matrix": "m"}
        with tracker.run("abl", f"c{i}", tags) as run:
            run.log_params(
                {
                    "model.name": ["tnt_nano", "vit_nano"][i % 2],
                    "data.name": "synthetic",
                    "train.seed": i,
                }
            )
            run.log_metric_rows([(s, {"val_top1": 10.0 * s + i}) for s in range(3)])
    calls = {"runs": 0, "history": 0, "bulk": 0}
    for name, key in (
        ("runs", "runs"),
        ("metric_history", "history"),
        ("metric_histories", "bulk"),
    ):
        original = getattr(MlflowTracker, name)

        def counted(self, *a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(MlflowTracker, name, counted)
    rep = build_report(tracker, ["abl"], matrix="m", out=tmp_path / "rep")
    assert rep.tables["main"]["n"].sum() == 4 and "learning_curves" in rep.plots
    assert calls == {"runs": 1, "history": 0, "bulk": 1}  # one experiment: one read


TINY_TRAIN = tiny_sets(
    {"data.train_size": 64, "data.val_size": 32, "train.epochs": 2, "train.amp": "fp32"}
)


def _inodes(*folders):
    """(inode -> size) of every file under the folders: a hard link counts once, as on disk."""
    out = {}
    for folder in folders:
        for p in folder.rglob("*.pt"):
            st = p.stat()
            out[(st.st_dev, st.st_ino)] = st.st_size
    return out


def test_finished_run_keeps_one_weights_only_copy(tmp_path):
    """The default (train.keep_checkpoints = "best"): a FINISHED run keeps best.pt with the
    weights and what rebuilds the model, no optimizer state; MLflow's artifact is a link to
    that file, not a second copy; last.pt is gone; the size is the run's checkpoint_mb."""
    import mlflow
    import torch

    from suite.config import load_config
    from suite.training.fit import fit

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [*TINY_TRAIN, f"train.out_dir='{tmp_path / 'runs'}'"])
    r = fit(cfg, make_tracker(uri), progress=False)
    folder = Path(r.checkpoint_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt"]
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    assert set(ckpt) == {
        "model_name", "model_kwargs", "run_id", "config_toml", "model", "ema", "epoch",
        "best_top1",
    }  # fmt: skip
    assert ckpt["ema"] is None and ckpt["run_id"] == r.run_id
    n_params = sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point())
    run = mlflow.MlflowClient(uri).get_run(r.run_id)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    linked = artifacts / "checkpoints" / "best.pt"
    assert linked.is_file() and linked.stat().st_ino == (folder / "best.pt").stat().st_ino
    kept = _inodes(folder, artifacts)
    # fp32 weights are 4 bytes a parameter; names, buffers and the config add a little on a
    # model this small (TNT-S: 4.0); 12.3 with the optimizer state, 37 with three copies
    assert sum(kept.values()) / n_params <= 8.5, sum(kept.values()) / n_params
    assert run.data.metrics["checkpoint_mb"] == pytest.approx(
        (folder / "best.pt").stat().st_size / 2**20
    )


@pytest.mark.parametrize("keep", ["all", "none"])
def test_keep_checkpoints_all_and_none(tmp_path, keep):
    import torch

    from suite.config import load_config
    from suite.tracking import Tracker
    from suite.training.fit import fit

    sets = [*TINY_TRAIN, f"train.out_dir='{tmp_path / 'runs'}'", f"train.keep_checkpoints='{keep}'"]
    r = fit(load_config(None, sets), Tracker(), progress=False)
    names = sorted(p.name for p in Path(r.checkpoint_dir).iterdir())
    if keep == "none":
        assert names == []
        return
    assert names == ["best.pt", "last.pt"]
    last = torch.load(Path(r.checkpoint_dir) / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    assert last["epoch"] == 2


def test_interrupted_run_keeps_last_pt_and_resumes_and_best_pt_does_not_resume(tmp_path):
    from suite.config import load_config
    from suite.errors import UserError
    from suite.tracking import Tracker
    from suite.training.fit import fit

    cfg = load_config(None, [*TINY_TRAIN, f"train.out_dir='{tmp_path / 'runs'}'"])

    def stop(epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, Tracker(), on_epoch=stop, progress=False)
    (folder,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]
    with pytest.raises(UserError, match="weights only"):
        fit(cfg, Tracker(), resume=str(folder / "best.pt"), progress=False)
    done = fit(cfg, Tracker(), resume=str(folder), progress=False)
    assert len(done.history) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt"]  # finished: last.pt dropped


def test_keep_checkpoints_is_validated():
    from suite.config import load_config
    from suite.errors import UserError

    with pytest.raises(UserError, match="train.keep_checkpoints"):
        load_config(None, ["train.keep_checkpoints='some'"])


@pytest.mark.parametrize(("argv", "value"), [([], "false"), (["--jobs"], "true")])
def test_ui_runs_mlflow_jobs_only_with_the_flag(tmp_path, monkeypatch, argv, value):
    """The server ``tntbench ui`` starts gets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false unless
    --jobs, whatever the caller's environment says."""
    import subprocess

    import suite.tracking.ui as ui
    from suite.cli import main

    started = []

    class FakeServer:
        pid = -1

        def __init__(self, cmd, **kwargs):
            started.append((cmd, kwargs))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true" if value == "false" else "0")
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    monkeypatch.setattr(ui, "_stop_group", lambda proc: None)
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["ui", "--tracking-uri", uri, "--port", "5999", *argv]) == 0
    ((cmd, kwargs),) = started
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert kwargs["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == value
    assert kwargs["env"]["PATH"] == os.environ["PATH"]  # the rest of the environment as is


def test_report_status_and_rerun_on_hundreds_of_cloned_runs(tmp_path):
    """A store shaped like the suite's own at a few hundred runs (benchmarks/bench_scale.py's
    clones of a real cell and a real trial): every cloned cell is the matrix's own (status
    counts them finished, a rerun skips them all), the report's rows add up and its
    importances come from the cloned trials' float lr."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_scale

    from suite.outputs.report import build_report
    from suite.studies.matrix import run_matrix
    from suite.studies.workers import count_states, status_table

    n = 300
    template, _ = bench_scale.build_template(tmp_path, epochs=20)
    uri, m, _ = bench_scale.build_store(tmp_path, template, n)
    tracker = make_tracker(uri)
    table = status_table(m, tracker, bench_scale.TINY, None)
    assert count_states(table) == f"{n} finished"
    reads = []
    original = type(tracker).runs

    def counted(self, *a, **k):
        reads.append((a, k))
        return original(self, *a, **k)

    type(tracker).runs = counted
    try:
        res = run_matrix(m, tracker, bench_scale.TINY, progress=False)
    finally:
        type(tracker).runs = original
    assert (res.ran, res.skipped, res.failed) == (0, n, 0)
    assert len(reads) == 1 and len(res.runs) == n  # a finished matrix's rerun: one read
    rep = build_report(tracker, out=tmp_path / "rep")
    assert rep.tables["main"]["n"].sum() == n
    best = rep.tables[f"search_{bench_scale.STUDY}_best"]
    assert f"{n} complete" in best.attrs["note"]
    imp = rep.tables[f"search_{bench_scale.STUDY}_importances"]
    assert set(imp["param"]) == {"model.inner_heads", "train.lr"}
    assert imp.iloc[0]["param"] == "model.inner_heads"  # top-1 moves 5 points a head step
    curves = tracker.metric_histories(list(res.runs["run_id"][:3]), "val_top1")
    assert all(steps[-1][0] == 20 for steps in curves.values())  # stretched to 20 epochs


def test_a_new_optuna_sqlite_storage_starts_in_wal(tmp_path):
    """The search's own SQLite storage: WAL, synchronous=NORMAL on Optuna's connections."""
    from suite.studies.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", 10, 30, 2)
    con = sqlite3.connect(tmp_path / "optuna.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
