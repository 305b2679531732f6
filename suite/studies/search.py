"""``tntbench search``: Optuna searches over TNT's knobs (inner heads, patch and pixel size, ...).

The config's ``[search]`` table names the study, objectives, sampler, pruner and trial count;
``[search.space]`` maps dotted config keys to distributions:

    [search.space]
    "model.inner_heads" = { choices = [1, 2, 4, 8] }
    "train.lr" = { low = 1e-4, high = 3e-3, log = true }
    "model.inner_dim" = { tie = "model.pixel_size", keep = "pixels_x_dim" }   # derived
    pixel = { choices = [{ "model.pixel_size" = 2, "model.inner_dim" = 6 }, ...] }  # tied pairs

Each trial is one training run (``suite.training.fit.fit``) reporting val top-1 every epoch, so the
pruner stops bad trials early; a combination that cannot be built is PRUNED with its reason
before any training; a diverging trial FAILS without stopping the study. Storage: any Optuna
URL; by default an SQLite file beside the MLflow store (one worker) or a journal file (several
local workers). RDB storages run heartbeats, and a dead worker's trial is re-queued.
MLflow: a parent run per study, a child run per trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite.config import (
    OBJECTIVES,
    Choices,
    Config,
    Range,
    SearchConfig,
    Tie,
    apply_sets,
    from_dict,
    parse_search,
    read_toml,
    spec_table,
    with_values,
)
from suite.errors import UserError, redact
from suite.runtime import spawn_workers
from suite.studies.storage import (
    check_not_tracking_store,
    open_storage,
    quiet_optuna,
    reap_dead_workers,
)
from suite.tracking import (
    Tracker,
    flatten,
    make_tracker,
    resolve_uri,
    tag_col,
    worker_id,
)

# ---------------------------------------------------------------------------------------------
# Sampling a trial's config


def _choice_repr(v: Any) -> Any:
    """Optuna choices must be primitives: tables (tied keys) travel as JSON strings."""
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v


def grid_space(space: dict[str, Choices | Range | Tie]) -> dict[str, list[Any]]:
    return {
        k: [_choice_repr(c) for c in s.values] for k, s in space.items() if isinstance(s, Choices)
    }


def sample(trial: Any, space: dict[str, Choices | Range | Tie], base: dict[str, Any]) -> dict:
    """The trial's dotted overrides, derived (tied) keys included."""
    out: dict[str, Any] = {}
    ties = {}
    for name, spec in space.items():
        if isinstance(spec, Choices):
            v = trial.suggest_categorical(name, [_choice_repr(c) for c in spec.values])
            value = json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
            if isinstance(value, dict):  # a tied group
                out.update(value)
            else:
                out[name] = value
        elif isinstance(spec, Tie):
            ties[name] = spec
        elif spec.integer:
            out[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            out[name] = trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)
    for name in ties:  # inner_dim x pixels kept at the base model's value
        out[name] = _tied_inner_dim(base, out)
    return out


def checked_config(raw: dict[str, Any], source: str) -> Config:
    """``raw`` as a run's Config, the model's own knobs checked too (the base of a search,
    each trial): a UserError if it cannot be built."""
    cfg = from_dict(raw, source)
    from suite.models import check_model_config

    check_model_config(cfg.model.name, cfg.model.overrides)
    return cfg


def _tied_inner_dim(base: dict[str, Any], chosen: dict[str, Any]) -> int:
    from suite.models import get_entry

    model = {
        **base.get("model", {}),
        **{k[6:]: v for k, v in chosen.items() if k.startswith("model.")},
    }
    entry = get_entry(model.get("name", "tnt_nano"))
    kw = {**entry.kwargs, **base.get("model", {})}
    kw.pop("name", None)
    patch, pixel0, dim0 = kw.get("patch_size", 16), kw.get("pixel_size", 4), kw.get("inner_dim", 24)
    budget = (patch // pixel0) ** 2 * dim0  # pixels x inner dim of the base model
    pixels = (model.get("patch_size", patch) // model["pixel_size"]) ** 2
    if budget % pixels:
        raise UserError(
            f"model.inner_dim: pixels x inner dim = {budget} is not divisible "
            f"by {pixels} pixels (pixel_size={model['pixel_size']})"
        )
    return budget // pixels


# ---------------------------------------------------------------------------------------------
# Storage, sampler, pruner


def default_storage(tracking_uri: str, workers: int) -> str:
    """SQLite beside the MLflow store for one worker; a journal file for several."""
    uri = resolve_uri(tracking_uri)
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path()
    if workers > 1:
        return str(folder / "optuna.journal")
    return f"sqlite:///{folder / 'optuna.db'}"


def make_storage(url: str, scfg: SearchConfig) -> Any:
    return open_storage(url, scfg.heartbeat_interval, scfg.grace_period, scfg.max_retry)


def make_sampler(scfg: SearchConfig) -> Any:
    import optuna

    # Optuna 5: a GMACs budget reaches the samplers through trial.set_constraint
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(scfg.space), seed=scfg.seed)
    if scfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=scfg.seed)
    if scfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=scfg.seed)
    return optuna.samplers.TPESampler(seed=scfg.seed, n_startup_trials=max(2, scfg.n_trials // 5))


def make_pruner(scfg: SearchConfig, epochs: int) -> Any:
    import optuna

    if scfg.pruner == "none" or len(scfg.objectives) > 1:  # multi-objective studies cannot prune
        return optuna.pruners.NopPruner()
    if scfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


# ---------------------------------------------------------------------------------------------
# The objective


class _Pruned(Exception):
    """Raised inside the tracked run so MLflow records it KILLED, then re-raised as TrialPruned."""

    run_status = "KILLED"


@dataclass
class Objective:
    base: dict[str, Any]
    scfg: SearchConfig
    tracking_uri: str
    parent_run_id: str | None
    source: str
    _tracker: Tracker | None = None

    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = make_tracker(self.tracking_uri)
        return self._tracker

    def experiment(self) -> str:
        return self.base.get("tracking", {}).get("experiment", self.scfg.study)

    def __call__(self, trial: Any) -> float | tuple[float, ...]:
        import optuna

        from suite.training.engine import NonFiniteLoss
        from suite.training.fit import StudyLink, fit

        tracker = self.tracker()
        tags = {"kind": "trial", "study": self.scfg.study, "trial": trial.number}
        trial.set_user_attr("worker", worker_id())  # who runs it: a dead worker's trial is reaped
        if self._surplus(trial):
            trial.set_user_attr("fail_reason", "surplus: n_trials reached by other workers")
            return self._value(None)
        try:
            overrides, cfg = self._trial_config(trial)
        except UserError as e:  # cannot be built: pruned before any training
            trial.set_user_attr("pruned_reason", str(e))
            self._record_unbuildable(tracker, trial, tags, str(e))
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("overrides", json.dumps(overrides, default=str))
        params = {f"search.{k}": v for k, v in overrides.items()}
        study = StudyLink(self.parent_run_id, tags, params)
        try:
            result = fit(cfg, tracker, study=study, on_epoch=self._reporter(trial), progress=False)
        except _Pruned as e:
            raise optuna.TrialPruned(str(e)) from None
        except NonFiniteLoss as e:  # diverged: this trial fails, the study goes on
            trial.set_user_attr("fail_reason", str(e))
            return self._value(None)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if self.scfg.gmacs_budget > 0:
            trial.set_constraint("gmacs", result.metrics["gmacs"] - self.scfg.gmacs_budget)
        return self._value(result.metrics)

    def _trial_config(self, trial: Any) -> tuple[dict[str, Any], Config]:
        """The trial's sampled overrides, and the base config with them: the trial's run."""
        overrides = sample(trial, self.scfg.space, self.base)
        raw = with_values(self.base, overrides, f"trial {trial.number}")
        raw.setdefault("tracking", {})["run_name"] = f"{self.scfg.study}/trial-{trial.number}"
        raw["tracking"]["experiment"] = self.experiment()
        return overrides, checked_config(raw, f"trial {trial.number}")

    def _reporter(self, trial: Any) -> Callable[[int, dict[str, float]], None] | None:
        """fit's on_epoch: each epoch's objective to the pruner, which may stop the trial
        there; none for two objectives (Optuna prunes single-objective studies only)."""
        if len(self.scfg.objectives) > 1:
            return None
        objective = self.scfg.objectives[0]

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[objective], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_epoch", epoch + 1)
                raise _Pruned(f"pruned after epoch {epoch + 1}")

        return on_epoch

    def _value(self, metrics: dict[str, float] | None) -> float | tuple[float, ...]:
        """Optuna's value of a trial: its objectives read from ``metrics`` (NaN without them: a
        trial that stepped back or diverged), a float for one objective, else a tuple."""
        values = tuple(
            math.nan if metrics is None else float(metrics[o]) for o in self.scfg.objectives
        )
        return values[0] if len(values) == 1 else values

    def _surplus(self, trial: Any) -> bool:
        """Two workers may start a trial at once when one is missing: the later-numbered one
        steps back (FAIL, no training), so the study ends with exactly n_trials finished."""
        from optuna.trial import TrialState

        before = 0
        for t in trial.study.get_trials(deepcopy=False):
            finished = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            before += finished or (t.state == TrialState.RUNNING and t.number < trial.number)
        return before >= self.scfg.n_trials

    def _record_unbuildable(self, tracker: Tracker, trial: Any, tags: dict, reason: str) -> None:
        tags = {**tags, "optuna_state": "PRUNED", "pruned_reason": reason}
        name = f"{self.scfg.study}/trial-{trial.number}"
        with tracker.run(self.experiment(), name, tags, self.parent_run_id) as run:
            run.log_params({f"search.{k}": v for k, v in trial.params.items()})
            run.fail(f"_Pruned: {reason}", status="KILLED")  # as a pruned trial's run ends


# ---------------------------------------------------------------------------------------------
# Running a study


@dataclass
class SearchResult:
    study: Any
    parent_run_id: str | None
    storage: str


def run_search(
    path: str | Path,
    sets: list[str] | None = None,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    tracking_uri: str | None = None,
) -> SearchResult:
    import optuna

    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout {timeout}: must be a positive number of seconds")
    scfg, cfg = _load(path, sets, study_name, n_trials)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    uri = resolve_uri(tracking_uri or cfg.tracking.uri or None)
    storage = storage or default_storage(uri, workers)  # before the clamp: the same file
    check_not_tracking_store(storage, uri)
    workers = _clamp_search_workers(workers, scfg, cfg)
    study = _open_study(scfg, storage, cfg.train.epochs)
    tracker = make_tracker(uri)
    experiment = cfg.tracking.experiment
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    with tracker.run(
        experiment, f"study/{scfg.study}", {"kind": "study", "study": scfg.study}, run_id=parent_id
    ) as parent:
        if parent_id is None:
            study.set_user_attr("mlflow_parent_run_id", parent.run_id)
            parent.log_params(
                {
                    **flatten({"search": {k: v for k, v in scfg.__dict__.items() if k != "space"}}),
                    "search.space": json.dumps(space_tables(scfg.space)),
                    "search.storage": storage,
                }
            )
        _run_workers((str(path), sets, storage, scfg, uri, parent.run_id, timeout), workers)
        study = optuna.load_study(study_name=scfg.study, storage=make_storage(storage, scfg))
        _finish(study, scfg, tracker, parent)
        _check_something_was_built(study)
    return SearchResult(study, parent.run_id, storage)


def _open_study(scfg: SearchConfig, storage: str, epochs: int) -> Any:
    """The study in ``storage``: a new one, or the one of that name to go on with (refused if
    its space, sampler or objectives changed)."""
    import optuna

    quiet_optuna()
    study = optuna.create_study(
        storage=make_storage(storage, scfg),
        study_name=scfg.study,
        directions=[OBJECTIVES[o] for o in scfg.objectives],
        sampler=make_sampler(scfg),
        pruner=make_pruner(scfg, epochs),
        load_if_exists=True,
    )
    if study.metric_names is None:
        study.set_metric_names(list(scfg.objectives))
    _check_fingerprint(study, scfg, storage)
    return study


def _clamp_search_workers(workers: int, scfg: SearchConfig, cfg: Any) -> int:
    """More workers than trials wanted, or (on CPU) than cores, only slow every trial down:
    lowered with a note, as the matrix's are."""
    import torch

    from suite.runtime import clamp_workers

    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    return clamp_workers(workers, scfg.n_trials, 0, cuda, command="search", unit="trial")


def space_tables(space: dict[str, Choices | Range | Tie]) -> dict[str, dict[str, Any]]:
    return {k: spec_table(v) for k, v in space.items()}


def _check_fingerprint(study: Any, scfg: SearchConfig, storage: str) -> None:
    """A study keeps the hash of its space, sampler and objectives: resuming it with others
    would mix two searches in one, so that is refused."""
    space = space_tables(scfg.space)
    what = {"space": space, "sampler": scfg.sampler, "objectives": list(scfg.objectives)}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", digest[:16])
    elif known != digest[:16]:
        raise UserError(
            f"study '{scfg.study}' already exists in {storage} with another search space, "
            "sampler or objectives: name a new one with --study NAME"
        )


def _load(
    path: str | Path, sets: list[str] | None, study_name: str | None, n_trials: int | None
) -> tuple[SearchConfig, Any]:
    """The search section, with --study and --n-trials applied, and the base run's Config."""
    raw = apply_sets(read_toml(path), sets)
    scfg = parse_search(raw, str(path))
    if study_name:
        scfg = SearchConfig(**{**scfg.__dict__, "study": study_name})
    if n_trials is not None:
        if n_trials < 1:
            raise UserError(f"--n-trials must be >= 1, got {n_trials}")
        scfg = SearchConfig(**{**scfg.__dict__, "n_trials": n_trials})
    if scfg.sampler == "grid":
        size = math.prod(len(v) for v in grid_space(scfg.space).values())
        if scfg.n_trials > size:  # past the grid, GridSampler repeats points: duplicates
            print(
                f"note: search: the grid has {size} point(s); n_trials {scfg.n_trials} "
                f"lowered to {size}",
                file=sys.stderr,
            )
            scfg = SearchConfig(**{**scfg.__dict__, "n_trials": size})
    base = {k: v for k, v in raw.items() if k not in ("search", "matrix")}
    return scfg, checked_config(base, str(path))  # the base must be a valid run on its own


def _run_workers(args: tuple, workers: int) -> None:
    """One worker in this process, or ``workers`` spawned processes on the same study."""
    if workers == 1:
        _worker(*args)
        return
    spawn_workers(_worker, [args] * workers)


def _worker(path, sets, storage, scfg: SearchConfig, uri, parent_id, timeout) -> None:
    """One worker process: optimise the shared study until it holds n_trials finished trials."""
    import optuna
    from optuna.trial import TrialState

    quiet_optuna()
    raw = apply_sets(read_toml(path), sets)
    base = {k: v for k, v in raw.items() if k not in ("search", "matrix")}
    cfg = checked_config(base, str(path))
    study = optuna.load_study(
        study_name=scfg.study,
        storage=make_storage(storage, scfg),
        sampler=make_sampler(scfg),
        pruner=make_pruner(scfg, cfg.train.epochs),
    )
    objective = Objective(base, scfg, uri, parent_id, str(path))
    tracker = objective.tracker()
    experiment = objective.experiment()
    t0 = time.monotonic()
    while True:
        reap_dead_trials(study, tracker, experiment, scfg)
        trials = study.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
        if timeout and time.monotonic() - t0 > timeout:
            break
        if count[TrialState.WAITING] == 0:  # queued retries always run
            if finished >= scfg.n_trials:
                break
            if finished + count[TrialState.RUNNING] >= scfg.n_trials:
                # the rest are in flight: wait until they finish, or their worker is found
                # dead (its trial failed and queued again), instead of overshooting n_trials
                time.sleep(min(scfg.heartbeat_interval, 2))
                continue
            if len(trials) >= 3 * scfg.n_trials:  # trials that keep failing: give up
                break
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[print_trial_line])


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if 1e-2 <= abs(v) < 1e3 else f"{v:.1e}".replace("e-0", "e-")
    return str(v)


def trial_line(trial: Any, objectives: list[str] | None = None) -> str:
    """``trial 3  patch_size=8 pixel_size=4 inner_heads=2 lr=3.1e-3  COMPLETE  top-1 41.2``:
    parameters by their last name (a tied group's keys spelled out), the Optuna state, then
    the objective values (complete) or the reason (pruned, failed)."""
    params: dict[str, Any] = {}
    for k, v in trial.params.items():
        group = json.loads(v) if isinstance(v, str) and v[:1] == "{" else {k: v}
        params.update(group)
    shown = " ".join(f"{k.rpartition('.')[2]}={_short(v)}" for k, v in params.items())
    line = f"trial {trial.number}  {shown}  {trial.state.name}"
    if trial.values:
        names = objectives or [f"value{i}" for i in range(len(trial.values))]
        line += "  " + "  ".join(
            f"{'top-1' if n == 'val_top1' else n} {_short(v)}"
            for n, v in zip(names, trial.values, strict=False)
        )
    attrs = trial.user_attrs
    reason = attrs.get("pruned_reason") or attrs.get("fail_reason")
    if trial.state.name == "PRUNED" and not reason and "pruned_epoch" in attrs:
        reason = f"after epoch {attrs['pruned_epoch']}"
    if reason and not trial.values:
        line += f"  ({str(reason).splitlines()[0][:80]})"
    return line


def print_trial_line(study: Any, trial: Any) -> None:
    """Optuna callback: one stderr line per finished trial."""
    print(trial_line(trial, study.metric_names), file=sys.stderr, flush=True)


def reap_dead_trials(study: Any, tracker: Tracker, experiment: str, scfg: SearchConfig) -> None:
    """Fail the trials of workers that died, queue their parameters again (``max_retry``
    times at most: ``reap_dead_workers``, as the matrix's cells), and end their MLflow runs
    KILLED."""
    from optuna.trial import TrialState

    reap_dead_workers(study, scfg.max_retry, lambda t: (t.params, {}))
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    runs = tracker.runs(experiment, status="RUNNING", kind="trial", study=scfg.study)
    for _, r in runs.iterrows():
        if int(r[tag_col("trial")]) not in running:  # its trial ended without it: the worker died
            tracker.attach(r["run_id"]).end("KILLED")


def _check_something_was_built(study: Any) -> None:
    """A study whose every trial was pruned as unbuildable answered nothing: a user error."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    reasons = [t.user_attrs.get("pruned_reason") for t in trials if t.state == TrialState.PRUNED]
    if trials and len(reasons) == len(trials) and all(reasons):
        raise UserError(f"search: no trial could be built from search.space ({reasons[0]})")


def format_search(r: SearchResult) -> str:
    """Trial counts by state, then the best trial or the Pareto front as a table."""
    import pandas as pd
    from optuna.trial import TrialState

    study = r.study
    trials = study.get_trials(deepcopy=False)
    head = f"study {study.study_name}: {state_counts(trials)}"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return head + "\n(no complete trial)"
    multi = len(study.directions) > 1
    best = pareto_front(study) if multi else [study.best_trial]
    names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
    rows = [
        {
            "trial": t.number,
            **dict(zip(names, t.values, strict=True)),
            **t.params,
            "mlflow_run": t.user_attrs.get("mlflow_run_id", ""),
        }
        for t in best
    ]
    label = "Pareto front (non-dominated)" if multi else "best trial"
    return (
        f"{head}\n{label}:\n{pd.DataFrame(rows).to_string(index=False)}\n"
        f"storage {redact(r.storage)}  parent run {r.parent_run_id}"
    )


def state_counts(trials: list[Any]) -> str:
    """'N complete, M pruned, K failed' by Optuna state (running/waiting ones added if any)."""
    from optuna.trial import TrialState

    return count_line({s.name: sum(t.state == s for t in trials) for s in TrialState})


def count_line(counts: dict[str, int]) -> str:
    """The counts line from Optuna state names -> trials: the console's and the report's."""
    text = (
        f"{counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
        f"{counts.get('FAIL', 0)} failed"
    )
    for state in ("RUNNING", "WAITING"):
        if counts.get(state):
            text += f", {counts[state]} {state.lower()}"
    return text


def pareto_front(study: Any) -> list[Any]:
    return list(study.best_trials)


def _finish(study: Any, scfg: SearchConfig, tracker: Tracker, parent: Any) -> None:
    """Tag the best trial(s), log the Pareto front and Optuna's plots on the parent run."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = pareto_front(study) if len(scfg.objectives) > 1 else [study.best_trial]
    front = [
        {
            "trial": t.number,
            "values": dict(zip(scfg.objectives, t.values, strict=True)),
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        }
        for t in best
    ]
    parent.log_dict(front, "pareto_front.json" if len(best) > 1 else "best_trial.json")
    for t in best:
        rid = t.user_attrs.get("mlflow_run_id")
        if rid:
            tracker.attach(rid).set_tags({"best": "true"})
    if len(scfg.objectives) == 1:
        parent.log_metrics({f"best_{scfg.objectives[0]}": study.best_value})
    _log_plots(study, scfg, parent)


def _log_plots(study: Any, scfg: SearchConfig, parent: Any) -> None:
    from optuna.visualization import matplotlib as ovm

    from suite.plots import pyplot

    plt = pyplot()

    target = None if len(scfg.objectives) == 1 else (lambda t: t.values[0])
    name = scfg.objectives[0]
    plots = {
        "history.png": lambda: ovm.plot_optimization_history(
            study, target=target, target_name=name
        ),
        "param_importances.png": lambda: ovm.plot_param_importances(
            study, target=target, target_name=name
        ),
        "slice.png": lambda: ovm.plot_slice(study, target=target, target_name=name),
        "contour.png": lambda: ovm.plot_contour(study, target=target, target_name=name),
    }
    if len(scfg.objectives) > 1:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(
            study, target_names=list(scfg.objectives)
        )
    import warnings

    for fname, make in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            parent.log_figure(fig, f"optuna/{fname}")
            plt.close(fig)
        except Exception as e:  # too few trials for a plot: say so, never fail the study
            print(f"plot {fname} skipped: {e}", file=sys.stderr)
