"""Studies at a real size (issue 24): the suite's SQLite stores in WAL mode with current
planner statistics, histories read in bulk, the report reading the store once, checkpoints
sized for studies, and ``tntbench ui`` without MLflow's job runner unless asked."""

import sqlite3

from suite.tracking import make_tracker, refresh_statistics, select_runs


def test_new_store_is_wal_with_normal_sync_and_current_statistics(tmp_path, monkeypatch):
    import suite.tracking as tracking

    db = tmp_path / "mlflow.db"
    tracker = make_tracker(f"sqlite:///{db}")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine = tracker.client._client._tracking_client.store.engine
    with engine.connect() as c:  # MLflow's own connections commit without an fsync each
        assert c.exec_driver_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    # an existing store in rollback-journal mode stays so (only stores the suite creates)
    other = tmp_path / "theirs.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    make_tracker(f"sqlite:///{other}")
    assert sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    monkeypatch.setattr(tracking, "STATS_MIN_ROWS", 50)
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


def test_select_runs_matches_what_the_store_filters(tmp_path):
    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    for i, (kind, study) in enumerate(
        [("trial", "a"), ("trial", "b"), ("study", "a"), ("cell", "")]
    ):
        with tracker.run("e", f"r{i}", {"kind": kind, "study": study}) as run:
            if i == 1:
                run.fail("x")
    everything = tracker.runs("e")
    for status, tags in [
        (None, {"kind": "trial"}),
        ("FINISHED", {"kind": "trial"}),
        (None, {"kind": "trial", "study": "a"}),
        ("FAILED", {}),
        (None, {"nosuch": "x"}),
    ]:
        want = set(tracker.runs("e", status, **tags)["run_id"])
        assert set(select_runs(everything, status, **tags)["run_id"]) == want


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
