"""``tntbench report``: the paper's tables and figures regenerated from MLflow, paper beside them.

Reads the runs of the chosen experiments into pandas and writes, to one folder: Markdown, CSV
(with run IDs), LaTeX (booktabs) and one self-contained HTML page (plots inlined), plus PNG
plots; the folder is also logged as the artifacts of a ``report`` run.
"""

from __future__ import annotations

import base64
import html
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
from suite.plots import pyplot
from suite.studies.matrix import group_runs, varied_columns
from suite.tracking import Tracker

# The TNT paper's ablations on TNT-S, ImageNet (shared/reference/paper_tables.md)
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


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(math.nan, df.index)


def _mean_std(s: pd.Series) -> str:
    s = s.dropna()
    if s.empty:
        return "-"
    return f"{s.mean():.2f} +- {s.std(ddof=1) if len(s) > 1 else 0.0:.2f}"


def training_runs(tracker: Tracker, experiments: list[str], matrix: str | None) -> pd.DataFrame:
    """FINISHED training runs (matrix cells and plain ``tntbench train`` runs), not trials."""
    frames = [tracker.runs(e, status="FINISHED") for e in experiments]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if "metrics.val_top1" not in df:
        return pd.DataFrame()
    df = df[
        df["metrics.val_top1"].notna() & df.get("tags.kind", pd.Series("", df.index)).ne("trial")
    ]
    if matrix:
        df = df[df.get("tags.matrix", pd.Series("", df.index)) == matrix]
    return df.reset_index(drop=True)


def _pos_label(row: pd.Series) -> str | None:
    patch = str(row.get("params.model.patch_pos_embed", "True")) != "False"
    pixel = str(row.get("params.model.pixel_pos_embed", "True")) != "False"
    return {
        (True, True): "both",
        (True, False): "patch only",
        (False, True): "pixel only",
        (False, False): "none",
    }[(patch, pixel)]


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset and varied key: params, GMACs, throughput, top-1/top-5 over seeds,
    with the paper's reference values beside rows that are paper configs."""
    varied = varied_columns(df)
    rows = []
    for row, g in group_runs(df):
        model = row["model"]
        row["params (M)"] = _num(g, "metrics.params_m").mean()
        row["GMACs"] = _num(g, "metrics.gmacs").mean()
        row["train img/s"] = _num(g, "metrics.train_img_per_s").mean()
        row["infer img/s"] = _num(g, "metrics.infer_img_per_s").mean()
        row["device / dtype"] = (
            f"{g.get('tags.device_name', pd.Series(['-'])).iloc[0]} / "
            f"{g.get('tags.amp', pd.Series(['-'])).iloc[0]}"
        )
        row["top-1"] = _mean_std(_num(g, "metrics.val_top1"))
        row["top-5"] = _mean_std(_num(g, "metrics.val_top5"))
        row["top-1 mean"] = _num(g, "metrics.val_top1").mean()
        row["n"] = len(g)
        paper = get_entry(model).paper if model in list_models() else None
        is_paper_config = paper is not None and not any(
            c.startswith(("params.model.", "params.varied.model.")) for c in varied
        )
        row["paper params (M)"] = paper.params_m if is_paper_config and paper.params_m else "-"
        row["paper GFLOPs"] = paper.gflops if is_paper_config and paper.gflops else "-"
        row["paper top-1"] = paper.top1 if is_paper_config and paper.top1 else "-"
        row["run_ids"] = " ".join(g["run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The paper's ablations (inner heads, pixel size, patch size, positional encodings) from
    runs whose configs vary those knobs, top-1 mean +- std with the paper's trend beside."""
    out = {}
    df = df.copy()
    df["pos_embed"] = df.apply(_pos_label, axis=1)
    for key in ABLATION_KEYS:
        col = "pos_embed" if key == "pos_embed" else f"params.model.{key}"
        if col not in df or df[col].dropna().nunique() < 2:
            continue
        rows = []
        for (model, value), g in df.groupby(["params.model.name", col], sort=True):
            row = {"model": model, key: value}
            if key == "pixel_size" and "params.model.inner_dim" in g:
                row["inner_dim"] = g["params.model.inner_dim"].iloc[0]
            row["GMACs"] = _num(g, "metrics.gmacs").mean()
            row["top-1"] = _mean_std(_num(g, "metrics.val_top1"))
            row["n"] = len(g)
            ref = PAPER_ABLATIONS.get(key, {})
            v = value if key == "pos_embed" else _as_int(value)
            row["paper top-1 (TNT-S, ImageNet)"] = ref.get(v, "-")
            row["run_ids"] = " ".join(g["run_id"])
            rows.append(row)
        out[f"ablation_{key}"] = pd.DataFrame(rows)
    return out


def spread_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Feature spread per run and layer, from the metrics ``tntbench viz`` logged."""
    pat = re.compile(r"metrics\.viz_layer(\d+)_mean_pdist")
    layers = sorted(int(m.group(1)) for c in df.columns if (m := pat.fullmatch(c)))
    rows = []
    for _, r in df.iterrows():
        for L in layers:
            v = r.get(f"metrics.viz_layer{L}_mean_pdist")
            if v is None or pd.isna(v):
                continue
            rows.append(
                {
                    "model": r.get("params.model.name", "-"),
                    "layer": L,
                    "mean_pdist": v,
                    "dim_std": r.get(f"metrics.viz_layer{L}_dim_std"),
                    "run_ids": r["run_id"],
                }
            )
    if not rows:
        return None
    t = pd.DataFrame(rows).sort_values(["layer", "model"], kind="stable", ignore_index=True)
    t.attrs["caption"] = "feature spread (tntbench viz): patch features scaled to unit mean norm"
    return t


def viz_figures(tracker: Tracker, df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The PNGs ``tntbench viz`` logged under the runs' ``viz/<run ids>/``, each set once."""
    plots: dict[str, Path] = {}
    if "tags.viz_time" not in df:
        return plots
    for rid in df.loc[df["tags.viz_time"].notna(), "run_id"]:
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


def search_tables(tracker: Tracker, experiments: list[str], study: str | None) -> dict:
    """Per study: best trials, the Pareto front (two objectives), parameter importances."""
    frames = [tracker.runs(e, kind="trial") for e in experiments]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return {}
    trials = pd.concat(frames, ignore_index=True)
    if study:
        trials = trials[trials["tags.study"] == study]
    out: dict[str, pd.DataFrame] = {}
    for name, g in trials.groupby("tags.study"):
        done = g[g["status"] == "FINISHED"].copy()
        if done.empty:
            continue
        pcols = [c for c in done.columns if c.startswith("params.search.")]
        done["val_top1"] = _num(done, "metrics.val_top1")
        done["gmacs"] = _num(done, "metrics.gmacs")
        cols = ["tags.trial", "val_top1", "gmacs", *pcols, "run_id"]
        best = done.sort_values("val_top1", ascending=False)[cols].head(10)
        name = safe_name(name)  # table and plot file names come from it
        out[f"search_{name}_best"] = best.rename(columns=_short)
        front = pareto(done, "val_top1", "gmacs")
        out[f"search_{name}_pareto"] = front[cols].rename(columns=_short)
        imp = importances(done, pcols)
        if not imp.empty:
            out[f"search_{name}_importances"] = imp
        pruned = (g.get("tags.optuna_state", pd.Series(dtype=str)) == "PRUNED").sum()
        out[f"search_{name}_best"].attrs["caption"] = (
            f"study {name}: {len(done)} finished, {int(pruned)} pruned trial runs"
        )
    return out


def _short(c: str) -> str:
    return {"tags.trial": "trial", "run_id": "run_ids"}.get(c, c.removeprefix("params.search."))


def pareto(df: pd.DataFrame, maximise: str, minimise: str) -> pd.DataFrame:
    """Rows no other row beats on both (higher ``maximise``, lower ``minimise``)."""
    keep = []
    for i, r in df.iterrows():
        dominated = (
            (df[maximise] >= r[maximise])
            & (df[minimise] <= r[minimise])
            & ((df[maximise] > r[maximise]) | (df[minimise] < r[minimise]))
        ).any()
        if not dominated:
            keep.append(i)
    return df.loc[keep].sort_values(minimise)


def importances(done: pd.DataFrame, pcols: list[str]) -> pd.DataFrame:
    """Optuna's fANOVA importances, from the trials' params and val top-1."""
    if len(done) < 3 or not pcols:
        return pd.DataFrame()
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(direction="maximize")
    for _, r in done.iterrows():
        params = {c.removeprefix("params.search."): str(r[c]) for c in pcols}
        dists = {
            k: CategoricalDistribution(sorted({str(v) for v in done[c]}))
            for k, c in zip(params, pcols, strict=True)
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, value=float(r["val_top1"])
            )
        )
    try:
        imp = optuna.importance.get_param_importances(study)
    except Exception:
        return pd.DataFrame()
    return pd.DataFrame({"param": list(imp), "importance": list(imp.values())})


# ---------------------------------------------------------------------------------------------
# Plots


def scatter_with_front(main: pd.DataFrame, x: str, path: Path, log_x: bool = False) -> Path | None:
    """Top-1 against ``x`` per row, the Pareto frontier drawn through it (Figure 1 style)."""
    d = main[[x, "top-1 mean", "model"]].dropna()
    if d.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam, marker, label in (("tnt", "o", "TNT"), ("vit", "s", "ViT"), ("deit", "^", "DeiT")):
        m = d[d["model"].str.startswith(fam)]
        ax.scatter(m[x], m["top-1 mean"], marker=marker, label=label, s=40)
        for _, r in m.iterrows():
            ax.annotate(
                r["model"],
                (r[x], r["top-1 mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    cheap_is_good = x == "GMACs"
    f = pareto(
        d.assign(neg=-d[x]) if not cheap_is_good else d, "top-1 mean", x if cheap_is_good else "neg"
    ).sort_values(x)
    ax.plot(f[x], f["top-1 mean"], "k--", lw=1, label="Pareto frontier")
    ax.set(xlabel=x, ylabel="top-1 (%)", title=f"top-1 vs {x}")
    if log_x:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(tracker: Tracker, runs: pd.DataFrame, path: Path) -> Path | None:
    if runs.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, g in runs.groupby("params.model.name"):
        curves = [tracker.metric_history(rid, "val_top1") for rid in g["run_id"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        points = pd.DataFrame([p for c in curves for p in c], columns=["epoch", "top1"])
        mean = points.groupby("epoch")["top1"].mean()
        ax.plot(mean.index, mean.values, "o-", label=f"{model} (n={len(curves)})")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="learning curves (mean over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def search_plots(tables: dict[str, pd.DataFrame], out: Path) -> dict[str, Path]:
    plots = {}
    plt = pyplot()
    for name, t in tables.items():
        if name.endswith("_best") and len(t):
            study = name.removeprefix("search_").removesuffix("_best")
            fig, ax = plt.subplots(figsize=(6, 3.5))
            t2 = t.assign(trial=pd.to_numeric(t["trial"])).sort_values("trial")
            ax.plot(t2["trial"], t2["val_top1"], "o", label="trial (top 10)")
            ax.plot(t2["trial"], t2["val_top1"].cummax(), "-", label="best so far")
            ax.set(xlabel="trial", ylabel="val top-1 (%)", title=f"search {study}: history")
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = out / f"search_{study}_history.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            plots[p.stem] = p
        if name.endswith("_importances") and len(t):
            study = name.removeprefix("search_").removesuffix("_importances")
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.barh(t["param"], t["importance"])
            ax.set(xlabel="importance (fANOVA)", title=f"search {study}: parameter importances")
            fig.tight_layout()
            p = out / f"search_{study}_importances.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            plots[p.stem] = p
    return plots


# ---------------------------------------------------------------------------------------------
# Writing


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in ("top-1 mean",) if c in df]).round(3)


def write_outputs(rep: Report, tracking_uri: str) -> None:
    md = [
        "# TNT Bench report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{tracking_uri}`.",
        "",
    ]
    tex = []
    body = []
    for name, df in rep.tables.items():
        shown = _fmt(df)
        shown.to_csv(rep.out / f"{name}.csv", index=False)
        caption = df.attrs.get("caption", name.replace("_", " "))
        md += [
            f"## {caption}",
            "",
            shown.drop(columns=["run_ids"], errors="ignore").to_markdown(index=False)
            if _has_tabulate()
            else shown.to_string(index=False),
            "",
        ]
        tex.append(
            shown.drop(columns=["run_ids"], errors="ignore")
            .style.hide(axis="index")
            .format(precision=3)
            .to_latex(hrules=True, caption=caption.replace("_", " "))
        )
        body.append(f"<h2>{html.escape(caption)}</h2>" + _html_table(shown, tracking_uri))
    for name, p in rep.plots.items():
        md += [f"![{name}]({p.name})", ""]
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(
            f'<h2>{html.escape(name)}</h2><img alt="{name}" src="data:image/png;base64,{data}">'
        )
    (rep.out / "report.md").write_text("\n".join(md))
    (rep.out / "report.tex").write_text(
        "% needs \\usepackage{booktabs}\n" + "\n".join(t.replace("_", "\\_") for t in tex)
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:"
        "collapse;font-size:13px;margin-bottom:1em}td,th{border:1px solid #ccc;padding:"
        "3px 6px}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
    )
    (rep.out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>TNT Bench report</title>"
        f"<style>{style}</style></head><body><h1>TNT Bench report</h1>"
        f"<p>From {html.escape(tracking_uri)}</p>{''.join(body)}</body></html>"
    )


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _html_table(df: pd.DataFrame, uri: str) -> str:
    d = df.copy()
    if "run_ids" in d:
        http = uri.startswith(("http://", "https://"))

        def link(ids: str) -> str:
            if not http:
                return html.escape(ids)
            return " ".join(f'<a href="{uri}/#/runs/{i}">{i[:8]}</a>' for i in ids.split())

        d["run_ids"] = d["run_ids"].map(link)
    return d.to_html(index=False, escape=False)


def build_report(
    tracker: Tracker,
    experiments: list[str] | None = None,
    matrix: str | None = None,
    study: str | None = None,
    out: str | Path | None = None,
) -> Report:
    from suite.errors import UserError

    names = experiments or [e for e in tracker.experiment_names() if e not in ("reports",)]
    for flag, kind, value in (("--matrix", "matrix", matrix), ("--study", "study", study)):
        if value and all(tracker.runs(e, kind=kind, **{kind: value}).empty for e in names):
            raise UserError(f"{flag} {value}: no such {kind} in the store {tracker.uri}")
    out = Path(out or Path("reports") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    rep = Report(out)
    runs = training_runs(tracker, names, matrix)
    if not runs.empty:
        main = main_table(runs)
        rep.tables["main"] = main
        rep.tables.update(ablation_tables(runs))
        for x, log in (("GMACs", False), ("train img/s", True)):
            fname = "top1_vs_gmacs.png" if x == "GMACs" else "top1_vs_throughput.png"
            p = scatter_with_front(main, x, out / fname, log)
            if p:
                rep.plots[p.stem] = p
        p = learning_curves(tracker, runs, out / "learning_curves.png")
        if p:
            rep.plots[p.stem] = p
        sp = spread_table(runs)
        if sp is not None:
            rep.tables["feature_spread"] = sp
        rep.plots.update(viz_figures(tracker, runs, out))
    search = search_tables(tracker, names, study)
    rep.tables.update(search)
    rep.plots.update(search_plots(search, out))
    if not rep.tables:
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed report leaves no empty folder behind
        raise UserError(f"no finished runs to report on in experiments {names}")
    write_outputs(rep, getattr(tracker, "uri", ""))
    with tracker.run("reports", f"report/{out.name}", {"kind": "report"}) as run:
        for f in sorted(out.iterdir()):
            run.log_artifact(f, "report")
        rep.run_id = run.run_id
    return rep
