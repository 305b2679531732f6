"""A matrix as a work queue in an Optuna storage: 2 workers, two commands sharing PostgreSQL and
an MLflow server, kill -9 of a worker, a cell under torchrun, and ``--status``. Each cell must
end FINISHED exactly once in MLflow with exactly one COMPLETE trial, and nothing RUNNING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")
optuna = pytest.importorskip("optuna")
from conftest import tiny_toml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from suite.cli import main  # noqa: E402
from suite.studies.queue import MatrixQueue, study_name  # noqa: E402
from suite.studies.storage import open_storage  # noqa: E402
from suite.studies.workers import worker_env  # noqa: E402
from suite.tracking import make_tracker  # noqa: E402

SIX = dict(models='["tnt_nano", "vit_nano", "deit_nano"]', seeds="[0, 1]")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_matrix(tmp_path: Path, name: str = "q", train_size: int = 128, epochs: int = 1, **kw):
    """The matrix ``name`` of the tiny run on the CPU (``models``, ``seeds``: TOML arrays;
    SIX by default), checkpoints under ``tmp_path``; its path."""
    opts = {**SIX, **kw}
    run = {"data.train_size": train_size, "train.epochs": epochs, "train.amp": "fp32"}
    run |= {"train.device": "cpu", "train.out_dir": f"{tmp_path}/r", "tracking.log_every": 4}
    p = tmp_path / f"{name}.toml"
    p.write_text(
        "# Question: none (a queue test). Run: tests/test_matrix_queue.py\n"
        f'[matrix]\nname = "{name}"\nmodels = {opts["models"]}\nseeds = {opts["seeds"]}\n'
        + tiny_toml(run)
    )
    return p


def cli(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "suite", *argv],
        env=env or ENV,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def matrix(cfg: Path, uri: str, *extra: str, **kw) -> subprocess.Popen:
    """``tntbench matrix CFG --tracking-uri URI ...`` as a subprocess."""
    return cli("matrix", str(cfg), "--tracking-uri", uri, *extra, **kw)


def finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return out


def opened(storage: str):
    return open_storage(storage, heartbeat_interval=2, grace_period=10, max_retry=3)


def cell_runs(uri: str, experiment: str = "q") -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'cell'") if exp else []


def assert_each_cell_once(uri: str, storage: str, cells: int, experiment: str = "q") -> dict:
    """Every cell FINISHED once in MLflow and COMPLETE once in the queue; nothing RUNNING."""
    runs = cell_runs(uri, experiment)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    hashes = [r.data.tags["cell_hash"] for r in finished]
    assert len(hashes) == cells and len(set(hashes)) == cells
    assert not [r for r in runs if r.info.status == "RUNNING"]
    study = optuna.load_study(study_name=study_name(experiment), storage=opened(storage))
    trials = study.get_trials(deepcopy=False)
    complete = [t.user_attrs["cell_hash"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(hashes)  # one COMPLETE trial per cell
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for r, t in ((r, t) for r in finished for t in trials if t.state == TrialState.COMPLETE):
        if t.user_attrs["cell_hash"] == r.data.tags["cell_hash"]:
            assert t.value == pytest.approx(r.data.metrics["val_top1"])  # top-1 told back
    parents = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name(experiment).experiment_id],
        "tags.kind = 'matrix'",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    return {r.data.tags["cell_hash"]: r for r in finished}


@pytest.fixture
def pg_databases(pg_url: str):
    """A factory of fresh, empty PostgreSQL databases (dropped afterwards)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def new() -> str:
        name = f"tntbench_{uuid.uuid4().hex[:16]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(pg_url).set(database=name).render_as_string(hide_password=False)

    try:
        yield new
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.slow
def test_two_workers_on_postgres_match_one_worker(tmp_path, pg_databases):
    storage = pg_databases()
    cfg = write_matrix(tmp_path)
    uri = f"sqlite:///{tmp_path}/two.db"
    t0 = time.monotonic()
    out = finish(matrix(cfg, uri, "--storage", storage, "--workers", "2", cwd=tmp_path))
    two_s = time.monotonic() - t0
    assert "6 ran, 0 skipped" in out and "0 failed" in out
    two = assert_each_cell_once(uri, storage, 6)
    workers = {r.data.tags["pid"] for r in two.values()}
    assert len(workers) == 2  # both workers ran cells
    # the same matrix in one process, each cell with the threads a worker had
    threads = worker_env(0, 2, 0, cuda=False)["TNTBENCH_THREADS"]
    ref_uri = f"sqlite:///{tmp_path}/one.db"
    t0 = time.monotonic()
    finish(
        matrix(cfg, ref_uri, "--no-progress", env={**ENV, "OMP_NUM_THREADS": threads}, cwd=tmp_path)
    )
    one_s = time.monotonic() - t0
    one = {r.data.tags["cell_hash"]: r for r in cell_runs(ref_uri)}
    assert one.keys() == two.keys()
    for h, r in one.items():
        a, b = r.data.metrics, two[h].data.metrics
        assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # timing is for benchmarks/bench_matrix_workers.py to judge; shown here for the log
    print(f"6 cells: 2 workers {two_s:.0f} s, 1 process {one_s:.0f} s")
    # a rerun on the same storage finds everything done: nothing runs twice
    again = finish(matrix(cfg, uri, "--storage", storage, "--workers", "2", cwd=tmp_path))
    assert "0 ran, 6 skipped" in again
    assert_each_cell_once(uri, storage, 6)


@pytest.fixture
def mlflow_server(pg_databases, start_mlflow):
    """An MLflow tracking server on loopback with a PostgreSQL backend, as a team runs one
    (start_mlflow after pg_databases: the server is killed before its database is dropped)."""
    return start_mlflow(pg_databases())[1]


@pytest.mark.slow
def test_two_commands_share_postgres_and_an_mlflow_server(tmp_path, pg_databases, mlflow_server):
    storage = pg_databases()
    cfg = write_matrix(tmp_path)
    argv = ["matrix", str(cfg), "--tracking-uri", mlflow_server, "--storage", storage]
    # two "machines": separate folders, started together
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    procs = [cli(*argv, cwd=a), cli(*argv, cwd=b)]
    outs = [finish(p) for p in procs]
    started = sum(o.count(") started") + o.count(") resumed") for o in outs)
    assert started == 6  # each cell started once, by one of the two
    assert_each_cell_once(mlflow_server, storage, 6)


@pytest.mark.slow
def test_kill9_one_of_two_workers_resumes_its_cell(tmp_path, pg_databases):
    storage = pg_databases()
    cfg = write_matrix(
        tmp_path, models='["tnt_nano", "vit_nano"]', seeds="[0]", train_size=384, epochs=3
    )
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = matrix(cfg, uri, "--storage", storage, "--workers", "2", cwd=tmp_path)

    def a_cell_past_its_first_checkpoint():
        # the suite's own client: it waits for the store the command may still be creating
        df = make_tracker(uri).runs("q", status="RUNNING", kind="cell")
        for _, r in df.iterrows() if len(df) else []:
            d = r.get("tags.checkpoint_dir")
            if isinstance(d, str) and (Path(d) / "last.pt").exists():
                return r
        return None

    try:
        deadline = time.time() + 240
        while (victim := a_cell_past_its_first_checkpoint()) is None:
            assert proc.poll() is None and time.time() < deadline, "no cell reached epoch 1"
            time.sleep(0.2)
        os.kill(int(victim["tags.pid"]), signal.SIGKILL)  # one worker, not the command
    except BaseException:
        proc.kill()
        raise
    out = finish(proc)
    assert "resumed" in out
    done = assert_each_cell_once(uri, storage, 2)
    resumed = done[victim["tags.cell_hash"]]
    assert resumed.info.run_id == victim["run_id"]  # recorded once, in its own run
    client = mlflow.MlflowClient(uri)
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "val_top1"))
    assert steps == [1, 2, 3]  # each epoch once
    study = optuna.load_study(study_name=study_name("q"), storage=opened(storage))
    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["cell_hash"] == victim["tags.cell_hash"]


@pytest.mark.slow
def test_gpus_per_cell_runs_a_cell_under_torchrun(tmp_path):
    cfg = write_matrix(tmp_path, models='["vit_nano"]', seeds="[0]")
    uri = f"sqlite:///{tmp_path}/m.db"
    storage = str(tmp_path / "q.journal")
    finish(matrix(cfg, uri, "--storage", storage, "--gpus-per-cell", "2", cwd=tmp_path))
    (run,) = cell_runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.params["global_batch"] == "64"
    assert run.data.metrics["infer_img_per_s"] > 0  # rank 0 profiled it
    assert_each_cell_once(uri, storage, 1)


@pytest.mark.slow
def test_status_shows_todo_running_and_finished(tmp_path, capsys):
    cfg = write_matrix(tmp_path, models='["vit_nano"]', seeds="[0, 1]")
    uri = f"sqlite:///{tmp_path}/m.db"
    storage = str(tmp_path / "q.journal")
    argv = ["matrix", str(cfg), "--tracking-uri", uri, "--storage", storage]
    assert main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    rows = out.strip().splitlines()
    assert rows[0].split()[:4] == ["cell", "run", "name", "state"]
    assert [r.split()[3] for r in rows[1:3]] == ["todo", "todo"] and rows[3] == "2 todo"
    # a worker (this process) holds one cell: running, with its host:pid
    from suite.studies.matrix import expand

    cells = expand(cfg).cells
    queue = MatrixQueue(storage, "q")
    queue.enqueue([(c.index, c.digest) for c in cells], set())
    popped = queue.pop()
    assert main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith(str(popped.cell)))
    assert "running" in row and f":{os.getpid()}" in row
    assert out.strip().endswith("1 running, 1 waiting")
    queue.tell(popped, None)  # given back as failed: the next run queues it again
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("2 finished")
    # a report while a group is short of its seeds (one cell's run gone, as if still running)
    from suite.outputs.report import build_report
    from suite.studies.matrix import cell_runs as finished_cells
    from suite.studies.matrix import format_summary, summarize

    tracker = make_tracker(uri)
    done = finished_cells(tracker, "q", "q")
    mlflow.MlflowClient(uri).delete_run(done["run_id"].iloc[0])
    rep = build_report(tracker, ["q"], "q", None, tmp_path / "rep")
    md = (rep.out / "report.md").read_text()
    assert "1 of 2" in md and "a partial group" in md
    summary = summarize(finished_cells(tracker, "q", "q"), seeds=2)
    assert "1 (partial)" in format_summary(summary)


def test_a_cpu_matrix_on_a_gpu_machine_splits_only_the_cores(monkeypatch):
    """Two workers of a CPU matrix on a one-GPU box: no GPU pinning, no 'needs 2 GPUs' error;
    a CUDA matrix there is refused with the count."""
    import torch

    from suite.errors import UserError
    from suite.studies.workers import on_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cpu = [SimpleNamespace(raw={"train": {"device": "cpu"}})] * 2
    auto = [SimpleNamespace(raw={"train": {}}), *cpu]
    assert not on_cuda(cpu) and on_cuda(auto)
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(1, 2, 0, cuda=False)
    assert worker_env(0, 1, 0, cuda=True)["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(UserError, match="needs 2 GPUs; this machine has 1"):
        worker_env(0, 2, 0, cuda=True)


@pytest.mark.parametrize("max_retry", [0, 1, 2])
def test_a_dead_workers_trial_comes_back_at_most_max_retry_times(tmp_path, max_retry):
    """reap_dead_workers (the matrix's and the search's one handler): a RUNNING trial whose
    worker's process is gone is failed and queued again with its parameters, ``retries``
    counting up, until it has come back ``max_retry`` times in a row."""
    import platform

    from suite.studies.storage import reap_dead_workers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that was this host's and is gone
    storage = open_storage(str(tmp_path / "q.journal"), 2, 10, max_retry)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 1.0})
    comebacks = 0
    for _ in range(max_retry + 2):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
        assert trial.params == {"x": 1.0}  # the queued parameters, not a new sample
        study._storage.set_trial_user_attr(
            trial._trial_id, "worker", f"{platform.node()}:{dead.pid}"
        )
        assert reap_dead_workers(study, max_retry, lambda t: (t.params, {})) == [trial.number]
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if not waiting:
            break
        comebacks += 1
        assert waiting[0].user_attrs == {"retry_of": trial.number, "retries": comebacks}
    assert comebacks == max_retry
    assert all(t.state == TrialState.FAIL for t in study.get_trials())
