"""The report's figures, each built as a matplotlib Figure (so tests can read what is drawn:
error bars, the frontier's legend line, tick values) and saved by one helper.

Imports nothing from the report: the report imports these (a layer below it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from suite.plots import pyplot

FAMILIES = (("tnt", "o", "TNT"), ("vit", "s", "ViT"), ("deit", "^", "DeiT"))


def family_style(model: str) -> tuple[str, str]:
    """(color, marker) of the model's family: TNT, ViT and DeiT look the same in every figure."""
    for i, (fam, marker, _) in enumerate(FAMILIES):
        if model.startswith(fam):
            return f"C{i}", marker
    return "C3", "D"


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


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def accuracy_figure(main: pd.DataFrame, x: str, log_x: bool = False) -> Any | None:
    """Top-1 (mean, error bars = std over seeds) against ``x`` per row of the main table, the
    Pareto frontier drawn through it as a solid line (Figure 1 of the paper)."""
    d = main[[x, "top-1 mean", "top-1 std", "model"]].dropna(subset=[x, "top-1 mean"])
    if d.empty:
        return None
    d = d.assign(std=d["top-1 std"].fillna(0.0))  # one seed: no spread to draw
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fam, marker, label in FAMILIES:
        m = d[d["model"].str.startswith(fam)]
        if m.empty:
            continue
        color = family_style(fam)[0]
        ax.errorbar(
            m[x], m["top-1 mean"], yerr=m["std"], fmt=marker, color=color, capsize=3, ms=6,
            label=label,
        )  # fmt: skip
        for _, r in m.iterrows():
            ax.annotate(
                r["model"], (r[x], r["top-1 mean"]), fontsize=7, xytext=(4, 4),
                textcoords="offset points",
            )  # fmt: skip
    # cheaper is better for GMACs; for throughput, more is better: negate it for pareto()
    cheap_is_good = x == "GMACs"
    cost = d.assign(cost=d[x] if cheap_is_good else -d[x])
    f = pareto(cost, "top-1 mean", "cost").sort_values(x)
    # a solid line with markers: visible in the legend even when the frontier is one point
    ax.plot(f[x], f["top-1 mean"], "-", color="0.35", lw=1.6, zorder=0, label="Pareto frontier")
    ax.set(xlabel=x, ylabel="top-1 (%), mean ± std over seeds")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, handlelength=3)
    fig.tight_layout()
    return fig


def learning_curves_figure(curves: dict[str, list[list[tuple[int, float]]]]) -> Any | None:
    """Val top-1 per epoch, per model: mean over its runs, error bars = std over them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for model, runs in curves.items():
        runs = [c for c in runs if c]
        if not runs:
            continue
        points = pd.DataFrame([p for c in runs for p in c], columns=["epoch", "top1"])
        g = points.groupby("epoch")["top1"]
        mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
        color, marker = family_style(model)
        ax.errorbar(
            mean.index, mean.values, yerr=std.values, fmt=f"{marker}-", color=color, capsize=3,
            label=f"{model} (n={len(runs)})",
        )  # fmt: skip
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    _integer_ticks(ax)
    ax.set(xlabel="epoch", ylabel="val top-1 (%), mean ± std over runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _integer_ticks(ax: Any) -> None:
    """Epochs and trial numbers are counts: no 0.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def history_figure(history: pd.DataFrame) -> Any:
    """Every finished trial's val top-1 by trial number, and the best so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    h = history.sort_values("trial")
    ax.plot(h["trial"], h["top-1 mean"], "o", label="finished trial")
    ax.step(h["trial"], h["top-1 mean"].cummax(), where="post", label="best so far")
    _integer_ticks(ax)
    ax.set(xlabel="trial", ylabel="val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importances_figure(imp: pd.DataFrame) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.4 * len(imp)))
    ax.barh(imp["param"], imp["importance"])
    ax.invert_yaxis()  # most important first, as the table lists them
    ax.set(xlabel="importance (fANOVA, sums to 1)")
    fig.tight_layout()
    return fig
