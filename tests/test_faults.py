"""Crashes and races: kill -9 of train, matrix and search workers, SIGTERM of train and of a
matrix with workers, two processes creating one store, a checkpoint write that fails, planted
pickles. After each, nothing is left RUNNING, nothing is recorded twice, and what was recorded
is intact.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
optuna = pytest.importorskip("optuna")
from conftest import (  # noqa: E402
    Evil,
    answers,
    free_port,
    kill_group,
    tiny_toml,
    wait_until_answers,
)
from optuna.trial import TrialState  # noqa: E402

from suite.cli import main  # noqa: E402

# kill -9 and SIGTERM of train, matrix and search processes, waiting on their checkpoints
pytestmark = pytest.mark.slow

SETS = [
    "data.train_size=384",
    "data.val_size=64",
    "train.batch_size=32",
    "model.depth=1",
    "train.amp='fp32'",
    "tracking.system_metrics=false",
    "train.device='cpu'",
    "tracking.log_every=4",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sets(*extra: str) -> list[str]:
    return [a for s in (*SETS, *extra) for a in ("--set", s)]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def kill9(proc: subprocess.Popen, pid: int | None = None) -> None:
    os.kill(pid or proc.pid, signal.SIGKILL)
    if pid is None or pid == proc.pid:
        proc.wait(timeout=30)


def runs(uri: str, filter_string: str = "") -> list:
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string) if ids else []


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "val_top1"))


def checkpoint_epoch(folder: Path) -> int:
    try:
        return int(torch.load(folder / "last.pt", weights_only=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return 0


def start(argv: list[str], tmp_path: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``tntbench ARGV`` in its own process; stderr as text when piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "suite", *argv],
        env=ENV,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def train_into_epoch_2(tmp_path: Path, stderr=subprocess.DEVNULL):
    """A 4-epoch ``tntbench train`` started and waited for until it is into epoch 2 (epoch 1's
    checkpoint written): (its store URI, argv, process, MLflow run). Killed if the wait fails."""
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = [
        "train",
        "--tracking-uri",
        uri,
        *sets("train.epochs=4", f"train.out_dir='{tmp_path}/r'"),
    ]
    assert runs(uri) == []  # the store made before the command: polling it races no creation
    proc = start(argv, tmp_path, stderr)
    try:
        run = wait_for(lambda: runs(uri), 120, "the run to start", proc)[0]
        folder = Path(wait_for(lambda: runs(uri)[0].data.tags.get("checkpoint_dir"), 60, "tags"))
        wait_for(lambda: checkpoint_epoch(folder) >= 1, 120, "epoch 1's checkpoint", proc)
    except BaseException:
        kill9(proc)
        raise
    time.sleep(0.3)  # into epoch 2
    return uri, argv, proc, run


def test_kill9_train_mid_epoch_then_resume(tmp_path):
    uri, argv, proc, run = train_into_epoch_2(tmp_path)
    kill9(proc)
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status == "RUNNING"
    assert main([*argv, "--resume", run.info.run_id]) == 0
    (after,) = runs(uri)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert epochs_logged(uri, run.info.run_id) == [1, 2, 3, 4]  # each epoch once
    assert "error" not in after.data.tags


def test_sigterm_train_mid_epoch_ends_the_run_killed_then_resume(tmp_path):
    """What timeout, a scheduler's preemption or kill send: the run ends KILLED with its
    checkpoint, one line on stderr, exit 143; --resume then finishes it."""
    uri, argv, proc, run = train_into_epoch_2(tmp_path, stderr=subprocess.PIPE)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 143, err[-2000:]
    assert (
        "Traceback" not in err and err.strip().splitlines()[-1] == "tntbench: terminated (SIGTERM)"
    )
    killed = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and "SIGTERM" in killed.data.tags["error"]
    assert main([*argv, "--resume", run.info.run_id]) == 0
    (after,) = runs(uri)
    assert after.info.status == "FINISHED" and "error" not in after.data.tags
    assert epochs_logged(uri, run.info.run_id) == [1, 2, 3, 4]  # each epoch once


# the tiny run, longer (384 images, 3 epochs: time to kill a cell mid-run), on the CPU
LONGER = {"data.train_size": 384, "train.epochs": 3, "train.amp": "fp32", "train.device": "cpu"}


def matrix_toml(tmp: Path) -> str:
    """Two one-seed cells of the longer tiny run, checkpoints under ``tmp``."""
    return (
        "# Question: none (a fault test). Run: tests/test_faults.py\n"
        '[matrix]\nname = "faults"\nmodels = ["tnt_nano", "vit_nano"]\nseeds = [0]\n'
        + tiny_toml({**LONGER, "train.out_dir": f"{tmp}/r", "tracking.log_every": 4})
    )


def test_kill9_matrix_mid_cell_then_rerun_resumes_the_cell(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tmp_path / "m.toml"
    cfg.write_text(matrix_toml(tmp_path))
    argv = ["matrix", str(cfg), "--tracking-uri", uri, "--no-progress"]
    assert runs(uri) == []  # the store made before the command: polling it races no creation
    proc = start(argv, tmp_path)

    def a_cell_with_a_checkpoint():
        for r in runs(uri, "tags.kind = 'cell' and attributes.status = 'RUNNING'"):
            d = r.data.tags.get("checkpoint_dir")
            if d and checkpoint_epoch(Path(d)) >= 1:
                return r
        return None

    try:
        killed = wait_for(a_cell_with_a_checkpoint, 180, "a cell's first checkpoint", proc)
    finally:
        kill9(proc)
    killed_id = killed.info.run_id
    assert mlflow.MlflowClient(uri).get_run(killed_id).info.status == "RUNNING"
    assert main(argv) == 0
    cells = runs(uri, "tags.kind = 'cell'")
    assert len(cells) == 2 and {r.info.status for r in cells} == {"FINISHED"}
    assert killed_id in {r.info.run_id for r in cells}  # resumed in its own run
    for r in cells:
        assert epochs_logged(uri, r.info.run_id) == [1, 2, 3]
    assert not runs(uri, "attributes.status = 'RUNNING'")


def test_sigterm_matrix_with_two_workers_leaves_nothing_running_then_rerun_finishes(tmp_path):
    """SIGTERM to `matrix --workers 2` reaches only the command: it passes it on, so both
    workers end their cells KILLED and their trials FAIL, and no process is left; a rerun
    finishes every cell exactly once."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tmp_path / "m.toml"
    cfg.write_text(matrix_toml(tmp_path))
    # epochs long enough (a few seconds each) that both cells are seen running together
    longer = ["--set", "data.train_size=1024"]
    argv = ["matrix", str(cfg), "--tracking-uri", uri, "--no-progress", "--workers", "2", *longer]
    assert runs(uri) == []  # the store made before the command: polling it races no creation
    proc = start(argv, tmp_path, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: len(runs(uri, "tags.kind = 'cell' and attributes.status = 'RUNNING'")) == 2,
            180,
            "both workers' cells",
            proc,
        )
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert not runs(uri, "attributes.status = 'RUNNING'")
    assert {r.info.status for r in runs(uri, "tags.kind = 'cell'")} == {"KILLED"}
    study = optuna.load_study(
        study_name="matrix:faults", storage=open_storage(str(tmp_path / "matrix.journal"))
    )
    assert not study.get_trials(states=(TrialState.RUNNING,))
    killed = {r.info.run_id for r in runs(uri, "tags.kind = 'cell'")}
    assert main(argv) == 0
    cells = runs(uri, "tags.kind = 'cell'")
    assert {r.info.run_id for r in cells} == killed  # each went on in its own run
    assert {r.info.status for r in cells} == {"FINISHED"}
    for r in cells:
        assert epochs_logged(uri, r.info.run_id) == [1, 2, 3]
        assert "error" not in r.data.tags
    assert not runs(uri, "attributes.status = 'RUNNING'")


def search_toml(tmp: Path, epochs: int) -> str:
    """A 4-trial random search of the longer tiny run (256 images), heartbeats every second."""
    run = {**LONGER, "model.name": "tnt_nano", "data.train_size": 256, "train.epochs": epochs}
    return (
        '[search]\nstudy = "k"\nsampler = "random"\npruner = "none"\nn_trials = 4\n'
        "heartbeat_interval = 1\ngrace_period = 3\n[search.space]\n"
        '"train.lr" = { low = 1e-4, high = 1e-3, log = true }\n'
        + tiny_toml({**run, "train.out_dir": f"{tmp}/r", "tracking.experiment": "k"})
    )


def open_storage(storage: str):
    if storage.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(storage))
    return storage


def _kill_one_of_two_workers(tmp_path, storage):
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tmp_path / "s.toml"
    cfg.write_text(search_toml(tmp_path, 3))
    cmd = [
        sys.executable,
        "-m",
        "suite",
        "search",
        str(cfg),
        "--workers",
        "2",
        "--storage",
        storage,
        "--tracking-uri",
        uri,
    ]
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def a_running_trial():
        try:
            study = optuna.load_study(study_name="k", storage=open_storage(storage))
        except KeyError:
            return None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker", "")
            if worker and int(worker.rpartition(":")[2]) != proc.pid:
                return t
        return None

    try:
        wait_for(a_running_trial, 180, "a worker's trial", proc)
        time.sleep(1.0)  # into its training
        # read again just before the kill: a short trial may have finished during the sleep
        victim = wait_for(a_running_trial, 180, "a worker's trial still running", proc)
        kill9(proc, int(victim.user_attrs["worker"].rpartition(":")[2]))
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="k", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    assert count[TrialState.COMPLETE] == 4  # exactly n_trials finished
    assert count[TrialState.RUNNING] == 0 and count[TrialState.WAITING] == 0
    # the trial the killed worker was running when the kill landed: the one read as RUNNING,
    # or, where that one finished between the read and the kill, the worker's next one
    by_victim = [t for t in trials if t.user_attrs.get("worker") == victim.user_attrs["worker"]]
    failed = [t for t in by_victim if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state) for t in by_victim]
    assert all(t.state == TrialState.COMPLETE for t in by_victim if t is not failed[0])
    victim = failed[0]
    retried = [
        t
        for t in trials
        if t.user_attrs.get("retry_of") == victim.number
        or t.system_attrs.get("failed_trial") == victim.number
    ]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    dead = trials[victim.number]  # as stored, with whatever it had sampled before the kill
    assert not dead.params or retried[0].params == dead.params
    trial_runs = runs(uri, "tags.kind = 'trial'")
    assert not [r for r in trial_runs if r.info.status == "RUNNING"]
    killed = [r for r in trial_runs if r.data.tags["trial"] == str(victim.number)]
    assert [r.info.status for r in killed] == ["KILLED"]


def test_kill9_search_worker_on_sqlite(tmp_path):
    _kill_one_of_two_workers(tmp_path, f"sqlite:///{tmp_path}/optuna.db")


def test_kill9_search_worker_on_journal_file(tmp_path):
    _kill_one_of_two_workers(tmp_path, str(tmp_path / "optuna.journal"))


def test_kill9_search_worker_on_postgres(tmp_path, pg_storage_url):
    _kill_one_of_two_workers(tmp_path, pg_storage_url)


CREATE = """
import sys
from suite.tracking import make_tracker
t = make_tracker(sys.argv[1])
with t.run("race", "r") as run:
    run.log_metrics({"x": 1.0})
"""


def test_two_processes_create_one_new_sqlite_store(tmp_path):
    """10 rounds of two processes creating the same new store: usable every time."""
    for i in range(10):
        uri = f"sqlite:///{tmp_path}/s{i}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATE, uri], env=ENV, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        got = runs(uri)
        assert len(got) == 2 and {r.info.status for r in got} == {"FINISHED"}


def test_half_built_empty_store_is_rebuilt_and_one_with_runs_refused(tmp_path, capsys):
    import sqlite3

    empty = tmp_path / "empty.db"
    con = sqlite3.connect(empty)
    con.execute("CREATE TABLE _alembic_tmp_experiments (x INTEGER)")
    con.close()
    assert (
        main(["report", "--tracking-uri", f"sqlite:///{empty}", "--out", str(tmp_path / "r")]) == 2
    )
    assert "no finished runs" in capsys.readouterr().err  # the store was rebuilt, and is empty
    full = tmp_path / "full.db"
    subprocess.run([sys.executable, "-c", CREATE, f"sqlite:///{full}"], check=True, env=ENV)
    con = sqlite3.connect(full)
    con.execute("CREATE TABLE _alembic_tmp_runs (x INTEGER)")
    con.commit()
    con.close()
    before = full.read_bytes()
    assert (
        main(["report", "--tracking-uri", f"sqlite:///{full}", "--out", str(tmp_path / "q")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "half-built" in err and "1 run(s)" in err
    assert full.read_bytes() == before  # never touched


def test_failing_checkpoint_write_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """Disk full at epoch 2's checkpoint: one line, no temporary file, epoch 1's last.pt
    intact, the run FAILED; a resume then finishes it with each epoch logged once and the
    error tag gone."""
    from suite.training import checkpoint

    uri = f"sqlite:///{tmp_path}/m.db"
    argv = [
        "train",
        "--tracking-uri",
        uri,
        *sets("train.epochs=3", f"train.out_dir='{tmp_path}/r'"),
    ]
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) >= 3:  # last.pt and best.pt of epoch 1 went through
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    assert main(argv) == 2
    out = capsys.readouterr().err
    err = [line for line in out.splitlines() if line.startswith("tntbench")]
    assert len(err) == 1 and "cannot write checkpoint" in err[0] and "Traceback" not in out
    assert "No space left on device" in err[0]
    (run,) = runs(uri)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    folder = Path(run.data.tags["checkpoint_dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]  # no .tmp
    assert checkpoint_epoch(folder) == 1
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    assert main([*argv, "--resume", run.info.run_id]) == 0
    (run,) = runs(uri)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert epochs_logged(uri, run.info.run_id) == [1, 2, 3]


def test_planted_pickles_are_refused_by_resume_teacher_and_viz(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    assert (
        main(
            [
                "train",
                "--tracking-uri",
                uri,
                *sets("train.epochs=1", f"train.out_dir='{tmp_path}/r'"),
            ]
        )
        == 0
    )
    (run,) = runs(uri)
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("last.pt", "best.pt"):
        torch.save({"model": Evil(tmp_path / "PWNED"), "epoch": 1}, evil / name)
    client = mlflow.MlflowClient(uri)
    client.set_tag(run.info.run_id, "checkpoint_dir", str(evil))  # a tag anyone could write
    capsys.readouterr()
    tries = [
        ["train", "--tracking-uri", uri, *sets(), "--resume", str(evil / "last.pt")],
        ["train", "--tracking-uri", uri, *sets(), "--resume", run.info.run_id],
        [
            "train",
            "--tracking-uri",
            uri,
            *sets(
                "model.name='deit_nano_distilled'",
                "distill.kind='soft'",
                f"distill.teacher='{evil / 'best.pt'}'",
                "distill.teacher_model='tnt_nano'",
            ),
        ],
        ["viz", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "v")],
    ]
    for argv in tries:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        lines = [x for x in err.splitlines() if not x.startswith("viz: ")]  # viz's stage lines
        assert len(lines) == 1 and "cannot be read safely" in lines[0], err
    assert not (tmp_path / "PWNED").exists()


# =============================================================================================
# Issue 27: distributed cells, a lost tracking server, a lost queue, broken stores, leftovers


def watch_tree(proc: subprocess.Popen, seen: dict[int, psutil.Process]) -> None:
    """Add every process now under ``proc`` to ``seen`` (pid -> process)."""
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(p.pid, p)
    except psutil.NoSuchProcess:
        pass


def survivors(seen: dict[int, psutil.Process], timeout: float = 10) -> list[int]:
    """The pids of ``seen`` still alive after ``timeout`` s (zombies count as gone)."""
    _, alive = psutil.wait_procs(list(seen.values()), timeout=timeout)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def one_line_terminated(proc: subprocess.Popen, err: str) -> None:
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "tntbench: terminated (SIGTERM)", err[-3000:]


def torchrun_argv(tmp_path: Path) -> tuple[str, list[str]]:
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tmp_path / "m.toml"
    cfg.write_text(matrix_toml(tmp_path))
    argv = ["matrix", str(cfg), "--tracking-uri", uri, "--no-progress", "--gpus-per-cell", "2"]
    assert runs(uri) == []  # the store made before the command: polling it races no creation
    return uri, [*argv, "--set", "matrix.models=['tnt_nano']", "--set", "data.train_size=1024"]


def test_sigterm_torchrun_cell_ends_it_killed_then_rerun_resumes_it(tmp_path):
    """SIGTERM to `matrix --gpus-per-cell 2` mid-cell (2 gloo ranks): one line, exit 143, the
    launcher and both ranks gone, the cell's run KILLED; the rerun goes on in that run from
    its last.pt (rank 1 looks the run up too) and finishes it, each epoch logged once."""
    uri, argv = torchrun_argv(tmp_path)
    proc = start(argv, tmp_path, stderr=subprocess.PIPE)
    seen: dict[int, psutil.Process] = {}

    def a_checkpointed_cell():
        watch_tree(proc, seen)
        for r in runs(uri, "tags.kind = 'cell' and attributes.status = 'RUNNING'"):
            d = r.data.tags.get("checkpoint_dir")
            if d and checkpoint_epoch(Path(d)) >= 1:
                return r
        return None

    try:
        cell = wait_for(a_checkpointed_cell, 240, "the cell's first checkpoint", proc)
        watch_tree(proc, seen)
        assert len(seen) >= 3  # the launcher and its two ranks
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            kill9(proc)
    one_line_terminated(proc, err)
    assert not survivors(seen), "processes left behind"
    killed = mlflow.MlflowClient(uri).get_run(cell.info.run_id)
    assert killed.info.status == "KILLED" and "SIGTERM" in killed.data.tags["error"]
    assert main(argv) == 0
    (after,) = runs(uri, "tags.kind = 'cell'")  # not duplicated: the same run went on
    assert after.info.run_id == cell.info.run_id and after.info.status == "FINISHED"
    assert epochs_logged(uri, after.info.run_id) == [1, 2, 3]
    assert "error" not in after.data.tags
    assert not runs(uri, "attributes.status = 'RUNNING'")


@pytest.mark.parametrize("delay", [2.0, 0.5])
def test_sigterm_torchrun_cell_while_its_ranks_start_leaves_no_process(tmp_path, delay):
    """SIGTERM `delay` s after the launcher appears (its ranks starting, or in their
    rendezvous): no launcher or rank survives, nothing is left RUNNING."""
    uri, argv = torchrun_argv(tmp_path)
    proc = start(argv, tmp_path, stderr=subprocess.PIPE)
    seen: dict[int, psutil.Process] = {}

    def launcher():
        watch_tree(proc, seen)
        return any("torchrun_main" in " ".join(p.cmdline()) for p in seen.values() if _alive(p))

    try:
        wait_for(launcher, 180, "the torchrun launcher", proc)
        end = time.time() + delay
        while time.time() < end:
            watch_tree(proc, seen)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.time() < end + 90:
            watch_tree(proc, seen)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            kill9(proc)
    one_line_terminated(proc, err)
    assert not survivors(seen), "processes left behind"
    assert not runs(uri, "attributes.status = 'RUNNING'")


def test_kill9_matrix_during_a_torchrun_cell_leaves_no_process(tmp_path):
    """kill -9 of `matrix --gpus-per-cell 2` mid-cell: its launcher gets SIGTERM (it dies
    with its parent) and stops both ranks; none of them is left training or waiting."""
    uri, argv = torchrun_argv(tmp_path)
    proc = start([*argv, "--set", "train.epochs=30"], tmp_path)  # far longer than the wait
    seen: dict[int, psutil.Process] = {}

    def ranks_training():
        watch_tree(proc, seen)
        return runs(uri, "tags.kind = 'cell' and attributes.status = 'RUNNING'")

    try:
        wait_for(ranks_training, 240, "the cell's run", proc)
        watch_tree(proc, seen)
    finally:
        kill9(proc)
    assert len(seen) >= 3  # the launcher and its two ranks
    t0 = time.monotonic()
    assert not survivors(seen, timeout=10), "processes left behind"
    print(f"kill -9 of the matrix -> its torchrun tree gone in {time.monotonic() - t0:.1f} s")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tracking_server_killed_mid_training_one_line_then_resume(tmp_path, start_mlflow):
    """The MLflow server dies in epoch 2: within seconds one line naming the server and the
    run, exit 2, the checkpoint kept; with the server back, --resume finishes the same run,
    each epoch logged once."""
    port = free_port()  # the restarted server takes it again: the run's URL answers again
    server, uri = start_mlflow(port=port, env=ENV)
    argv = ["train", "--tracking-uri", uri]
    argv += sets("train.epochs=5", "data.train_size=1024", f"train.out_dir='{tmp_path}/r'")
    proc = start(argv, tmp_path, stderr=subprocess.PIPE)
    try:
        run = wait_for(lambda: runs(uri), 120, "the run to start", proc)[0]
        tag = lambda: runs(uri)[0].data.tags.get("checkpoint_dir")  # noqa: E731
        folder = Path(wait_for(tag, 60, "tags", proc))
        wait_for(lambda: checkpoint_epoch(folder) >= 1, 120, "epoch 1's checkpoint", proc)
        kill_group(server)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=300)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill9(proc)
    print(f"server killed -> one-line error in {took:.1f} s")
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tntbench train: error: tracking server {uri} unreachable"), err
    assert run.info.run_id in last
    assert sum("error" in line for line in err.splitlines()) == 1, err[-3000:]
    assert took < 30
    done = checkpoint_epoch(folder)
    assert 1 <= done < 5  # kept, and the run was cut short
    start_mlflow(port=port, env=ENV)  # the same URL again
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status == "RUNNING"
    assert main([*argv, "--resume", run.info.run_id]) == 0
    (after,) = runs(uri)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert epochs_logged(uri, run.info.run_id) == [1, 2, 3, 4, 5]  # each epoch once


FSIZE_CREATE = """
import sys
import mlflow
mlflow.MlflowClient(sys.argv[1]).search_experiments()
"""


def under_file_size_limit(limit: int):
    """A preexec_fn: files of at most ``limit`` bytes, and SIGXFSZ ignored (so that a write
    past it fails with EFBIG, as a full disk does, instead of killing the process)."""
    import resource

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


@pytest.mark.parametrize("limit", [20_000, 300_000])
def test_store_whose_creation_failed_on_a_size_limit_is_rebuilt(tmp_path, capsys, limit):
    """MLflow creating a store under a file-size limit dies mid-schema (`disk I/O error`),
    leaving a half-built file (at 300 kB: tables of the next migration made, its revision not
    recorded, which MLflow then trips over as `table spans already exists` forever). The
    suite sees the schema short of MLflow's and builds it anew; the suite's own creation
    under the limit fails in one line and leaves no file."""
    db = tmp_path / "m.db"
    made = subprocess.run(
        [sys.executable, "-c", FSIZE_CREATE, f"sqlite:///{db}"],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=under_file_size_limit(limit),
    )
    assert made.returncode != 0 and "disk I/O error" in made.stderr, made.stderr[-2000:]
    assert db.stat().st_size > 0  # half-built
    report = ["report", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "r")]
    assert main(report) == 2
    assert "no finished runs" in capsys.readouterr().err  # rebuilt, and empty
    assert runs(f"sqlite:///{db}") == []  # usable by MLflow itself again
    fresh = tmp_path / "fresh.db"
    ours = subprocess.run(
        [sys.executable, "-m", "suite", "report", "--tracking-uri", f"sqlite:///{fresh}"],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=under_file_size_limit(limit),
    )
    err = ours.stderr.strip().splitlines()
    assert ours.returncode == 2 and "Traceback" not in ours.stderr, ours.stderr[-2000:]
    assert len(err) == 1 and str(fresh) in err[0] and "disk I/O error" in err[0]
    assert not fresh.exists()  # nothing half-built left behind


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite:///:memory:", "sqlite://"])
def test_in_memory_tracking_stores_are_refused(tmp_path, capsys, uri):
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in-memory" in err[0] and uri in err[0], err


def test_garbage_or_truncated_store_file_is_one_line_naming_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database\n" * 1000)
    full = tmp_path / "full.db"
    subprocess.run([sys.executable, "-c", CREATE, f"sqlite:///{full}"], check=True, env=ENV)
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    for db in (garbage, truncated):
        before = db.read_bytes()
        argv = ["report", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "r")]
        assert main(argv) == 2
        out = capsys.readouterr()
        err = [line for line in out.err.strip().splitlines() if line.startswith("tntbench")]
        assert len(err) == 1 and str(db) in err[0], out.err
        assert "Traceback" not in out.err
        assert db.read_bytes() == before  # left as it was, for the user to look at


def test_kill9_ui_leaves_no_server_serving(tmp_path):
    """`tntbench ui` killed -9: the MLflow server it supervised (and its uvicorn) stops too,
    and the port is free again."""
    port = free_port()
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = start(["ui", "--tracking-uri", uri, "--port", str(port)], tmp_path)
    seen: dict[int, psutil.Process] = {}
    try:
        wait_until_answers(f"http://127.0.0.1:{port}", proc, timeout=180)
        watch_tree(proc, seen)
        assert len(seen) >= 2  # the guard and mlflow server (and its uvicorn)
    finally:
        kill9(proc)
    assert not survivors(seen, timeout=10), "processes left behind"
    assert not answers(f"http://127.0.0.1:{port}")
    import socket

    with socket.socket() as s:  # no one listens there: a server can take the port again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as servers do
        s.bind(("127.0.0.1", port))
        s.listen()


def test_runs_uri_teacher_leaves_no_temporary_folder(tmp_path):
    """A teacher read from `runs:/<id>` is downloaded into a temporary folder that is removed
    once read: $TMPDIR holds what it held before."""
    uri = f"sqlite:///{tmp_path}/m.db"
    out = f"train.out_dir='{tmp_path}/r'"
    assert main(["train", "--tracking-uri", uri, *sets("train.epochs=1", out)]) == 0
    (teacher,) = runs(uri)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    student = sets(
        "train.epochs=1",
        out,
        "model.name='deit_nano_distilled'",
        "distill.kind='soft'",
        f"distill.teacher='runs:/{teacher.info.run_id}'",
        "distill.teacher_model='tnt_nano'",
    )
    done = subprocess.run(
        [sys.executable, "-m", "suite", "train", "--tracking-uri", uri, *student],
        env={**ENV, "TMPDIR": str(tmpdir)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(runs(uri, "attributes.status = 'FINISHED'")) == 2
    # torch's compile cache (torchinductor_<user>) is meant to stay; nothing else may
    assert [p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")] == []


class TcpProxy:
    """A loopback TCP forwarder to ``target``; ``stop()`` closes its listener and every
    connection through it at once, as a database server going down does."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        import socket
        import threading

        self.target, self.conns, self.lock = target, [], threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR on POSIX
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                return  # stopped
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                TcpProxy._close(s)

    @staticmethod
    def _close(s) -> None:
        import socket
        from contextlib import suppress

        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def stop(self) -> None:
        self._close(self.listener)  # shutdown wakes the accept() above
        with self.lock:
            for s in self.conns:
                self._close(s)


def test_postgres_queue_lost_mid_cell_one_line_then_rerun_finishes(tmp_path, pg_storage_url):
    """The matrix queue's PostgreSQL goes away while 2 workers train (every connection cut,
    new ones refused): one line naming the storage, exit 2 - never "0 failed" with trials
    RUNNING; with it back, the same command finishes each cell once."""
    from sqlalchemy.engine import make_url

    real = make_url(pg_storage_url)
    proxy = TcpProxy((real.host, real.port or 5432))
    storage = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tmp_path / "m.toml"
    cfg.write_text(matrix_toml(tmp_path))
    argv = ["matrix", str(cfg), "--tracking-uri", uri, "--no-progress", "--workers", "2"]
    argv += ["--storage", storage, "--set", "data.train_size=1024"]
    assert runs(uri) == []  # the store made before the command: polling it races no creation
    proc = start(argv, tmp_path, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: len(runs(uri, "tags.kind = 'cell' and attributes.status = 'RUNNING'")) == 2,
            180,
            "both workers' cells",
            proc,
        )
        proxy.stop()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=300)
        took = time.monotonic() - t0
    finally:
        proxy.stop()
        if proc.poll() is None:
            kill9(proc)
    print(f"queue lost -> one-line error in {took:.1f} s")
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "0 failed" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tntbench matrix: error: matrix queue storage"), err[-3000:]
    assert "unreachable" in last and f":{real.password}@" not in last  # password hidden
    assert sum("error" in line.lower() for line in err.splitlines()) == 1, err[-3000:]
    back = TcpProxy((real.host, real.port or 5432), port=proxy.port)  # the same URL answers
    try:
        assert main(argv) == 0
    finally:
        back.stop()
    cells = runs(uri, "tags.kind = 'cell'")
    assert len(cells) == 2 and {r.info.status for r in cells} == {"FINISHED"}
    for r in cells:
        assert epochs_logged(uri, r.info.run_id) == [1, 2, 3]
    assert not runs(uri, "attributes.status = 'RUNNING'")
    study = optuna.load_study(study_name="matrix:faults", storage=pg_storage_url)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    done = [t.user_attrs["cell_hash"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted({r.data.tags["cell_hash"] for r in cells})  # once each


@pytest.mark.parametrize("kind", ["app", "optuna"])
def test_a_database_that_is_not_an_mlflow_store_is_refused_never_replaced(tmp_path, capsys, kind):
    """An SQLite file of someone else's (an app's tables, an Optuna storage) named as the
    tracking store: one line, and the file is left exactly as it was (it used to be taken for
    a half-built store and started again, deleting it)."""
    import sqlite3

    db = tmp_path / "other.db"
    if kind == "app":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE accounts (name TEXT)")
            con.execute("INSERT INTO accounts VALUES ('alice')")
        con.close()
    else:
        optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    before = db.read_bytes()
    assert main(["report", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an MLflow store" in err[0] and str(db) in err[0], err
    assert db.read_bytes() == before
