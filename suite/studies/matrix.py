"""``tntbench matrix``: models x datasets x seeds x any config key, one tracked run per cell.

A ``[matrix]`` table lists the axes; the config's other sections are the base of every cell.

    [matrix]
    name = "smoke"
    models = ["tnt_nano", "vit_nano"]
    datasets = ["synthetic"]             # or tables: [{ name = "cifar10", root = "/data" }]
    seeds = [0, 1]
    "model.inner_heads" = [1, 2, 4]      # any dotted config key: a product axis
    pixel = [                            # a list of tables: keys tied together, one axis
      { "model.pixel_size" = 2, "model.inner_dim" = 6 },
      { "model.pixel_size" = 4, "model.inner_dim" = 24 },
    ]

Cells whose resolved config (hashed, seed included) already has a FINISHED run in the
experiment are skipped, so a rerun after a crash runs only what is missing; an edited config
makes new cells, and the summary reads only the runs of the cells as they are now. A failing cell is
recorded as FAILED with its error and the matrix goes on.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from suite.config import (
    OWN_AXIS,
    apply_sets,
    from_dict,
    parse_matrix,
    read_toml,
    with_values,
)
from suite.errors import MissingPathError, UserError, parse_assignment, redact
from suite.tracking import (
    Tracker,
    flatten,
    is_param_col,
    metric_col,
    param_col,
    param_key,
    process_is_gone,
    select_runs,
    tag_col,
)


@dataclass
class Cell:
    index: int
    overrides: dict[str, Any]  # dotted key -> value, the cell's own settings
    varied: dict[str, Any]  # the subset that varies across the matrix (for params and tables)
    raw: dict[str, Any] = field(default_factory=dict)  # base config with overrides applied
    digest: str = ""
    seeds: int = 1  # how many seeds the matrix has: a group with fewer runs is partial

    @property
    def model(self) -> str:
        return self.overrides["model.name"]

    @property
    def dataset(self) -> str:
        return self.overrides["data.name"]

    @property
    def seed(self) -> int:
        return self.overrides["train.seed"]

    @property
    def run_name(self) -> str:
        """Short, distinguishing parts first: ``tnt_nano s0 inner_heads=2`` (the dataset only
        when it varies; it is always a param and a tag)."""
        extra = [
            f"{k.split('.')[-1]}={v}"
            for k, v in self.varied.items()
            if k not in ("model.name", "data.name", "train.seed", "data.root")
        ]
        data = [self.dataset] if "data.name" in self.varied else []
        return " ".join([self.model, *data, f"s{self.seed}", *extra])

    def run_tags(self, matrix: str) -> dict[str, Any]:
        """The tags of the cell's run. Which config keys vary is a tag: the values are the
        run's params already (model.name, train.seed, ...), so MLflow's compare view shows
        each once."""
        return {
            "kind": "cell",
            "matrix": matrix,
            "cell_hash": self.digest,
            "cell": self.index,
            "varied": ",".join(self.varied),
            "dataset": self.dataset,
            "matrix_n_seeds": self.seeds,
        }


def config_digest(raw: dict[str, Any]) -> str:
    """Hash of a cell's resolved config (everything but tracking), seed included: every key
    with its value after defaults, so that spelling out a default changes nothing, while
    any edited setting (or a changed default) makes a new cell, never pooled with the old
    runs. A cell whose config is invalid (it fails alone, when it runs) hashes as written."""
    try:
        body: dict[str, Any] = from_dict(raw, "cell", check_paths=False).to_dict()
    except UserError:
        body = dict(raw)
    body = {k: v for k, v in body.items() if k not in ("tracking", "matrix", "search")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Expanded(NamedTuple):
    """A matrix TOML read: its name, the base raw config, the cells, the workers' retry limit."""

    name: str
    base: dict
    cells: list[Cell]
    max_retry: int


def expand(path: str | Path, sets: list[str] | None = None) -> Expanded:
    """A matrix TOML's name, base raw config, cells and ``max_retry``; every cell's config
    validated lazily (a bad cell fails alone, when it runs)."""
    for text in sets or []:  # the named axes set these in every cell: --set would be lost
        key = parse_assignment(text, "--set")[0]
        if key in OWN_AXIS:
            raise UserError(
                f"--set {key}: a matrix sets {key} from matrix.{OWN_AXIS[key]}; use "
                f"--set matrix.{OWN_AXIS[key]}=[...] instead"
            )
    raw = apply_sets(read_toml(path), sets)
    mcfg = parse_matrix(raw, str(path))
    name, axes = mcfg.name, mcfg.axes
    base = {k: v for k, v in raw.items() if k != "matrix"}
    combos = list(itertools.product(*axes))
    varied_keys = {k for axis in axes if len(axis) > 1 for choice in axis for k in choice}
    cells = []
    for i, combo in enumerate(combos):
        overrides: dict[str, Any] = {}
        for choice in combo:
            overrides.update(choice)
        cell_raw = with_values(copy.deepcopy(base), overrides, f"{path}: [matrix]")
        varied = {k: v for k, v in overrides.items() if k in varied_keys}
        cells.append(Cell(i, overrides, varied, cell_raw, config_digest(cell_raw)))
    seeds = len({c.seed for c in cells})
    for c in cells:
        c.seeds = seeds
    _check_base(base, cells, str(path))
    return Expanded(name, base, cells, mcfg.max_retry)


def _check_base(base: dict, cells: list[Cell], source: str) -> None:
    """Unknown sections/keys and bad types in the shared base fail the whole matrix up front;
    a model that cannot be built fails only its own cells, when they run (so an expansion
    needs no torch: a rerun that skips every cell starts fast)."""
    from_dict(cells[0].raw, source, check_paths=False)


def cells_table(cells: list[Cell], done: set[str] | None = None) -> pd.DataFrame:
    rows = []
    for c in cells:
        row = {"cell": c.index, "model": c.model, "dataset": c.dataset, "seed": c.seed}
        row.update(
            {
                k: v
                for k, v in c.varied.items()
                if k not in ("model.name", "data.name", "train.seed")
            }
        )
        row["hash"] = c.digest
        if done is not None:
            row["status"] = "done" if c.digest in done else "todo"
        rows.append(row)
    return pd.DataFrame(rows, dtype=object).fillna("-")


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class CellContext:
    """What every cell of one matrix runs with: where its run is recorded (the matrix's
    experiment, under its parent run) and how many inference steps profile it."""

    matrix: str  # the matrix's name
    experiment: str
    parent_id: str
    tracker: Tracker
    profile_steps: int = 3


@dataclass
class MatrixResult:
    name: str
    parent_run_id: str
    ran: int
    skipped: int
    failed: int
    summary: pd.DataFrame
    runs: pd.DataFrame  # one row per finished cell: its MLflow metrics


def _read(
    tracker: Tracker, experiment: str, runs: pd.DataFrame | None, status: str | None = None, **tags
) -> pd.DataFrame:
    """``tracker.runs(experiment, status, **tags)``, or the same selected from ``runs`` (all of
    the experiment's runs, read once by the caller)."""
    if runs is None:
        return tracker.runs(experiment, status, **tags)
    return select_runs(runs, status, **tags) if len(runs) else runs


def finished_digests(
    tracker: Tracker, experiment: str, runs: pd.DataFrame | None = None
) -> dict[str, str]:
    """cell hash -> run ID of the FINISHED cell runs already in the experiment."""
    df = _read(tracker, experiment, runs, "FINISHED", kind="cell")
    if df.empty or tag_col("cell_hash") not in df:
        return {}
    return dict(zip(df[tag_col("cell_hash")], df["run_id"], strict=True))


def _parent_run_id(
    tracker: Tracker, experiment: str, name: str, runs: pd.DataFrame | None = None
) -> str | None:
    df = _read(tracker, experiment, runs, kind="matrix", matrix=name)
    return None if df.empty else str(df.sort_values("start_time")["run_id"].iloc[0])


def open_parent(
    tracker: Tracker,
    experiment: str,
    name: str,
    cells: list[Cell],
    path: str | Path,
    runs: pd.DataFrame | None = None,
) -> str:
    """The matrix's parent run ID: the existing one, or a new one with the matrix's params."""
    known = _parent_run_id(tracker, experiment, name, runs)
    if known is not None:
        return known
    with tracker.run(experiment, f"matrix/{name}", {"kind": "matrix", "matrix": name}) as parent:
        seeds = len({c.seed for c in cells})
        params = {"matrix.cells": len(cells), "matrix.n_seeds": seeds, "matrix.config": str(path)}
        parent.log_params(params)
    return parent.run_id


def finish_parent(
    parent: Any,
    tracker: Tracker,
    experiment: str,
    name: str,
    cells: list[Cell],
    runs: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Summary, finished cell runs and failed count, logged onto the parent: the summary as
    text and CSV, and per group the mean top-1 and img/s (so the collapsed parent row in the
    MLflow UI already answers the matrix's question)."""
    wanted = {c.digest for c in cells}
    runs = cell_runs(tracker, experiment, name, wanted, runs)
    summary = summarize(runs, seeds=len({c.seed for c in cells}))
    got = set(runs[tag_col("cell_hash")]) if len(runs) else set()
    failed = len(wanted - got)
    if len(summary):
        parent.log_text(format_summary(summary), "summary.txt")
        parent.log_text(summary.to_csv(index=False), "summary.csv")
        parent.log_metrics(summary_metrics(summary))
        # the run page's description: the summary, readable without opening an artifact
        parent.set_tags({"mlflow.note.content": f"```\n{format_summary(summary)}\n```"})
    parent.log_metrics({"cells_failed": failed, "cells_done": len(wanted & got)})
    return summary, runs, failed


def run_matrix(
    path: str | Path,
    tracker: Tracker,
    sets: list[str] | None = None,
    progress: bool = True,
    profile_steps: int = 3,
) -> MatrixResult:
    """The matrix in this process, cell after cell (no storage needed); a rerun runs only
    the cells not FINISHED yet, and a cell cut short by a killed process goes on in its run."""
    name, base, cells, _ = expand(path, sets)
    experiment = base.get("tracking", {}).get("experiment") or name
    # the experiment's runs read once: finished cells, the parent and cut-short cells all
    # come from it (a rerun of a finished 1,000-cell matrix read them four times; issue 24)
    everything = tracker.runs(experiment)
    done = finished_digests(tracker, experiment, everything)
    todo = [c for c in cells if c.digest not in done]
    check_paths(todo, path)
    parent_id = open_parent(tracker, experiment, name, cells, path, everything)
    running = unfinished_cells(tracker, experiment, name, everything)
    bar = _MatrixBar(cells, todo, name) if progress else None
    ctx = CellContext(name, experiment, parent_id, tracker, profile_steps)
    with tracker.run(experiment, f"matrix/{name}", run_id=parent_id) as parent:
        for cell in todo:
            _run_or_skip(cell, running, bar, ctx)
        if bar is not None:
            bar.close()
        # nothing ran: the runs read at the start are still the store's
        known = everything if not todo else None
        summary, runs, failed = finish_parent(parent, tracker, experiment, name, cells, known)
    return MatrixResult(name, parent_id, len(todo), len(cells) - len(todo), failed, summary, runs)


def _run_or_skip(cell: Cell, running: dict, bar: _MatrixBar | None, ctx: CellContext) -> None:
    run_id, alive = running.get(cell.digest, (None, False))
    if alive:  # another process is training it right now: it will record it
        print(
            f"cell {cell.index} ({cell.run_name}) is running in another process "
            f"(run {run_id}): skipped",
            file=sys.stderr,
        )
    else:  # a cell cut short by a killed process goes on in its run
        on_epoch = bar.start(cell) if bar is not None else None
        run_cell(cell, ctx, run_id, on_epoch)
    if bar is not None:
        bar.finish(cell)


class _MatrixBar:
    """The matrix's bar counts epochs, so its ETA follows the training done, not the cells
    (a 6-cell matrix would otherwise sit at 0/6 through its first cell); the cell's own
    per-step bar (on a terminal) sits below it. Each cell's start is a line of its own."""

    def __init__(self, cells: list[Cell], todo: list[Cell], name: str) -> None:
        from tqdm import tqdm

        self.epochs = {c.digest: int(c.raw.get("train", {}).get("epochs", 1)) for c in cells}
        total = sum(self.epochs.values())
        left = sum(self.epochs[c.digest] for c in todo)
        self.name, self.n_cells, self.done = name, len(cells), len(cells) - len(todo)
        self.bar = tqdm(
            total=total,
            initial=total - left,
            unit="epoch",
            desc=f"matrix {name}",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,  # on a terminal; logs get the cell and epoch lines alone
        )
        self.counted = 0

    def start(self, cell: Cell) -> Callable[[int, dict[str, float]], None]:
        self.counted = 0
        what = f"cell {self.done + 1}/{self.n_cells} {cell.run_name}"
        self.bar.set_postfix_str(what)
        self.bar.write(f"matrix {self.name}: {what}", file=sys.stderr)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.counted += 1
            self.bar.update(1)

        return on_epoch

    def finish(self, cell: Cell) -> None:
        self.bar.update(self.epochs[cell.digest] - self.counted)  # resumed or failed early
        self.done += 1

    def close(self) -> None:
        self.bar.close()


def check_paths(cells: list[Cell], path: str | Path) -> None:
    """A missing data root or teacher is every cell's mistake: it stops the matrix before any
    work. A cell that is impossible alone is recorded FAILED when its turn comes."""
    for c in cells:
        try:
            from_dict(c.raw, str(path))
        except MissingPathError:
            raise
        except UserError:
            pass


# a cell run cut short goes on in its own run from its checkpoint: RUNNING when its process
# was killed (kill -9, a lost machine), KILLED when it was interrupted (Ctrl-C, SIGTERM); a
# FAILED cell starts afresh (its error would recur from the same state)
RESUMABLE = ("RUNNING", "KILLED")


def unfinished_cells(
    tracker: Tracker, experiment: str, matrix: str, runs: pd.DataFrame | None = None
) -> dict:
    """cell hash -> (run ID, alive) of the matrix's cell runs cut short (``RESUMABLE``), the
    newest per cell: alive while RUNNING unless its process is known to be gone (killed on
    this host)."""
    df = _read(tracker, experiment, runs, kind="cell", matrix=matrix)
    df = df[df["status"].isin(RESUMABLE)] if len(df) else df
    out: dict[str, tuple[str, bool]] = {}
    for _, r in df.sort_values("start_time").iterrows() if len(df) else []:
        host, pid = r.get(tag_col("host"), ""), int(r.get(tag_col("pid"), 0) or 0)
        gone = r["status"] != "RUNNING" or process_is_gone(host, pid, r["start_time"])
        out[r[tag_col("cell_hash")]] = (r["run_id"], not gone)
    return out


def run_cell(
    cell: Cell,
    ctx: CellContext,
    continue_run: str | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> bool:
    """Train and profile one cell; False (recorded as FAILED with the error) if it fails."""
    tags = cell.run_tags(ctx.matrix)
    raw = copy.deepcopy(cell.raw)
    raw.setdefault("tracking", {}).update(experiment=ctx.experiment, run_name=cell.run_name)
    try:
        cfg = from_dict(raw, f"cell {cell.index}")
        from suite.models import check_model_config

        check_model_config(cfg.model.name, cfg.model.overrides)
    except UserError as e:
        with ctx.tracker.run(ctx.experiment, cell.run_name, tags, ctx.parent_id) as run:
            run.log_params(flatten(raw))
            run.fail(f"UserError: {e}")  # the impossible cell, recorded FAILED with its error
        print(f"cell {cell.index} ({cell.run_name}) FAILED: {redact(str(e))}", file=sys.stderr)
        return False
    # imported on first use: a rerun that skips every cell is fast
    from suite.training.fit import StudyLink, fit

    try:
        result = fit(
            cfg,
            ctx.tracker,
            continue_run=continue_run,
            study=StudyLink(ctx.parent_id, tags),
            on_epoch=on_epoch,
            progress=on_epoch is not None,
        )
        _profile_cell(cfg, result, ctx.tracker, ctx.profile_steps)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        print(
            f"cell {cell.index} ({cell.run_name}) FAILED: {type(e).__name__}: {e}", file=sys.stderr
        )
        return False
    return True


def _profile_cell(cfg, result: Any, tracker: Tracker, steps: int) -> None:
    """Inference throughput and latency of the cell's trained architecture, onto its run (a
    ``suite.training.fit.TrainResult``), with the conditions it was timed in."""
    from suite.models import create_model, model_img_size
    from suite.profile import TimingOptions, time_model
    from suite.runtime import resolve_device
    from suite.training.engine import training_noise

    run_id = result.run_id
    if not run_id:
        return
    size = model_img_size(cfg.model.name, cfg.model.overrides)
    model = create_model(cfg.model.name, **cfg.model.overrides)
    device = resolve_device(cfg.train.device)
    # compiled as the cell's training was (train.compile: auto = whole model on CUDA)
    opts = TimingOptions("infer", "fp32", warmup=1, steps=steps, compile=cfg.train.compile)
    t = time_model(model, size, cfg.train.batch_size, opts, device=device)
    run = tracker.attach(run_id)
    run.log_metrics(
        {
            "infer_img_per_s": t.img_per_s,
            "infer_step_ms": t.step_ms,
            "infer_peak_mb": t.peak_mb,
            "infer_compile_s": t.compile_s,
            **{f"infer_{k}": v for k, v in t.conditions.items()},
        }
    )
    if t.compile_fallback:
        run.set_tags({"infer_compile_fallback": t.compile_fallback})
    # one tag for the run (fit set it for a disturbed epoch): keep that reason beside this one
    if t.noisy_reason:
        train = [(i, training_noise(h, device)) for i, h in enumerate(result.history)]
        train = [f"train img/s, epoch {i + 1}: {r}" for i, r in train if r][-1:]
        run.set_tags({"timing_noisy": "; ".join([*train, f"infer img/s: {t.noisy_reason}"])})


# the metrics a summary reports, as stored on each cell run
SUMMARY_METRICS = {
    "params_m": "params (M)",
    "gmacs": "GMACs",
    "train_img_per_s": "train img/s",
    "infer_img_per_s": "infer img/s",
}


def cell_runs(
    tracker: Tracker,
    experiment: str,
    matrix: str,
    digests: set[str] | None = None,
    runs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The matrix's FINISHED cell runs (newest per cell hash), one row each; with ``digests``
    (the current cells' config hashes) only those: runs of an earlier version of the matrix
    (train.epochs edited, say) are other cells, and pooling them with the new runs would
    count them as extra seeds. How many were left out is said on stderr. ``runs``: the
    experiment's runs already read (one read per command), else they are read here."""
    df = _read(tracker, experiment, runs, "FINISHED", kind="cell", matrix=matrix)
    if df.empty:
        return df
    df = df.sort_values("start_time").drop_duplicates(tag_col("cell_hash"), keep="last")
    if digests is not None:
        stale = ~df[tag_col("cell_hash")].isin(digests)
        if stale.any():
            print(
                f"note: matrix {matrix}: {int(stale.sum())} finished run(s) of an earlier "
                "config of this matrix left out of the summary (their cells' settings differ "
                "from the config now)",
                file=sys.stderr,
            )
        df = df[~stale]
    return df.reset_index(drop=True)


def varied_columns(runs: pd.DataFrame) -> list[str]:
    """The param columns of the matrix's axes beyond model, dataset and seed: the keys named
    in the cells' ``varied`` tag (runs from before that tag: their ``params.varied.*``)."""
    own = {"model.name", "data.name", "train.seed"}
    keys: set[str] = set()
    for v in runs[tag_col("varied")].dropna() if tag_col("varied") in runs else []:
        keys |= {k for k in str(v).split(",") if k and k not in own}
    cols = {param_col(k) for k in keys} & set(runs.columns)
    legacy = {c for c in runs.columns if is_param_col(c, "varied.")}
    return sorted(cols | {c for c in legacy if param_key(c, "varied.") not in own})


def group_runs(runs: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """Runs grouped by model, dataset and every other varied key (seeds pooled), in order of
    appearance: ({"model", "dataset", <varied key>...}, the group's runs); missing -> "-"."""
    varied = varied_columns(runs)
    keys = [param_col("model.name"), param_col("data.name"), *varied]
    df = runs.copy()
    for c in keys:
        df[c] = df[c].fillna("-")
    names = ["model", "dataset"]
    names += [param_key(param_key(c, "varied.")) for c in varied]
    for key, g in df.groupby(keys, sort=False):
        yield dict(zip(names, key, strict=True)), g


def summarize(runs: pd.DataFrame, seeds: int | None = None) -> pd.DataFrame:
    """Per model, dataset (and any other varied key): params, GMACs, img/s, and top-1 as
    mean +- std over seeds, all read from the MLflow metrics of the cell runs. With ``seeds``
    (the matrix's count), a group with fewer finished runs is ``partial`` (still running, or
    some failed)."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    for row, g in group_runs(runs):
        for m, label in SUMMARY_METRICS.items():
            col = metric_col(m)
            row[label] = g[col].mean() if col in g else float("nan")
        top1 = g[metric_col("val_top1")]
        row["top-1 mean"] = top1.mean()
        row["top-1 std"] = top1.std(ddof=1) if len(top1) > 1 else 0.0
        row["top-1"] = f"{row['top-1 mean']:.2f} +- {row['top-1 std']:.2f}"
        row["n"] = len(g)
        row["partial"] = seeds is not None and len(g) < seeds
        row["run_ids"] = ",".join(g["run_id"])
        tag = g[tag_col("timing_noisy")].dropna() if tag_col("timing_noisy") in g else []
        row["timing_noisy"] = "; ".join(tag)  # suite.noise: a disturbed img/s figure
        rows.append(row)
    return pd.DataFrame(rows)


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Per group, its top-1 (mean, std over seeds) and img/s under stable names
    (``val_top1_mean/tnt_nano``, ``train_img_per_s_mean/tnt_nano inner_heads 2``), rounded as
    they are read (accuracy to 2 decimals, img/s to integers), for the parent run."""
    out = {}
    fixed = {
        "top-1 mean",
        "top-1 std",
        "top-1",
        "n",
        "partial",
        "run_ids",
        "timing_noisy",
        *SUMMARY_METRICS.values(),
    }
    for _, r in summary.iterrows():
        keys = [c for c in summary.columns if c not in fixed and c not in ("model", "dataset")]
        parts = [str(r["model"])]
        if summary["dataset"].nunique() > 1:
            parts.append(str(r["dataset"]))
        parts += [f"{k.split('.')[-1]} {r[k]}" for k in keys]
        label = re.sub(r"[^\w\-. /]", "-", " ".join(parts))
        out[f"val_top1_mean/{label}"] = round(float(r["top-1 mean"]), 2)
        out[f"val_top1_std/{label}"] = round(float(r["top-1 std"]), 2)
        for m in ("train_img_per_s", "infer_img_per_s"):
            v = float(r[SUMMARY_METRICS[m]])
            out[f"{m}_mean/{label}"] = float(round(v)) if v == v else v
    return {k: v for k, v in out.items() if v == v}  # NaN (not measured) left out


def format_summary(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "(no finished cells)"
    hidden = ("top-1 mean", "top-1 std", "run_ids", "timing_noisy", "partial")
    cols = [c for c in summary.columns if c not in hidden]
    df = summary[cols].copy()
    if "partial" in summary:  # a group whose seeds are not all finished (yet)
        df["n"] = summary["n"].where(~summary["partial"], summary["n"].astype(str) + " (partial)")
    noisy = summary.get("timing_noisy", pd.Series([""] * len(df))).fillna("").astype(bool)
    for c in ("train img/s", "infer img/s"):  # a disturbed timing reads 211*, as in profile's
        df[c] = [f"{v:.0f}{'*' if n else ''}" for v, n in zip(df[c], noisy, strict=True)]
    fmt = {"params (M)": "{:.2f}".format, "GMACs": "{:.3f}".format}
    notes = [
        f"* {r['model']}/{r['dataset']}: timing disturbed: {r['timing_noisy']}"
        for (_, r), n in zip(summary.iterrows(), noisy, strict=True)
        if n
    ]
    return "\n".join([df.to_string(index=False, formatters=fmt), *notes])
