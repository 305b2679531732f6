"""The report as a reader wants it: numbers rounded to the digits that mean something, units in
the headers, the best value of a column in bold, disturbed timings starred, short run IDs
(linked on a server), human figure titles, and a header saying when, from what and on what.

Tables stay numeric in the report (and in the CSVs); only this module turns them into text,
for Markdown, HTML and LaTeX alike. Imports nothing from the report (a layer below it).
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from suite.tracking import git, tag_col

NOISY_NOTE = "\\* timing disturbed (load or spread); see the run's timing_noisy tag"
DATA_BOUND_NOTE = (
    "† data-bound: the model waited for data over 10% of an epoch's wall time (a figure of the"
    " loader, not the model); see the run's data_bound tag"
)
# columns where "best" means something, and which way; others are never bolded
BEST = {
    "top-1 (%)": "max",
    "train img/s": "max",
    "infer img/s": "max",
    "infer ms": "min",
    "infer peak MB": "min",
}
# raw columns the reader does not see as such (merged into another, or read for marks)
HIDDEN = {"timing_noisy", "data_bound", "top-1 std", "top-5 std", "run_ids", "n planned"}
PARTIAL_NOTE = "n of N: a partial group (its matrix is still running, or some seeds failed)"


# ---------------------------------------------------------------------------------------------
# Numbers


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x)) or x is pd.NA


def fixed(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits in fixed notation (0.000790, 5.25, 894): never 1e-4."""
    if _missing(x):
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def signed(x: Any, digits: int = 3) -> str:
    s = fixed(x, digits)
    return s if s == "-" or s.startswith("-") or s == "0" else f"+{s}"


def integer(x: Any) -> str:
    return "-" if _missing(x) else f"{float(x):.0f}"


def percent(mean: Any, std: Any = None) -> str:
    """Accuracy: one decimal, ± the std over seeds when there are several."""
    if _missing(mean):
        return "-"
    return f"{float(mean):.1f}" if _missing(std) else f"{float(mean):.1f} ± {float(std):.1f}"


def formatter(col: str) -> Callable[[Any], str]:
    """How a column's numbers are written, by what it holds."""
    if col in ("n", "trial", "layer") or "img/s" in col or col.endswith("MB"):
        return integer
    if col.startswith("Δ top-1"):
        return lambda x: "-" if _missing(x) else f"{float(x):+.1f}"
    if col.startswith("Δ"):
        return signed
    if "top-1" in col or "top-5" in col:
        return percent
    if col == "importance":
        return lambda x: "-" if _missing(x) else f"{float(x):.2f}"
    return _any


def _any(x: Any) -> str:
    """Numbers to 3 significant digits, MLflow params included: they come back as strings
    ("0.0007895415835283402" for a searched lr); integers and words stay as they are."""
    if _missing(x):
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return fixed(x)
    text = str(x)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)", text.strip()):
        return fixed(float(text))
    return text


# ---------------------------------------------------------------------------------------------
# Tables as text


@dataclass
class Shown:
    """A table as the reader sees it: text cells, which to bold, the rows' run IDs, notes."""

    cells: pd.DataFrame
    bold: pd.DataFrame
    ids: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _columns(df: pd.DataFrame) -> dict[str, pd.Series]:
    """Display column -> its values: accuracy mean and std merged into one cell."""
    out: dict[str, pd.Series] = {}
    for c in df.columns:
        if c in HIDDEN:
            continue
        m = re.fullmatch(r"(top-[15]) mean", c)
        if m:
            std = df.get(f"{m.group(1)} std", pd.Series(math.nan, df.index))
            out[f"{m.group(1)} (%)"] = pd.Series(
                [percent(a, b) for a, b in zip(df[c], std, strict=True)], df.index
            )
        else:
            out[c] = df[c].map(formatter(c))
    return out


def _best_mask(df: pd.DataFrame, shown: str) -> pd.Series:
    """Cells holding the column's best value, per dataset (comparing across datasets means
    nothing); only where at least two different values compete."""
    raw = "top-1 mean" if shown == "top-1 (%)" else shown
    values = pd.to_numeric(df[raw], errors="coerce") if raw in df else None
    mask = pd.Series(False, df.index)
    if values is None:
        return mask
    groups = df["dataset"] if "dataset" in df else pd.Series("", df.index)
    for _, idx in values.groupby(groups).groups.items():
        v = values.loc[idx].dropna()
        if v.nunique() < 2:
            continue
        best = v.max() if BEST[shown] == "max" else v.min()
        mask.loc[v.index[v == best]] = True
    return mask


def present(df: pd.DataFrame) -> Shown:
    """The table's text: rounded, best bolded, disturbed timings starred, notes below it."""
    cols = _columns(df)
    cells = pd.DataFrame(cols, index=df.index)
    bold = pd.DataFrame(False, index=df.index, columns=cells.columns)
    for c in cells.columns:
        if c in BEST:
            bold[c] = _best_mask(df, c)
    notes = []
    if df.attrs.get("note"):
        notes.append(df.attrs["note"])
    if "timing_noisy" in df:
        noisy = df["timing_noisy"].fillna("").astype(str).str.strip().ne("")
        timing = [c for c in cells.columns if "img/s" in c or c.endswith(" ms")]
        for c in timing:
            cells.loc[noisy & cells[c].ne("-"), c] += "*"
        if timing and noisy.any():
            notes.append(NOISY_NOTE)
    if "data_bound" in df:
        bound = df["data_bound"].fillna("").astype(str).str.strip().ne("")
        train = [c for c in cells.columns if c.startswith("train img/s")]
        for c in train:
            cells.loc[bound & cells[c].ne("-"), c] += "†"
        if train and bound.any():
            notes.append(DATA_BOUND_NOTE)
    if "n planned" in df and "n" in cells:
        planned = pd.to_numeric(df["n planned"], errors="coerce")
        partial = planned.notna() & (pd.to_numeric(df["n"], errors="coerce") < planned)
        for i in df.index[partial]:
            cells.loc[i, "n"] = f"{int(df.loc[i, 'n'])} of {int(planned[i])}"
        if partial.any():
            notes.append(PARTIAL_NOTE)
    ids = [str(v).split() for v in df["run_ids"]] if "run_ids" in df else []
    if ids:
        cells["runs"] = [" ".join(i[:8] for i in row) for row in ids]
        bold["runs"] = False
    return Shown(cells.reset_index(drop=True), bold.reset_index(drop=True), ids, notes)


def _rows(s: Shown) -> list[list[tuple[str, bool]]]:
    """Per row, (text, bold) per column."""
    bold = s.bold.itertuples(index=False)
    return [
        list(zip(r, m, strict=True))
        for r, m in zip(s.cells.itertuples(index=False), bold, strict=True)
    ]


def to_markdown(s: Shown) -> str:
    def cell(text: str, b: bool) -> str:
        text = text.replace("|", "\\|").replace("*", "\\*")
        return f"**{text}**" if b else text

    head = "| " + " | ".join(s.cells.columns) + " |"
    rule = "|" + "|".join("---" for _ in s.cells.columns) + "|"
    rows = ["| " + " | ".join(cell(t, b) for t, b in row) + " |" for row in _rows(s)]
    return "\n".join([head, rule, *rows, *("\n" + n for n in s.notes)])


def to_html(s: Shown, link: Callable[[str], str | None]) -> str:
    """``link(run_id)``: the run's page on a server, or None (a local store has none)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in s.cells.columns)
    rows = []
    for i, row in enumerate(_rows(s)):
        tds = []
        for c, (text, b) in zip(s.cells.columns, row, strict=True):
            if c == "runs" and s.ids:
                tds.append(f"<td class='ids'>{_id_links(s.ids[i], link)}</td>")
                continue
            t = html.escape(text)
            num = re.fullmatch(r"[-+]?[\d.]+\*?( ± [\d.]+)?", text) is not None
            tds.append(f"<td{' class=num' if num else ''}>{f'<b>{t}</b>' if b else t}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n.replace(chr(92), ''))}</p>" for n in s.notes)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{notes}"


def _id_links(ids: list[str], link: Callable[[str], str | None]) -> str:
    out = []
    for rid in ids:
        url = link(rid)
        short = html.escape(rid[:8])
        out.append(f"<a href='{html.escape(url)}' title='{rid}'>{short}</a>" if url else short)
    return " ".join(out)


_TEX = {c: f"\\{c}" for c in "&%$#_{}"} | {"~": "\\textasciitilde{}", "^": "\\^{}"}


def _tex(text: str) -> str:
    text = "".join(_TEX.get(ch, ch) for ch in text.replace("\\", "\\textbackslash{}"))
    return text.replace("±", "$\\pm$").replace("Δ", "$\\Delta$")


def to_latex(s: Shown, caption: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``), bold as ``\\textbf``."""
    cols = list(s.cells.columns)
    lines = [
        "\\begin{table}[ht]",
        "\\centering",
        f"\\caption{{{_tex(caption)}}}",
        "\\begin{tabular}{" + "l" * len(cols) + "}",
        "\\toprule",
        " & ".join(_tex(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    for row in _rows(s):
        cells = [f"\\textbf{{{_tex(t)}}}" if b else _tex(t) for t, b in row]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    # below the tabular, inside the float: a new paragraph (a bare line break there is an error)
    lines += [f"\\par\\footnotesize {_tex(n.replace(chr(92), ''))}" for n in s.notes]
    return "\n".join([*lines, "\\end{table}"])


# ---------------------------------------------------------------------------------------------
# Titles and the header


def figure_title(stem: str) -> str:
    """What a figure shows, in words, from its file name."""
    fixed_titles = {
        "top1_vs_gmacs": "Accuracy vs compute (GMACs), with the Pareto frontier",
        "top1_vs_throughput": "Accuracy vs training throughput (img/s), with the Pareto frontier",
        "learning_curves": "Learning curves: val top-1 per epoch (mean ± std over runs)",
    }
    if stem in fixed_titles:
        return fixed_titles[stem]
    if m := re.fullmatch(r"search_(.+)_history", stem):
        return f"Search {m.group(1)}: val top-1 per trial, and the best so far"
    if m := re.fullmatch(r"search_(.+)_importances", stem):
        return f"Search {m.group(1)}: parameter importances (fANOVA)"
    if m := re.fullmatch(r"viz_(.+)_tsne_layer(\d+)", stem):
        runs = m.group(1).replace("-", ", ")
        return f"t-SNE of patch features after block {int(m.group(2))} (runs {runs})"
    if m := re.fullmatch(r"viz_(.+)_feature_maps_(\d+)", stem):
        runs = m.group(1).replace("-", ", ")
        return f"Feature maps of validation image {int(m.group(2)) + 1} (runs {runs})"
    return stem.replace("_", " ")


def mask_uri(uri: str) -> str:
    """The store's URI with any password replaced by ``***``."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not a URL at all (a bare path): nothing to hide
        return uri


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit checked out in ``cwd`` (the working directory), or "unknown": never fails."""
    return git(["rev-parse", "--short=12", "HEAD"], cwd) or "unknown"


def suite_version() -> str:
    try:
        import suite

        return str(suite.__version__)
    except (ImportError, AttributeError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("tnt-bench")
        except PackageNotFoundError:
            return "unknown"


def one_value(runs: pd.DataFrame, col: str) -> str:
    """The value all runs share in ``col``, "mixed (a, b)" when they differ, "-" if none."""
    if col not in runs:
        return "-"
    values = sorted({str(v) for v in runs[col].dropna() if str(v).strip()})
    if not values:
        return "-"
    return values[0] if len(values) == 1 else f"mixed ({', '.join(values)})"


def stamp(runs: pd.DataFrame, uri: str) -> dict[str, str]:
    """The header: when (UTC), which suite and commit, which store, which device and dtype."""
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "suite version": suite_version(),
        "git commit": git_commit(),
        "store": mask_uri(uri),
        "device": one_value(runs, tag_col("device_name")),
        "dtype": one_value(runs, tag_col("amp")),
    }


# ---------------------------------------------------------------------------------------------
# The pages


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin-bottom:.4em}"
    "td,th{border:1px solid #ccc;padding:3px 7px}th{background:#eee;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}td.ids{font-family:monospace}"
    "p.note{font-size:12px;color:#555;margin:.2em 0 1.2em}dl.stamp{display:grid;"
    "grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}dt{color:#666}"
    "dd{margin:0;font-family:monospace}img{max-width:100%;border:1px solid #ddd}"
)


def write_pages(
    out: Path,
    tables: dict[str, pd.DataFrame],
    plots: dict[str, Path],
    header: dict[str, str],
    link: Callable[[str], str | None],
) -> None:
    """report.md, report.tex, report.html (self-contained, plots inlined) and one CSV per
    table (raw numbers and full run IDs, for whoever computes further)."""
    md = ["# TNT Bench report", "", *(f"- **{k}**: {v}" for k, v in header.items()), ""]
    stamp_html = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in header.items()
    )
    body = [f"<h1>TNT Bench report</h1><dl class='stamp'>{stamp_html}</dl>"]
    tex = ["% needs \\usepackage{booktabs}"]
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)
        shown = present(df)
        caption = df.attrs.get("caption", name.replace("_", " "))
        md += [f"## {caption}", "", to_markdown(shown), ""]
        tex.append(to_latex(shown, caption))
        body.append(f"<h2>{html.escape(caption)}</h2>" + to_html(shown, link))
    for stem, p in plots.items():
        title = figure_title(stem)
        md += [f"## {title}", "", f"![{title}]({p.name})", ""]
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(
            f"<h2>{html.escape(title)}</h2>"
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        )
    (out / "report.md").write_text("\n".join(md))
    (out / "report.tex").write_text("\n\n".join(tex) + "\n")
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>TNT Bench report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
