"""A matrix as a work queue in an Optuna storage: one trial per cell, popped by any worker.

Each cell not yet FINISHED in MLflow is enqueued once as a WAITING trial of the study
``matrix:<name>``, with the cell's index and config hash as user attributes. A worker pops one
with the same atomic step as ``Study.ask`` (the storage moves WAITING -> RUNNING for exactly
one caller), runs it, and tells the cell's top-1 back. A worker that dies stops beating its
heartbeat (RDB storages) or is seen gone on its host: its trial is failed and the cell queued
again, to go on in its own MLflow run from its last checkpoint.

Optuna's ``ask`` is not used directly because with no trial waiting it samples a new one, and
a matrix has nothing to sample: two workers racing for the last cell would make a stray trial.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from suite.config import MAX_RETRY
from suite.errors import UserError, first_line
from suite.studies.storage import open_storage, reap_dead_workers, storage_lock
from suite.tracking import worker_id

HEARTBEAT_S = 2  # a worker beats every 2 s; silent for GRACE_S, its cell is queued again
GRACE_S = 10


def study_name(matrix: str) -> str:
    return f"matrix:{matrix}"


@dataclass(frozen=True)
class Popped:
    trial_id: int
    number: int
    cell: int  # the cell's index in the expansion
    digest: str  # the cell's config hash


class QueueLost(UserError):
    """The queue's storage stopped answering (a database server down, a network cut)."""


def is_storage_lost(e: BaseException) -> bool:
    """An error from the database behind an RDB storage (connection refused or dropped,
    the server shutting down), however Optuna and SQLAlchemy wrapped it."""
    import optuna
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, (DBAPIError, optuna.exceptions.StorageInternalError)):
            return True
        x = x.__cause__ or x.__context__
    return False


def queue_lost(url: str, e: BaseException) -> QueueLost:
    """One line naming the storage (its password hidden) and the database's own words."""
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # a journal path, or not a URL SQLAlchemy reads
        shown = url
    orig = getattr(e, "orig", None) or e.__cause__ or e.__context__ or e
    first = first_line(orig)
    return QueueLost(
        f"matrix queue storage {shown} unreachable ({first[:200]}): the cells cut short stay "
        "in the queue and go on when the same command is run again with it back"
    )


class MatrixQueue:
    """The study behind a matrix: enqueue, pop, beat, tell, reap. One per process."""

    def __init__(self, url: str, matrix: str, max_retry: int = MAX_RETRY) -> None:
        import optuna

        self.url, self.name, self.max_retry = url, study_name(matrix), max_retry
        self.storage = open_storage(url, HEARTBEAT_S, GRACE_S, max_retry)
        self.study = optuna.create_study(
            storage=self.storage, study_name=self.name, direction="maximize", load_if_exists=True
        )
        self.study_id = self.storage.get_study_id_from_name(self.name)

    def reachable(self) -> bool:
        """Whether the storage answers now (one cheap read)."""
        try:
            self.storage.get_study_id_from_name(self.name)
        except Exception:
            return False
        return True

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    @contextmanager
    def lock(self) -> Iterator[None]:
        with storage_lock(self.url, self.name):
            yield

    def trials(self, *states: Any) -> list[Any]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def check_cells(self, digests: list[str]) -> None:
        """A study keeps the hashes of its cells: another matrix of the same name in the same
        storage would mix two queues in one, so that is refused."""
        mine = sorted(digests)
        known = self.study.user_attrs.get("cells")
        if known is None:
            self.study.set_user_attr("cells", mine)
        elif known != mine:
            raise UserError(
                f"matrix '{self.name.removeprefix('matrix:')}' already has a queue in "
                f"{self.url} with other cells: rename [matrix].name to start a new one"
            )

    def parent_run_id(self, create: Any) -> str:
        """The matrix's MLflow parent run, shared by every worker and machine: the first to
        get here creates it (``create()`` returns its ID), under the lock."""
        with self.lock():
            known = self.study.user_attrs.get("mlflow_parent_run_id")
            if known is None:
                known = create()
                self.study.set_user_attr("mlflow_parent_run_id", known)
        return str(known)

    def enqueue(self, cells: list[tuple[int, str]], done: set[str]) -> int:
        """Queue every (index, hash) not done and not already waiting or running; returns how
        many were queued. Under the lock: two commands starting together queue a cell once."""
        from optuna.trial import TrialState

        with self.lock():
            live = {
                t.user_attrs.get("cell_hash")
                for t in self.trials(TrialState.WAITING, TrialState.RUNNING)
            }
            todo = [(i, d) for i, d in cells if d not in done and d not in live]
            for index, digest in todo:
                self.study.enqueue_trial(
                    {"cell": index}, user_attrs={"cell": index, "cell_hash": digest}
                )
        return len(todo)

    def pop(self) -> Popped | None:
        """Take one waiting cell (RUNNING now, for this process only), or None."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for t in self.trials(TrialState.WAITING):
            trial_id = self._trial_id(t.number)
            try:
                if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    continue  # another worker took it first
            except UpdateFinishedTrialError:
                continue
            self.storage.set_trial_user_attr(trial_id, "worker", worker_id())
            return Popped(trial_id, t.number, int(t.user_attrs["cell"]), t.user_attrs["cell_hash"])
        return None

    @contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Beat for ``trial_id`` from a thread while the cell runs (RDB storages only)."""
        if getattr(self.storage, "get_heartbeat_interval", lambda: None)() is None:
            yield  # a journal file: dead workers are found by their pid, on this host
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # the cell goes on; the worker says it once, at tell
                    if not is_storage_lost(e):
                        raise
                stop.wait(HEARTBEAT_S)

        thread = threading.Thread(target=beat, daemon=True, name="matrix-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def tell(self, popped: Popped, value: float | None) -> None:
        """COMPLETE with the cell's top-1, or FAIL (value None)."""
        from optuna.trial import TrialState

        if value is None:
            self.study.tell(popped.number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            self.study.tell(popped.number, value, skip_if_finished=True)

    def reap(self) -> None:
        """Fail the cells of dead workers and queue them again (``reap_dead_workers``)."""
        with self.lock():
            reap_dead_workers(
                self.study, self.max_retry, lambda t: ({"cell": t.user_attrs["cell"]}, t.user_attrs)
            )

    def wait_or_stop(self, poll_s: float = 1.0) -> bool:
        """With nothing waiting: True (after a pause) while others still run cells, since
        their worker may die and its cell come back; False when the queue is drained."""
        from optuna.trial import TrialState

        if not self.trials(TrialState.RUNNING):
            return False
        time.sleep(poll_s)
        return True

    def states(self) -> dict[str, dict[str, Any]]:
        """cell hash -> the newest trial's state, worker and start, for ``--status``."""
        out: dict[str, dict[str, Any]] = {}
        for t in sorted(self.trials(), key=lambda t: t.number):
            out[t.user_attrs.get("cell_hash", "")] = {
                "state": t.state.name.lower(),
                "worker": t.user_attrs.get("worker", ""),
                "since": t.datetime_start,
                "trial": t.number,
            }
        return out
