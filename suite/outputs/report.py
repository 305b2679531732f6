"""``tntbench report``: the paper's tables and figures regenerated from MLflow, paper beside them.

Reads the runs of the chosen experiments into pandas and writes, to one folder: Markdown, CSV
(with run IDs), LaTeX (booktabs) and one self-contained HTML page (plots inlined), plus PNG
plots; the folder is also logged as the artifacts of a ``report`` run. The tables here hold
numbers; ``report_format`` writes them for readers, ``report_plots`` draws the figures.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from suite.config import safe_name
from suite.models import get_entry, list_models
from suite.outputs.report_format import mask_uri, one_value, stamp, write_pages
from suite.outputs.report_plots import (
    accuracy_figure,
    history_figure,
    importances_figure,
    learning_curves_figure,
    pareto,
    save,
)
from suite.studies.matrix import group_runs, varied_columns
from suite.studies.search import count_line
from suite.studies.storage import readonly_storage
from suite.tracking import (
    Tracker,
    is_param_col,
    metric_col,
    param_col,
    param_key,
    select_runs,
    tag_col,
)

# The TNT paper's ablations on TNT-S, ImageNet top-1 (Han et al. 2021, arXiv 2103.00112,
# section 4.3: inner heads, pixel size, positional encodings)
PAPER_ABLATIONS = {
    "inner_heads": {1: 81.0, 2: 81.4, 4: 81.5, 6: 81.3, 8: 81.1},
    "pixel_size": {2: 81.0, 4: 81.5, 8: 81.1},  # 16x16 patches; inner dim 6 / 24 / 96
    "pos_embed": {"none": 80.5, "pixel only": 80.7, "patch only": 80.8, "both": 81.5},
}
ABLATION_KEYS = ["inner_heads", "pixel_size", "patch_size", "pos_embed"]


@dataclass
class Report:
    out: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    run_id: str = ""
    header: dict[str, str] = field(default_factory=dict)  # generated, version, commit, store...
    experiment_ids: dict[str, str] = field(default_factory=dict)  # run ID -> experiment ID


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(math.nan, df.index)


def _std(s: pd.Series) -> float:
    """Std over seeds (ddof 1); one value has no spread: 0, so it reads "± 0.0"."""
    s = s.dropna()
    if s.empty:
        return math.nan
    return float(s.std(ddof=1)) if len(s) > 1 else 0.0


def _runs_of(tracker: Tracker, experiments: list[str], **tags: str) -> pd.DataFrame:
    """The runs of all ``experiments`` in one frame, each row with its experiment's name."""
    frames = [tracker.runs(e, **tags).assign(experiment=e) for e in experiments]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def training_runs(everything: pd.DataFrame, matrix: str | None) -> pd.DataFrame:
    """FINISHED training runs (matrix cells and plain ``tntbench train`` runs), not trials,
    selected from all runs of the report's experiments (read once)."""
    df = select_runs(everything, status="FINISHED") if not everything.empty else everything
    if df.empty or metric_col("val_top1") not in df:
        return pd.DataFrame()
    df = df[
        df[metric_col("val_top1")].notna()
        & df.get(tag_col("kind"), pd.Series("", df.index)).ne("trial")
    ]
    df = df[df.get(tag_col("kind"), pd.Series("", df.index)).ne("report")]
    if matrix:
        df = df[df.get(tag_col("matrix"), pd.Series("", df.index)) == matrix]
    return df.reset_index(drop=True)


def _pos_label(row: pd.Series) -> str | None:
    patch = str(row.get(param_col("model.patch_pos_embed"), "True")) != "False"
    pixel = str(row.get(param_col("model.pixel_pos_embed"), "True")) != "False"
    return {
        (True, True): "both",
        (True, False): "patch only",
        (False, True): "pixel only",
        (False, False): "none",
    }[(patch, pixel)]


def _noisy(g: pd.DataFrame, tag: str = "timing_noisy") -> str:
    """The reasons some of the group's runs were timed under load (``timing_noisy`` tag), or
    another such mark (``data_bound``: an epoch waited for its data, issue 23)."""
    if tag_col(tag) not in g:
        return ""
    return "; ".join(sorted({str(v) for v in g[tag_col(tag)].dropna() if str(v).strip()}))


def is_imagenet(g: pd.DataFrame) -> bool:
    """The paper's top-1 is ImageNet's: compare it only with runs on ImageNet (an image folder
    whose root names it)."""
    where = " ".join(
        str(v)
        for c in (param_col("data.name"), param_col("data.root"))
        if c in g
        for v in g[c].dropna()
    )
    return "imagenet" in where.lower()


def paper_columns(row: dict[str, Any], g: pd.DataFrame, paper_config: bool) -> None:
    """The paper's params, GMACs and top-1 beside a paper config, and measured - paper."""
    model = row["model"]
    paper = get_entry(model).paper if model in list_models() and paper_config else None
    ref = {
        "params (M)": paper.params_m if paper else None,
        "GMACs": paper.gflops if paper else None,  # the papers' GFLOPs count multiply-adds
        "top-1 mean": paper.top1 if paper and is_imagenet(g) else None,
    }
    for col, label in (("params (M)", "params (M)"), ("GMACs", "GMACs"), ("top-1 mean", "top-1")):
        value = ref[col] if ref[col] is not None else math.nan
        row[f"paper {label}"] = value
        row[f"Δ {label}"] = row[col] - value


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset and varied key: params, GMACs, throughput, latency, memory, top-1/top-5
    over seeds, with the paper's values and measured - paper beside rows that are paper configs."""
    varied = varied_columns(df)
    paper_config = not any(is_param_col(c, "model.", "varied.model.") for c in varied)
    rows = []
    for row, g in group_runs(df):
        row["params (M)"] = _num(g, metric_col("params_m")).mean()
        row["GMACs"] = _num(g, metric_col("gmacs")).mean()
        row["train img/s"] = _num(g, metric_col("train_img_per_s")).mean()
        row["infer img/s"] = _num(g, metric_col("infer_img_per_s")).mean()
        row["infer ms"] = _num(g, metric_col("infer_step_ms")).mean()
        row["infer peak MB"] = _num(g, metric_col("infer_peak_mb")).mean()
        for k in ("top-1", "top-5"):
            acc = _num(g, metric_col(f"val_top{k[-1]}"))
            row[f"{k} mean"], row[f"{k} std"] = acc.mean(), _std(acc)
        row["n"] = len(g)
        row["n planned"] = _num(g, tag_col("matrix_n_seeds")).max()  # a matrix's seeds; else NaN
        row["device / dtype"] = (
            f"{one_value(g, tag_col('device_name'))} / {one_value(g, tag_col('amp'))}"
        )
        paper_columns(row, g, paper_config)
        row["timing_noisy"] = _noisy(g)
        row["data_bound"] = _noisy(g, "data_bound")
        row["run_ids"] = " ".join(g["run_id"])
        rows.append(row)
    t = pd.DataFrame(rows)
    # columns no row fills (no paper config, no inference timing) would only read "-"
    marks = ("timing_noisy", "data_bound")
    empty = [c for c in t.columns if c not in marks and t[c].isna().all()]
    if t["device / dtype"].nunique() == 1:
        empty.append("device / dtype")  # one for all: the header says it
    t = t.drop(columns=empty)
    t.attrs["caption"] = "Main comparison: size, speed and accuracy (mean ± std over seeds)"
    return t


def ablation_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The paper's ablations (inner heads, pixel size, patch size, positional encodings) from
    runs whose configs vary those knobs, top-1 mean +- std with the paper's trend beside."""
    out = {}
    df = df.copy()
    df["pos_embed"] = df.apply(_pos_label, axis=1)
    for key in ABLATION_KEYS:
        col = "pos_embed" if key == "pos_embed" else param_col(f"model.{key}")
        if col not in df or df[col].dropna().nunique() < 2:
            continue
        rows = []
        for (model, value), g in df.groupby([param_col("model.name"), col], sort=True):
            row = {"model": model, key: value}
            if key == "pixel_size" and param_col("model.inner_dim") in g:
                row["inner_dim"] = g[param_col("model.inner_dim")].iloc[0]
            row["GMACs"] = _num(g, metric_col("gmacs")).mean()
            acc = _num(g, metric_col("val_top1"))
            row["top-1 mean"], row["top-1 std"] = acc.mean(), _std(acc)
            row["n"] = len(g)
            ref = PAPER_ABLATIONS.get(key, {})
            v = value if key == "pos_embed" else _as_int(value)
            row["paper top-1 (TNT-S, ImageNet)"] = ref.get(v, math.nan)
            row["run_ids"] = " ".join(g["run_id"])
            rows.append(row)
        t = pd.DataFrame(rows)
        t.attrs["caption"] = f"Ablation: {key.replace('_', ' ')} (top-1 mean ± std over seeds)"
        out[f"ablation_{key}"] = t
    return out


def spread_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Feature spread per run and layer, from the metrics ``tntbench viz`` logged."""
    pat = re.compile(r"metrics\.viz_layer(\d+)_mean_pdist")
    layers = sorted(int(m.group(1)) for c in df.columns if (m := pat.fullmatch(c)))
    rows = []
    for _, r in df.iterrows():
        for L in layers:
            v = r.get(metric_col(f"viz_layer{L}_mean_pdist"))
            if v is None or pd.isna(v):
                continue
            rows.append(
                {
                    "model": r.get(param_col("model.name"), "-"),
                    "layer": L,
                    "mean_pdist": v,
                    "dim_std": r.get(metric_col(f"viz_layer{L}_dim_std")),
                    "run_ids": r["run_id"],
                }
            )
    if not rows:
        return None
    t = pd.DataFrame(rows).sort_values(["layer", "model"], kind="stable", ignore_index=True)
    t.attrs["caption"] = "Feature spread (tntbench viz): patch features scaled to unit mean norm"
    return t


def viz_figures(tracker: Tracker, df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The PNGs ``tntbench viz`` logged under the runs' ``viz/<run ids>/``, each set once."""
    plots: dict[str, Path] = {}
    if tag_col("viz_time") not in df:
        return plots
    for rid in df.loc[df[tag_col("viz_time")].notna(), "run_id"]:
        for art in tracker.list_artifacts(rid, "viz"):
            parts = art.split("/")
            if not art.endswith(".png") or len(parts) != 3:
                continue
            name = f"viz_{parts[1]}_{Path(parts[2]).stem}"
            if name not in plots:
                got = tracker.download_artifacts(rid, art, out / ".viz")
                plots[name] = got.replace(out / f"{name}.png")
    shutil.rmtree(out / ".viz", ignore_errors=True)
    return plots


def _as_int(v: Any) -> Any:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return v


def search_tables(everything: pd.DataFrame, study: str | None) -> dict:
    """Per study: best trials (captioned with the trial counts ``tntbench search`` prints), the
    Pareto front (top-1 vs GMACs), and parameter importances once there are enough trials;
    from all runs of the report's experiments (read once)."""
    trials = select_runs(everything, kind="trial") if not everything.empty else everything
    if trials.empty:
        return {}
    if study:
        trials = trials[trials[tag_col("study")] == study]
    parents = select_runs(everything, kind="study")
    out: dict[str, pd.DataFrame] = {}
    for name, g in trials.groupby(tag_col("study")):
        done = g[g["status"] == "FINISHED"].copy()
        if done.empty:
            continue
        counts = study_counts(parents, str(name)) or mlflow_counts(g)
        pcols = [c for c in done.columns if is_param_col(c, "search.")]
        done["top-1 mean"] = _num(done, metric_col("val_top1"))
        done["GMACs"] = _num(done, metric_col("gmacs"))
        done["trial"] = pd.to_numeric(done[tag_col("trial")], errors="coerce")
        cols = ["trial", "top-1 mean", "GMACs", *pcols, "run_id"]
        key = safe_name(name)  # table and plot file names come from it
        best = done.sort_values("top-1 mean", ascending=False)[cols].head(10).rename(columns=_short)
        best.attrs["caption"] = f"Search {key}: best trials (top 10 by val top-1)"
        n_complete = counts.get("COMPLETE", len(done))
        best.attrs["note"] = (
            f"{format_counts(str(name), counts)} (Optuna trial states, as tntbench search prints)"
        )
        best.attrs["history"] = done[["trial", "top-1 mean"]].dropna().reset_index(drop=True)
        out[f"search_{key}_best"] = best
        front = pareto(done, "top-1 mean", "GMACs")[cols].rename(columns=_short)
        front.attrs["caption"] = f"Search {key}: Pareto front (top-1 vs GMACs)"
        out[f"search_{key}_pareto"] = front
        enough = n_complete >= MIN_TRIALS_FOR_IMPORTANCE
        imp = importances(done, pcols, search_space(parents, str(name))) if enough else None
        if imp is not None and not imp.empty:
            how = imp.attrs.get("evaluator", "fANOVA")
            imp.attrs["caption"] = f"Search {key}: parameter importances ({how})"
            out[f"search_{key}_importances"] = imp
        else:
            best.attrs["note"] += ". " + importance_caveat(n_complete)
    return out


# fANOVA on a handful of trials gives every parameter about the same share: noise, not a ranking
MIN_TRIALS_FOR_IMPORTANCE = 10


def importance_caveat(n_complete: int) -> str:
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        return (
            f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
            f"this search has {n_complete}"
        )
    return "Parameter importances could not be computed (fewer than two values per parameter)"


def format_counts(study: str, counts: dict[str, int]) -> str:
    """The line ``format_search`` prints ("study NAME: 3 complete, 3 pruned, 0 failed"), from
    the same function, so the report and the console read the same."""
    return f"study {study}: {count_line(counts)}"


def study_counts(parents: pd.DataFrame, study: str) -> dict[str, int] | None:
    """Trials per Optuna state, read from the study's own storage (the one the search named on
    its parent run), as the console's summary is: None when that storage cannot be read."""
    if parents.empty or param_col("search.storage") not in parents:
        return None
    rows = parents[parents.get(tag_col("study"), pd.Series("", parents.index)) == study]
    for url in rows[param_col("search.storage")].dropna().unique():
        try:
            import optuna
            from optuna.trial import TrialState

            # read-only: the URL comes from the store, and a report writes into no database
            with readonly_storage(url) as storage:
                if storage is None:
                    continue
                st = optuna.load_study(study_name=study, storage=storage)
                trials = st.get_trials(deepcopy=False)
        except Exception:  # moved, unreachable, another study: fall back to the MLflow runs
            continue
        return {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return None


def mlflow_counts(trials: pd.DataFrame) -> dict[str, int]:
    """Optuna states as the trials' MLflow runs record them, when the storage is out of reach:
    FINISHED = complete; KILLED = pruned (in training or unbuildable); FAILED = fail."""
    status = trials["status"]
    return {
        "RUNNING": int((status == "RUNNING").sum()),
        "COMPLETE": int((status == "FINISHED").sum()),
        "PRUNED": int((status == "KILLED").sum()),
        "FAIL": int((status == "FAILED").sum()),
    }


def _short(c: str) -> str:
    return {"run_id": "run_ids"}.get(c, param_key(c, "search."))


# fANOVA (a random forest) is the finer ranking but grows with the trials: about 2 s at 300
# float-valued trials and 22 s at 3,000 on one core; PED-ANOVA (Optuna's evaluator built for
# large studies) stays about 1 s at 3,000, so it takes over above this many trials (measured,
# benchmarks/bench_scale.py).
FANOVA_MAX_TRIALS = 300
# With no search space to read (a study without its parent run), a numeric parameter with more
# distinct values than this was sampled from a range, not chosen from a list.
MAX_INFERRED_CHOICES = 8


def importances(
    done: pd.DataFrame, pcols: list[str], space: dict[str, dict[str, Any]] | None = None
) -> pd.DataFrame:
    """Optuna's importances from the trials' params and val top-1, each parameter with its own
    distribution: a float range stays a float (as a category per trial, fANOVA's cost explodes
    with the trials), an integer range an int, choices categorical. ``space`` is the search's
    ``[search.space]`` tables (the study's parent run logs them); without it they are inferred."""
    if len(done) < 3 or not pcols:
        return pd.DataFrame()
    import optuna

    names = {c: param_key(c, "search.") for c in pcols}
    dists = {names[c]: _distribution(done[c], (space or {}).get(names[c])) for c in pcols}
    trials = []
    for _, r in done.iterrows():
        params = {}
        for c in pcols:
            v = _as_param(r[c], dists[names[c]])
            if v is not None:  # a key this trial did not sample (or logged oddly) is left out
                params[names[c]] = v
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=float(r["top-1 mean"]),
            )
        )
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    evaluator = _evaluator(len(trials))
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception:
        return pd.DataFrame()
    t = pd.DataFrame({"param": list(imp), "importance": [float(v) for v in imp.values()]})
    t.attrs["evaluator"] = "fANOVA" if len(trials) <= FANOVA_MAX_TRIALS else "PED-ANOVA"
    return t


def _numbers(values: pd.Series) -> list[float] | None:
    """The values as floats, or None when any is not a number."""
    try:
        return [float(v) for v in values.dropna()]
    except (TypeError, ValueError):
        return None


def _distribution(values: pd.Series, spec: dict[str, Any] | None) -> Any:
    """The parameter's Optuna distribution: from its ``[search.space]`` table when known (a
    tied or derived key has none), else a range when it is numeric with many distinct values."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    nums = _numbers(values)
    if spec is not None and "low" in spec and "high" in spec and nums is not None:
        # the space's bounds, widened to the logged values (a resumed study may have changed)
        low, high = min([float(spec["low"]), *nums]), max([float(spec["high"]), *nums])
        log = bool(spec.get("log", False)) and low > 0
        if all(isinstance(spec[k], int) for k in ("low", "high")) and all(
            n.is_integer() for n in nums
        ):
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(low, high, log=log)
    if spec is None and nums and len(set(nums)) > MAX_INFERRED_CHOICES:
        low, high = min(nums), max(nums)
        if all(n.is_integer() for n in nums):
            return IntDistribution(int(low), int(high))
        return FloatDistribution(low, high)
    return CategoricalDistribution(sorted({str(v) for v in values}))


def _as_param(value: Any, dist: Any) -> Any:
    """An MLflow param (a string) as the distribution's value; None when it cannot be one."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number):
        return None
    return int(number) if isinstance(dist, IntDistribution) else number


def _evaluator(n_trials: int) -> Any:
    """fANOVA with a fixed seed (the same trials give the same importances in every report) up
    to ``FANOVA_MAX_TRIALS``; PED-ANOVA, deterministic and near-flat in the trials, above."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if n_trials <= FANOVA_MAX_TRIALS:
        return FanovaImportanceEvaluator(seed=0)
    return PedAnovaImportanceEvaluator()


def search_space(parents: pd.DataFrame, study: str) -> dict[str, dict[str, Any]] | None:
    """The study's ``[search.space]`` tables, as its parent run logged them (``search.space``)."""
    import json

    if parents.empty or param_col("search.space") not in parents:
        return None
    rows = parents[parents.get(tag_col("study"), pd.Series("", parents.index)) == study]
    for text in rows[param_col("search.space")].dropna():
        try:
            space = json.loads(text)
        except ValueError:  # too long for MLflow, logged as its hash
            continue
        if isinstance(space, dict):
            return {k: v for k, v in space.items() if isinstance(v, dict)}
    return None


# ---------------------------------------------------------------------------------------------
# Plots


def make_plots(tracker: Tracker, rep: Report, runs: pd.DataFrame) -> None:
    """The report's figures, as PNGs in its folder, keyed by file stem."""
    out = rep.out
    figures = {}
    if "main" in rep.tables:
        main = rep.tables["main"]
        figures["top1_vs_gmacs"] = accuracy_figure(main, "GMACs") if "GMACs" in main else None
        if "train img/s" in main:
            figures["top1_vs_throughput"] = accuracy_figure(main, "train img/s", log_x=True)
        # one bulk read of every run's history, not one query per run
        history = tracker.metric_histories(list(runs["run_id"]), "val_top1")
        curves = {
            str(m): [history[rid] for rid in g["run_id"]]
            for m, g in runs.groupby(param_col("model.name"))
        }
        figures["learning_curves"] = learning_curves_figure(curves)
    for name, t in rep.tables.items():
        if name.endswith("_best") and "history" in t.attrs:
            figures[name.removesuffix("_best") + "_history"] = history_figure(t.attrs["history"])
        if name.endswith("_importances"):
            figures[name] = importances_figure(t)
    for stem, fig in figures.items():
        if fig is not None:
            rep.plots[stem] = save(fig, out / f"{stem}.png")


# ---------------------------------------------------------------------------------------------
# Writing


def run_link(rep: Report, uri: str) -> Any:
    """run ID -> its page on an MLflow server (``<uri>/#/experiments/<id>/runs/<run id>``);
    a file or database store has no pages: None."""
    base = uri.rstrip("/")
    http = base.startswith(("http://", "https://"))

    def link(run_id: str) -> str | None:
        exp = rep.experiment_ids.get(run_id)
        if not http or not exp:
            return None
        return f"{mask_uri(base)}/#/experiments/{exp}/runs/{run_id}"

    return link


def write_outputs(rep: Report, tracking_uri: str) -> None:
    """report.md, report.tex, report.html (self-contained) and one CSV per table."""
    write_pages(rep.out, rep.tables, rep.plots, rep.header, run_link(rep, tracking_uri))


def _out_folder(out: str | Path | None) -> tuple[Path, bool]:
    """The report's folder (created), and whether this call created it."""
    from suite.errors import UserError

    out = Path(out or Path("reports") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    return out, created


def build_report(
    tracker: Tracker,
    experiments: list[str] | None = None,
    matrix: str | None = None,
    study: str | None = None,
    out: str | Path | None = None,
) -> Report:
    from suite.errors import UserError

    names = experiments or [e for e in tracker.experiment_names() if e not in ("reports",)]
    # every run of the experiments, read once; each table selects its own from it
    everything = _runs_of(tracker, names)
    for flag, kind, value in (("--matrix", "matrix", matrix), ("--study", "study", study)):
        if value and (
            everything.empty or select_runs(everything, kind=kind, **{kind: value}).empty
        ):
            raise UserError(f"{flag} {value}: no such {kind} in the store {tracker.uri}")
    out, created = _out_folder(out)
    rep = Report(out)
    runs = training_runs(everything, matrix)
    if not runs.empty:
        rep.tables["main"] = main_table(runs)
        rep.tables.update(ablation_tables(runs))
        sp = spread_table(runs)
        if sp is not None:
            rep.tables["feature_spread"] = sp
    rep.tables.update(search_tables(everything, study))
    if not rep.tables:
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed report leaves no empty folder behind
        raise UserError(f"no finished runs to report on in experiments {names}")
    make_plots(tracker, rep, runs)
    if not runs.empty:
        rep.plots.update(viz_figures(tracker, runs, out))
    uri = getattr(tracker, "uri", "")
    _stamp_and_links(tracker, rep, runs, everything)
    write_outputs(rep, uri)
    with tracker.run("reports", f"report/{out.name}", {"kind": "report"}) as run:
        for f in sorted(out.iterdir()):
            run.log_artifact(f, "report")
        rep.run_id = run.run_id
    return rep


def _stamp_and_links(
    tracker: Tracker, rep: Report, runs: pd.DataFrame, everything: pd.DataFrame
) -> None:
    """The header's stamp (device and dtype over every run shown, trials included), and each
    shown run's experiment ID for its link."""
    trials = select_runs(everything, kind="trial") if not everything.empty else everything
    everything = pd.concat([f for f in (runs, trials) if not f.empty] or [pd.DataFrame()])
    rep.header = stamp(everything, getattr(tracker, "uri", ""))
    experiment_id = getattr(tracker, "experiment_id", None)
    if everything.empty or experiment_id is None:
        return
    ids = {e: experiment_id(e) for e in everything["experiment"].dropna().unique()}
    rep.experiment_ids = dict(
        zip(everything["run_id"], everything["experiment"].map(ids), strict=True)
    )
