"""Optuna search: grid fidelity, pruned unbuildable trials, tied keys, divergence, Pareto front,
distributed workers on PostgreSQL, a SIGKILLed worker's trial retried."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")
from conftest import tiny_toml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from suite.studies.search import run_search  # noqa: E402


def write(tmp_path, search, epochs=1):
    """``search`` (its [search] tables) and the tiny run, ``epochs`` epochs, as s.toml."""
    run = {"model.name": "tnt_nano", "train.epochs": epochs, "train.lr": 1e-3}
    run |= {"train.amp": "fp32", "train.out_dir": f"{tmp_path}/runs", "tracking.experiment": "s"}
    p = tmp_path / "s.toml"
    p.write_text(search + tiny_toml(run))
    return p


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_grid_reproduces_the_grid_exactly(tmp_path):
    p = write(
        tmp_path,
        '[search]\nstudy = "g"\nsampler = "grid"\npruner = "none"\nn_trials = 6\n'
        '[search.space]\n"model.inner_heads" = { choices = [1, 2, 4] }\n'
        '"train.lr" = { choices = [1e-3, 2e-3] }\n',
    )
    r = run_search(p, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    trials = r.study.get_trials(deepcopy=False)
    seen = sorted((t.params["model.inner_heads"], t.params["train.lr"]) for t in trials)
    assert seen == sorted((h, lr) for h in (1, 2, 4) for lr in (1e-3, 2e-3))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_unbuildable_trial_is_pruned_with_reason_and_no_training(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/m.db"
    p = write(
        tmp_path,
        '[search]\nstudy = "u"\nsampler = "grid"\nn_trials = 2\n'
        '[search.space]\n"model.inner_heads" = { choices = [2, 5] }\n',
    )
    r = run_search(p, tracking_uri=uri)
    by_heads = {t.params["model.inner_heads"]: t for t in r.study.get_trials(deepcopy=False)}
    bad = by_heads[5]
    assert bad.state == TrialState.PRUNED
    assert "inner_heads=5" in bad.user_attrs["pruned_reason"]
    assert by_heads[2].state == TrialState.COMPLETE
    runs = mlflow.MlflowClient(uri).search_runs(["1"], "tags.kind = 'trial'")
    pruned = [x for x in runs if x.data.tags.get("optuna_state") == "PRUNED"]
    assert len(pruned) == 1 and "val_top1" not in pruned[0].data.metrics  # never trained
    assert all(x.data.tags["mlflow.parentRunId"] == r.parent_run_id for x in runs)


@pytest.mark.slow
def test_tied_inner_dim_keeps_pixels_times_dim(tmp_path):
    p = write(
        tmp_path,
        '[search]\nstudy = "t"\nsampler = "grid"\npruner = "none"\nn_trials = 2\n'
        '[search.space]\n"model.pixel_size" = { choices = [1, 4] }\n'
        '"model.inner_dim" = { tie = "model.pixel_size", keep = "pixels_x_dim" }\n'
        '"model.inner_heads" = { choices = [1] }\n',
    )
    r = run_search(p, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    dims = {}
    for t in r.study.get_trials(deepcopy=False):
        o = json.loads(t.user_attrs["overrides"])
        dims[o["model.pixel_size"]] = o["model.inner_dim"]
    # tnt_nano: 8x8 patches of 2x2 pixels x 12 dims = 16 x 12 = 192 = 64 x 3 = 4 x 48
    assert dims == {1: 3, 4: 48}


@pytest.mark.slow
def test_diverging_trial_fails_without_stopping_the_study(tmp_path):
    p = write(
        tmp_path,
        '[search]\nstudy = "d"\nsampler = "grid"\npruner = "none"\nn_trials = 2\n'
        '[search.space]\n"train.lr" = { choices = [1e-3, 1e30] }\n',
        epochs=2,
    )
    r = run_search(p, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    by_lr = {t.params["train.lr"]: t for t in r.study.get_trials(deepcopy=False)}
    assert by_lr[1e-3].state == TrialState.COMPLETE
    assert by_lr[1e30].state == TrialState.FAIL
    assert "loss is" in by_lr[1e30].user_attrs["fail_reason"]


@pytest.mark.slow
def test_two_objectives_give_a_non_dominated_pareto_front(tmp_path, capsys):
    from suite.cli import main

    p = write(
        tmp_path,
        '[search]\nstudy = "p"\nobjectives = ["val_top1", "gmacs"]\n'
        'sampler = "random"\nn_trials = 5\n[search.space]\n'
        '"model.embed_dim" = { choices = [24, 48, 96] }\n'
        '"model.depth" = { low = 1, high = 2 }\n',
    )
    assert main(["search", str(p), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    assert "Pareto front" in capsys.readouterr().out
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path}/optuna.db")
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    front = study.best_trials
    assert front
    for f in front:  # nobody is at least as good on both and better on one
        for t in done:
            better = t.values[0] >= f.values[0] and t.values[1] <= f.values[1]
            strictly = t.values[0] > f.values[0] or t.values[1] < f.values[1]
            assert not (better and strictly)


@pytest.mark.slow
def test_two_workers_on_postgres_record_every_trial_once(tmp_path, pg_storage_url):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/m.db"
    p = write(
        tmp_path,
        '[search]\nstudy = "pg"\nsampler = "random"\npruner = "none"\n'
        'n_trials = 4\n[search.space]\n"model.inner_heads" = { choices = [1, 2, 4] }\n'
        '"train.lr" = { low = 1e-4, high = 1e-3, log = true }\n',
    )
    r = run_search(p, storage=pg_storage_url, workers=2, tracking_uri=uri)
    trials = r.study.get_trials(deepcopy=False)
    complete = [t.state for t in trials].count(TrialState.COMPLETE)
    # exactly n_trials: a trial started at the same instant as the last one steps back (FAIL,
    # "surplus", no training and no MLflow run)
    surplus = [t for t in trials if t.state == TrialState.FAIL]
    assert complete == 4 and len(trials) == complete + len(surplus)
    assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in surplus)
    assert len({t.number for t in trials}) == len(trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials if t.state == TrialState.COMPLETE]
    runs = mlflow.MlflowClient(uri).search_runs(["1"], "tags.kind = 'trial'")
    assert sorted(x.info.run_id for x in runs) == sorted(run_ids)
    assert {x.data.tags["mlflow.parentRunId"] for x in runs} == {r.parent_run_id}


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_and_retried(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    p = write(
        tmp_path,
        '[search]\nstudy = "k"\nsampler = "random"\npruner = "none"\n'
        "n_trials = 2\nheartbeat_interval = 1\ngrace_period = 2\n[search.space]\n"
        '"train.lr" = { low = 1e-4, high = 1e-3, log = true }\n',
        epochs=40,
    )
    cmd = [
        sys.executable,
        "-m",
        "suite",
        "search",
        str(p),
        "--storage",
        storage,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # wait for a trial to be running, then kill the worker
            try:
                s = optuna.load_study(study_name="k", storage=storage)
                if TrialState.RUNNING in states(s):
                    break
            except KeyError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("no trial started within 120 s")
        time.sleep(2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    fast = ["--set", "train.epochs=1"]
    done = subprocess.run(cmd + fast, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = optuna.load_study(study_name="k", storage=storage)
    st = states(s)
    assert st.count(TrialState.COMPLETE) == 2
    failed = [t for t in s.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == 1
    retried = [t for t in s.get_trials() if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retried and retried[0].state == TrialState.COMPLETE


@pytest.mark.slow
def test_one_line_per_trial_with_its_state_and_counts_by_state(tmp_path, capsys):
    """Each trial prints a stderr line as it ends (number, short params, Optuna state, top-1 or
    the reason); the summary counts trials by state: complete, pruned, failed."""
    from suite.cli import main

    p = write(
        tmp_path,
        '[search]\nstudy = "l"\nsampler = "grid"\nn_trials = 3\n[search.space]\n'
        '"model.inner_heads" = { choices = [2, 5] }\n"train.lr" = { choices = [1e-3, 1e30] }\n',
        epochs=2,
    )
    assert main(["search", str(p), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.startswith("trial ")]
    study = optuna.load_study(study_name="l", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert len(lines) == len(trials) == 4
    for t, line in zip(trials, lines, strict=True):
        lr = "1.0e-3" if t.params["train.lr"] == 1e-3 else "1.0e+30"
        assert line.startswith(f"trial {t.number}  inner_heads={t.params['model.inner_heads']} ")
        assert f"lr={lr}  {t.state.name}" in line
        if t.state == TrialState.COMPLETE:
            assert line.endswith(f"top-1 {t.value:.3g}")
        else:
            assert line.endswith(")")  # the reason: not divisible, or the loss is nan
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL", "PRUNED", "PRUNED"]
    assert "study l: 1 complete, 2 pruned, 1 failed\n" in out
    # the report on that store says what it reads and where it wrote (stderr), around its work
    rep = tmp_path / "rep"
    argv = [
        "report",
        "--study",
        "l",
        "--out",
        str(rep),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"report: reading runs of all experiments from sqlite:///{tmp_path}/m.db ..."
    assert err[-1] == f"report: wrote {rep.resolve()}"
