"""``tntbench matrix --storage URL --workers N --gpus-per-cell K``: a matrix spread over
processes, GPUs and machines, on an Optuna storage (``suite.studies.queue``).

Every worker, on this machine or another, runs the same loop: reap the cells of dead workers,
pop a waiting cell, run it exactly as the one-process matrix does (``fit`` plus the inference
profile, a child of the matrix's parent run), tell its top-1 back. Workers that find the queue
empty wait while other cells still run (their worker may die and the cell come back), then
stop. On this machine ``--workers N`` splits the CPU cores between N processes, or pins each to
its own GPUs; with ``--gpus-per-cell K`` a cell runs under ``torchrun`` (DDP) on K GPUs.

Many machines: the same command on each, with one PostgreSQL storage and one MLflow server.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from suite.errors import UserError, redact
from suite.procs import run_launcher
from suite.runtime import clamp_workers, cpu_cores, spawn_workers
from suite.studies.matrix import (
    RESUMABLE,
    Cell,
    CellContext,
    MatrixResult,
    check_paths,
    expand,
    finish_parent,
    finished_digests,
    open_parent,
    run_cell,
)
from suite.studies.queue import (
    GRACE_S,
    HEARTBEAT_S,
    MAX_RETRY,
    MatrixQueue,
    QueueLost,
    is_storage_lost,
    queue_lost,
    study_name,
)
from suite.studies.storage import check_not_tracking_store, open_storage
from suite.tracking import Tracker, make_tracker, metric_col, resolve_uri, tag_col, worker_id


@dataclass(frozen=True)
class Plan:
    """What every worker of one command needs (picklable: it crosses a spawn)."""

    path: str
    sets: list[str]
    storage: str
    tracking_uri: str
    parent_id: str
    workers: int
    gpus_per_cell: int
    profile_steps: int
    cuda: bool  # whether the cells run on CUDA (then each worker gets its own GPUs)
    max_retry: int  # [matrix] max_retry: a cell whose workers keep dying is given up


def default_storage(tracking_uri: str) -> str:
    """Workers on this machine with no --storage: a journal file beside the SQLite store."""
    uri = resolve_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise UserError(
            "--workers/--gpus-per-cell with a tracking server need --storage URL "
            "(e.g. postgresql+psycopg://user:pw@host/db), shared by every machine"
        )
    return str(Path(uri.removeprefix("sqlite:///")).parent / "matrix.journal")


def run_queued_matrix(
    path: str | Path,
    tracker: Tracker,
    sets: list[str] | None = None,
    *,
    storage: str | None = None,
    workers: int = 1,
    gpus_per_cell: int = 0,
    profile_steps: int = 3,
) -> MatrixResult:
    """Queue the matrix's missing cells in ``storage`` and work on them with ``workers``
    processes here; other machines may run the same command on the same storage."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if gpus_per_cell < 0:
        raise UserError(f"--gpus-per-cell must be >= 0, got {gpus_per_cell}")
    name, base, cells, max_retry = expand(path, sets)
    experiment = base.get("tracking", {}).get("experiment") or name
    done = finished_digests(tracker, experiment)
    todo = [c for c in cells if c.digest not in done]
    check_paths(todo, path)  # a missing data root stops the matrix before any work
    storage = storage or default_storage(tracker.uri)
    check_not_tracking_store(storage, tracker.uri)
    cuda = on_cuda(cells)
    workers = clamp_workers(workers, len(todo), gpus_per_cell, cuda)
    worker_env(0, workers, gpus_per_cell, cuda)  # a plan that cannot fit fails before any work
    queue = MatrixQueue(storage, name, max_retry)
    queue.check_cells([c.digest for c in cells])
    queue.enqueue([(c.index, c.digest) for c in cells], set(done))
    parent_id = queue.parent_run_id(lambda: open_parent(tracker, experiment, name, cells, path))
    plan = Plan(
        str(path),
        list(sets or []),
        storage,
        tracker.uri,
        parent_id,
        workers,
        gpus_per_cell,
        profile_steps,
        cuda,
        max_retry,
    )
    with tracker.run(experiment, f"matrix/{name}", run_id=parent_id) as parent:
        _start_workers(plan)  # raises, in one line, when a worker could not do its work
        summary, runs, failed = finish_parent(parent, tracker, experiment, name, cells)
    return MatrixResult(name, parent_id, len(todo), len(cells) - len(todo), failed, summary, runs)


QUEUE_LOST_EXIT = 3  # a spawned worker lost the queue's storage (the command says it once)


def _start_workers(plan: Plan) -> None:
    """The workers, waited for. A worker that lost the storage or died, its cell not taken
    over by another, makes the command fail in one line: never "0 failed" while cells are
    left RUNNING or WAITING in the queue."""
    if plan.workers == 1:
        _worker_main(plan, 0)
        return
    codes = spawn_workers(_spawned_worker, [(plan, s) for s in range(plan.workers)])
    bad = [(slot, c) for slot, c in enumerate(codes) if c]
    if not bad:
        return
    name = expand(plan.path, plan.sets).name
    try:  # the storage is back, or never was the problem: how many cells are unfinished
        from optuna.trial import TrialState

        queue = MatrixQueue(plan.storage, name, plan.max_retry)
        left = len(queue.trials(TrialState.RUNNING, TrialState.WAITING))
    except Exception as e:
        if is_storage_lost(e) or isinstance(e, UserError):
            raise queue_lost(plan.storage, e) from None
        raise
    if not left:  # another worker took over the dead one's cell (kill -9 of one worker)
        return
    if any(c == QUEUE_LOST_EXIT for _, c in bad):
        raise queue_lost(plan.storage, RuntimeError("lost by a worker, answering again now"))
    what = ", ".join(f"worker {slot} exit {c}" for slot, c in bad)
    raise UserError(
        f"{what}: {left} cell(s) left waiting or running in the queue; run the same command "
        "again to finish them"
    )


def _spawned_worker(plan: Plan, slot: int) -> None:
    """``_worker_main`` in a spawned process: a lost storage exits ``QUEUE_LOST_EXIT``
    quietly (every worker would say it; the command says it once)."""
    try:
        _worker_main(plan, slot)
    except QueueLost:
        sys.exit(QUEUE_LOST_EXIT)


def on_cuda(cells: list) -> bool:
    """Whether any cell trains on CUDA (``train.device`` auto with a GPU here, or cuda...): a
    CPU matrix on a GPU machine splits only the cores."""
    import torch

    if not torch.cuda.is_available():
        return False
    return any(str(c.raw.get("train", {}).get("device", "auto")) != "cpu" for c in cells)


def worker_env(slot: int, workers: int, gpus_per_cell: int, cuda: bool) -> dict[str, str]:
    """Environment of worker ``slot``: its share of the CPU cores (OMP threads per process),
    and with ``cuda`` its own group of ``max(gpus_per_cell, 1)`` GPUs."""
    import torch

    threads = max(1, cpu_cores() // workers)
    env = {"OMP_NUM_THREADS": str(max(1, threads // max(gpus_per_cell, 1)))}
    if cuda:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        k = max(gpus_per_cell, 1)
        if workers * k > len(gpus):
            raise UserError(
                f"--workers {workers} x --gpus-per-cell {k} needs {workers * k} GPUs; "
                f"this machine has {len(gpus)}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * k : (slot + 1) * k])
    env["TNTBENCH_THREADS"] = str(threads)
    return env


def _worker_main(plan: Plan, slot: int) -> None:
    """One worker process: its share of the machine, then the queue loop."""
    import torch

    env = worker_env(slot, plan.workers, plan.gpus_per_cell, plan.cuda)
    os.environ.update(env)  # before CUDA starts: CUDA_VISIBLE_DEVICES is read then
    torch.set_num_threads(int(env["TNTBENCH_THREADS"]))
    work(plan, slot)


def work(plan: Plan, slot: int = 0) -> None:
    """Pop and run cells until the queue is drained and no other worker runs one."""
    name, base, cells, _ = expand(plan.path, plan.sets)
    by_hash = {c.digest: c for c in cells}
    experiment = base.get("tracking", {}).get("experiment") or name
    tracker = make_tracker(plan.tracking_uri)
    # unreachable from the start: one line already
    queue = MatrixQueue(plan.storage, name, plan.max_retry)
    try:
        _work(queue, plan, slot, by_hash, name, tracker, experiment)
    except Exception as e:
        # the queue's database gone (not the MLflow store's): Optuna's multi-line report and
        # SQLAlchemy's as one line; its cell stays RUNNING there, reaped at the next run
        if is_storage_lost(e) and not queue.reachable():
            raise queue_lost(plan.storage, e) from None
        raise


def _work(
    queue: MatrixQueue,
    plan: Plan,
    slot: int,
    by_hash: dict[str, Cell],
    name: str,
    tracker: Tracker,
    experiment: str,
) -> None:
    while True:
        queue.reap()
        popped = queue.pop()
        if popped is None:
            if queue.wait_or_stop():
                continue
            return
        value = None
        try:
            with queue.heartbeat(popped.trial_id):
                cell = by_hash[popped.digest]
                value = _run_popped(cell, name, plan, tracker, experiment, f"worker {slot}")
        except Exception as e:  # the cell's run is FAILED with its error; the worker goes on
            if is_storage_lost(e) and not queue.reachable():
                raise
            print(f"worker {slot}: trial {popped.number} failed: {redact(str(e))}", file=sys.stderr)
        finally:  # Ctrl-C too: the cell is FAIL in the queue, never left RUNNING
            queue.tell(popped, value)


def _run_popped(
    cell: Cell, name: str, plan: Plan, tracker: Tracker, experiment: str, worker: str
) -> float | None:
    """Run a popped cell (unless MLflow has it already); its top-1, or None if it failed."""
    found = _cell_run(tracker, experiment, cell.digest)
    if found.get("FINISHED"):
        return _top1(tracker, experiment, cell.digest)
    # cut short (its worker died, else the cell would not be waiting, or was interrupted)
    resume = next((found[s] for s in RESUMABLE if s in found), None)
    who = f"{worker} ({worker_id()})"
    what = f"cell {cell.index} ({cell.run_name})"
    print(f"{who}: {what} {'resumed' if resume else 'started'}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    if plan.gpus_per_cell:
        started = time.time()
        try:
            _torchrun_cell(plan, cell, resume)
        except KeyboardInterrupt as e:  # its ranks are stopped: the cell's run ends KILLED
            _end_killed(tracker, experiment, cell.digest, resume, started, e)
            raise
    else:
        ctx = CellContext(name, experiment, plan.parent_id, tracker, plan.profile_steps)
        run_cell(cell, ctx, resume)
    value = _top1(tracker, experiment, cell.digest)
    state = "FAILED" if value is None else f"FINISHED top-1 {value:.2f}"
    took = time.monotonic() - t0
    print(f"{who}: {what} {state} in {took:.0f} s", file=sys.stderr, flush=True)
    return value


def _cell_run(tracker: Tracker, experiment: str, digest: str) -> dict[str, str]:
    """status -> the newest run ID of the cell's runs with that status."""
    df = tracker.runs(experiment, kind="cell", cell_hash=digest)
    if df.empty:
        return {}
    df = df.sort_values("start_time")
    return dict(zip(df["status"], df["run_id"], strict=True))


def _top1(tracker: Tracker, experiment: str, digest: str) -> float | None:
    df = tracker.runs(experiment, status="FINISHED", kind="cell", cell_hash=digest)
    if df.empty or metric_col("val_top1") not in df:
        return None
    return float(df.sort_values("start_time")[metric_col("val_top1")].iloc[-1])


def _torchrun_cell(plan: Plan, cell: Cell, resume: str | None) -> None:
    """The cell under torchrun on this worker's GPUs (or K gloo processes on CPU)."""
    sets = [a for s in plan.sets for a in ("--set", s)]
    cmd = [
        *("--standalone", f"--nproc_per_node={plan.gpus_per_cell}"),
        *("-m", "suite", "matrix", plan.path),
        *sets,
        *("--tracking-uri", plan.tracking_uri, "--run-cell", cell.digest),
        *("--parent-run", plan.parent_id, *(("--continue-run", resume) if resume else ())),
    ]
    run_launcher(cmd)  # its run records the outcome; a crash leaves it unfinished


def _end_killed(
    tracker: Tracker,
    experiment: str,
    digest: str,
    resume: str | None,
    started: float,
    e: KeyboardInterrupt,
) -> None:
    """The cell's run of this attempt (the one continued, or one begun since ``started``)
    ended KILLED, resumable, whatever its ranks managed to record as they were stopped (still
    RUNNING after a SIGKILL, FAILED when a rank saw its peer vanish mid-collective)."""
    df = tracker.runs(experiment, kind="cell", cell_hash=digest)
    if df.empty:
        return  # stopped before rank 0 opened a run: nothing to end
    mine = (df["run_id"] == resume) | (df["start_time"] >= int(started * 1000) - 1000)
    for _, r in df[mine & (df["status"] != "FINISHED")].iterrows():
        tracker.attach(r["run_id"]).fail(f"interrupted ({e or 'KeyboardInterrupt'})", "KILLED")


# ---------------------------------------------------------------------------------------------
# Status


def status_table(
    path: str | Path, tracker: Tracker, sets: list[str] | None, storage: str | None
) -> pd.DataFrame:
    """One row per cell: waiting, running (host:pid, since), finished, failed or todo, from
    MLflow and, with a storage, the queue."""
    name, base, cells, _ = expand(path, sets)
    experiment = base.get("tracking", {}).get("experiment") or name
    runs = tracker.runs(experiment, kind="cell", matrix=name)
    queued = _queue_states(storage, name, tracker.uri)
    # one pass over the runs, oldest first, grouped by cell (not a pandas filter per cell:
    # 5-15 ms each, 45 s for 1,000 cells; issue 24)
    by_cell: dict[str, list[dict[str, Any]]] = {}
    if len(runs):
        for r in runs.sort_values("start_time", kind="stable").to_dict("records"):
            by_cell.setdefault(r.get(tag_col("cell_hash")), []).append(r)
    rows = []
    for c in cells:
        state = _state(by_cell.get(c.digest, []), queued.get(c.digest))
        rows.append({"cell": c.index, "run name": c.run_name, **state})
    return pd.DataFrame(rows)


def _queue_states(storage: str | None, name: str, tracking_uri: str) -> dict[str, dict]:
    """The queue's view of each cell; with no --storage, the default journal if it exists."""
    import optuna

    if not storage:
        try:
            storage = default_storage(tracking_uri)
        except UserError:
            return {}
        if not Path(storage).exists():
            return {}
    opened = open_storage(storage, HEARTBEAT_S, GRACE_S, MAX_RETRY)
    if study_name(name) not in optuna.get_all_study_names(opened):
        return {}
    return MatrixQueue(storage, name).states()


def _state(runs: list[dict[str, Any]], trial: dict[str, Any] | None) -> dict[str, Any]:
    """A cell's state from its runs (oldest first): MLflow's FINISHED wins (the newest
    finished run); else the queue's; else the newest run's."""
    row = {"state": "todo", "worker": "", "since": "", "run": ""}
    if runs:
        finished = [r for r in runs if r["status"] == "FINISHED"]
        r = finished[-1] if finished else runs[-1]
        row.update(state=str(r["status"]).lower(), run=str(r["run_id"])[:8])
        row["since"] = _since(r["start_time"])
        if r["status"] == "RUNNING":
            row["worker"] = f"{r.get(tag_col('host'), '')}:{r.get(tag_col('pid'), '')}"
        if r["status"] == "FINISHED":
            return row
    if trial is not None and trial["state"] in ("waiting", "running"):
        row.update(state=trial["state"], worker=trial["worker"])
        if trial["since"] is not None:
            row["since"] = trial["since"].strftime("%Y-%m-%d %H:%M:%S")
    return row


def _since(start: Any) -> str:
    """MLflow's start time (epoch ms; a datetime from elsewhere) as UTC text, as pandas'
    ``to_datetime(ms, unit="ms")`` wrote it, without pandas per cell."""
    import datetime as dt
    import numbers

    if isinstance(start, numbers.Real):  # numpy's integers too
        when = dt.datetime.fromtimestamp(start / 1000, tz=dt.UTC)
    else:
        when = pd.to_datetime(start)
    return when.strftime("%Y-%m-%d %H:%M:%S")


STATES = ("finished", "running", "waiting", "failed", "killed", "todo")


def count_states(table: pd.DataFrame) -> str:
    """``4 finished, 1 running, 1 waiting``: the states present, in that order."""
    counts = table["state"].value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s, 0))


def run_one_cell(
    path: str | Path,
    sets: list[str] | None,
    digest: str,
    *,
    tracking_uri: str,
    parent_id: str,
    continue_run: str | None,
) -> bool:
    """One cell, in this process (a torchrun rank): rank 0 records it, every rank trains."""
    from suite.runtime import dist_env

    name, base, cells, _ = expand(path, sets)
    cell = next((c for c in cells if c.digest == digest), None)
    if cell is None:
        raise UserError(f"--run-cell {digest}: no cell of {path} has this hash")
    experiment = base.get("tracking", {}).get("experiment") or name
    tracker = make_tracker(tracking_uri, rank=dist_env()[0])  # rank != 0: lookups only
    return run_cell(cell, CellContext(name, experiment, parent_id, tracker, 3), continue_run)
