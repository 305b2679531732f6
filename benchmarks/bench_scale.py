"""Studies at a real size (issue 24): the commands a user runs, timed on stores of N runs.

A real tiny matrix (one tnt_nano cell) and a real tiny search (2 trials, a float ``train.lr``
and categorical inner heads) are run once into a template store; the cell's per-epoch metrics
are stretched to ``--epochs`` epochs. Each size N then gets a copy of that store with the cell
cloned into N cells of one matrix (one seed each: the matrix's own cells, so ``--status``
counts them all finished and a rerun skips them all) and the trial cloned into N trials with
random params and top-1 (direct SQL into MLflow's tables: runs, params, tags, metrics, latest
metrics). Timed, wall and CPU (``time.process_time``) seconds:

- ``open``: the first ``make_tracker`` on the cloned store (it refreshes SQLite's statistics);
- ``report``: ``build_report`` over everything (importances included);
- ``status``: ``matrix --status``'s table;
- ``rerun``: ``run_matrix`` on the finished matrix (nothing to run);
- ``search/trial``: a search's bookkeeping per trial, with N trials already in its Optuna
  study and N trial runs in MLflow: ``--trials`` more trials whose epochs are stubbed (one real
  epoch's metrics replayed), every other step kept (model build and profile, MLflow calls,
  checkpoints, Optuna's storage); the median time from one trial's end to the next.

Growth between sizes is the exponent log(t2/t1) / log(N2/N1) of the CPU times.

    python benchmarks/bench_scale.py --quick              # N = 10, 100
    python benchmarks/bench_scale.py                      # N = 10, 100, 1000
    python benchmarks/bench_scale.py --sizes 10,100,1000,3000 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "train.epochs=2",
    "train.batch_size=32",
    "train.amp='fp32'",
    "model.depth=1",
    "tracking.system_metrics=false",
]
MATRIX = "scale"
STUDY = "scale_search"
RUN_TABLES = ("runs", "params", "tags", "metrics", "latest_metrics")


def write_configs(folder: Path, seeds: int, out_dir: Path) -> tuple[Path, Path]:
    m = folder / f"matrix_{seeds}.toml"
    m.write_text(
        f'[matrix]\nname = "{MATRIX}"\nmodels = ["tnt_nano"]\nseeds = {list(range(seeds))}\n'
        f"[train]\nout_dir = '{out_dir}'\n[tracking]\nexperiment = '{MATRIX}'\n"
    )
    s = folder / "search.toml"
    s.write_text(
        f'[search]\nstudy = "{STUDY}"\nsampler = "random"\npruner = "none"\nn_trials = 2\n'
        '[search.space]\n"model.inner_heads" = { choices = [1, 2, 4] }\n'
        '"train.lr" = { low = 1e-4, high = 1e-2, log = true }\n'
        f"[train]\nout_dir = '{out_dir}'\n[tracking]\nexperiment = '{STUDY}'\n"
    )
    return m, s


def build_template(tmp: Path, epochs: int) -> tuple[Path, dict[str, Any]]:
    """The template store (one real cell, two real trials), its cell stretched to ``epochs``;
    and one real epoch's (metrics, step rows) for the search's stub."""
    import suite.training.fit as fit_mod
    from suite.studies.matrix import run_matrix
    from suite.studies.search import run_search
    from suite.tracking import make_tracker

    folder = tmp / "template"
    folder.mkdir()
    m, s = write_configs(folder, 1, tmp / "runs")  # one out_dir: it is in the cells' hashes
    uri = f"sqlite:///{folder}/mlflow.db"
    captured: dict[str, Any] = {}
    real = fit_mod.run_epoch

    def capture(*a: Any, **k: Any) -> Any:
        out = real(*a, **k)
        captured.setdefault("epoch", out)
        return out

    fit_mod.run_epoch = capture
    try:
        run_matrix(m, make_tracker(uri), TINY, progress=False)
        run_search(s, TINY, tracking_uri=uri, storage=f"sqlite:///{folder}/optuna.db")
    finally:
        fit_mod.run_epoch = real
    db = folder / "mlflow.db"
    con = sqlite3.connect(db)
    with con:
        (cell,) = _run_ids(con, "cell")
        stretch(con, cell, epochs)
    con.close()
    return db, captured


def _run_ids(con: sqlite3.Connection, kind: str) -> list[str]:
    rows = con.execute("SELECT run_uuid FROM tags WHERE key = 'kind' AND value = ?", (kind,))
    return [r[0] for r in rows]


def stretch(con: sqlite3.Connection, run: str, epochs: int) -> None:
    """The run's per-epoch metrics (logged at steps 1..E) repeated up to step ``epochs``."""
    (last,) = con.execute(
        "SELECT max(step) FROM metrics WHERE run_uuid = ? AND key = 'val_top1'", (run,)
    ).fetchone()
    keys = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT key FROM metrics WHERE run_uuid = ? AND step = ?", (run, last)
        )
    ]
    marks = ",".join("?" * len(keys))
    for step in range(last + 1, epochs + 1):
        con.execute(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
            f"SELECT key, value, timestamp + ?, run_uuid, ?, is_nan FROM metrics "
            f"WHERE run_uuid = ? AND step = ? AND key IN ({marks})",
            (step, step, run, last, *keys),
        )
    con.execute(
        f"UPDATE latest_metrics SET step = ? WHERE run_uuid = ? AND key IN ({marks})",
        (epochs, run, *keys),
    )


def clone(con: sqlite3.Connection, src: str, n: int, edit: Callable[[str, int], None]) -> None:
    """``n`` copies of run ``src`` in every run table, each then changed by ``edit(id, i)``."""
    cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in RUN_TABLES}
    for i in range(n):
        new = uuid.uuid4().hex
        for t, names in cols.items():
            picked = ", ".join("?" if c == "run_uuid" else c for c in names)
            con.execute(
                f"INSERT INTO {t} ({', '.join(names)}) SELECT {picked} FROM {t} WHERE run_uuid = ?",
                (new, src),
            )
        con.execute(
            "UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?) WHERE run_uuid = ?",
            (src, new, new),
        )
        edit(new, i)


def _set(con: sqlite3.Connection, table: str, run: str, key: str, value: Any) -> None:
    con.execute(f"UPDATE {table} SET value = ? WHERE run_uuid = ? AND key = ?", (value, run, key))


def build_store(tmp: Path, template: Path, n: int) -> tuple[str, Path, Path]:
    """A copy of the template with N matrix cells and N search trials."""
    from suite.studies.matrix import expand

    folder = tmp / f"n{n}"
    folder.mkdir()
    m, s = write_configs(folder, n, tmp / "runs")
    db = folder / "mlflow.db"
    src = sqlite3.connect(template)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    cells = expand(m, TINY).cells
    rng = random.Random(n)
    with dst:
        (cell,) = _run_ids(dst, "cell")
        trials = _run_ids(dst, "trial")

        def as_cell(run: str, i: int) -> None:
            c = cells[i + 1]  # the template is cell 0 (seed 0)
            _set(dst, "tags", run, "cell_hash", c.digest)
            _set(dst, "tags", run, "mlflow.runName", c.run_name)
            dst.execute("UPDATE runs SET name = ? WHERE run_uuid = ?", (c.run_name, run))
            _set(dst, "params", run, "train.seed", str(c.seed))

        def as_trial(run: str, i: int) -> None:
            heads, lr = rng.choice([1, 2, 4]), 10 ** rng.uniform(-4, -2)
            top1 = 30 + 5 * heads + 10 * math.log10(lr) / 4 + rng.random()
            number = i + len(trials)
            _set(dst, "tags", run, "trial", str(number))
            _set(dst, "tags", run, "mlflow.runName", f"{STUDY}/trial-{number}")
            _set(dst, "params", run, "search.model.inner_heads", str(heads))
            _set(dst, "params", run, "search.train.lr", str(lr))
            _set(dst, "latest_metrics", run, "val_top1", top1)

        clone(dst, cell, n - 1, as_cell)
        clone(dst, trials[0], n - len(trials), as_trial)
        # the template's Optuna file is not this store's: the report counts from MLflow
        _set(dst, "params", _run_ids(dst, "study")[0], "search.storage", "sqlite:///gone.db")
    dst.close()
    return f"sqlite:///{db}", m, s


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def search_per_trial(
    tmp: Path, uri: str, s: Path, n: int, extra: int, epoch: Any
) -> tuple[float, float]:
    """Seconds (wall, CPU) per trial of a search whose study already holds ``n`` trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    import suite.training.fit as fit_mod
    from suite.studies.search import run_search

    storage = f"sqlite:///{tmp}/optuna_{n}.db"
    from suite.studies.storage import open_storage

    study = optuna.create_study(
        storage=open_storage(storage, 10, 30, 2), study_name=STUDY, direction="maximize"
    )
    dists = {
        "model.inner_heads": CategoricalDistribution([1, 2, 4]),
        "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
    }
    rng = random.Random(0)
    study.add_trials(
        [
            optuna.trial.create_trial(
                params={"model.inner_heads": rng.choice([1, 2, 4]), "train.lr": 1e-3},
                distributions=dists,
                value=rng.random(),
            )
            for _ in range(n)
        ]
    )
    import statistics

    import suite.studies.search as search_mod

    marks: list[tuple[float, float]] = []
    line = search_mod.print_trial_line

    def mark(study: Any, trial: Any) -> None:  # the end of each trial, on both clocks
        marks.append((time.perf_counter(), time.process_time()))
        line(study, trial)

    real = fit_mod.run_epoch
    fit_mod.run_epoch = lambda *a, **k: epoch  # training stubbed: one real epoch replayed
    search_mod.print_trial_line = mark
    try:
        run_search(s, TINY, tracking_uri=uri, storage=storage, n_trials=n + extra)
    finally:
        fit_mod.run_epoch = real
        search_mod.print_trial_line = line
    # from one trial's end to the next: the worker's loop, the sampler, the trial's MLflow
    # run and checkpoints; the search's start and end (loading the study, its plots) are
    # once per search, not per trial
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
    return statistics.median(walls), statistics.median(cpus)


def measure(tmp: Path, template: Path, n: int, epoch: Any, extra: int) -> dict[str, Any]:
    from suite.outputs.report import build_report
    from suite.studies.matrix import run_matrix
    from suite.studies.workers import count_states, status_table
    from suite.tracking import make_tracker

    uri, m, s = build_store(tmp, template, n)
    out: dict[str, Any] = {"n": n}
    tracker, *out["open"] = timed(lambda: make_tracker(uri))
    rep, *out["report"] = timed(lambda: build_report(tracker, out=tmp / f"rep{n}"))
    imp = [k for k in rep.tables if k.endswith("_importances")]
    out["importances"] = rep.tables[imp[0]].attrs.get("evaluator", "") if imp else "none"
    table, *out["status"] = timed(lambda: status_table(m, tracker, TINY, None))
    out["status_counts"] = count_states(table)
    res, *out["rerun"] = timed(lambda: run_matrix(m, tracker, TINY, progress=False))
    out["rerun_ran"] = res.ran
    out["search_per_trial"] = list(search_per_trial(tmp, uri, s, n, extra, epoch))
    out["store_mb"] = (tmp / f"n{n}" / "mlflow.db").stat().st_size / 2**20
    out["ui_first_search_s"], out["ui_mb"] = ui_first_search(tmp, uri)
    return out


def ui_first_search(tmp: Path, uri: str) -> tuple[float, float]:
    """``tntbench ui`` on the store, as a user starts it: (seconds of the experiment's first
    REST search of runs, the whole process tree's resident memory in MB after it). The UI
    page's first request is the same ``runs/search`` (1,000 runs a page, newest first)."""
    import signal
    import socket
    import subprocess
    import urllib.request

    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "suite", "ui", "--tracking-uri", uri, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 120
        while True:  # the server answers once its workers are up
            try:
                url = f"{base}/experiments/search?max_results=100"
                with urllib.request.urlopen(url, timeout=5) as r:
                    exps = json.loads(r.read())["experiments"]
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("tntbench ui did not answer within 120 s") from None
                time.sleep(0.5)
        ids = [e["experiment_id"] for e in exps if e["experiment_id"] != "0"]
        body = json.dumps({"experiment_ids": ids, "max_results": 1000}).encode()
        req = urllib.request.Request(
            f"{base}/runs/search", body, {"Content-Type": "application/json"}
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        took = time.perf_counter() - t0
        root = psutil.Process(proc.pid)
        rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        return took, rss / 2**20
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def growth(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Exponents between consecutive sizes, from CPU seconds."""
    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        ta, tb = max(a[key][1], 1e-6), max(b[key][1], 1e-6)
        out.append(round(math.log(tb / ta) / math.log(b["n"] / a["n"]), 2))
    return out


KEYS = ("open", "report", "status", "rerun", "search_per_trial")


def markdown(rows: list[dict[str, Any]], command: str, note: str) -> str:
    lines = [
        "# bench_scale (issue 24)",
        "",
        f"Command: `{command}`",
        "",
        note,
        "",
        "Seconds, wall / CPU; growth = exponent of the CPU time between sizes.",
        "",
        "| N | " + " | ".join(KEYS) + " | importances | status | store MB | ui search s | ui MB |",
        "|---|" + "---|" * (len(KEYS) + 5),
    ]
    for r in rows:
        cells = [f"{r[k][0]:.2f} / {r[k][1]:.2f}" for k in KEYS]
        lines.append(
            f"| {r['n']} | "
            + " | ".join(cells)
            + f" | {r['importances']} | {r['status_counts']} | {r['store_mb']:.1f}"
            + f" | {r['ui_first_search_s']:.2f} | {r['ui_mb']:.0f} |"
        )
    lines.append("| growth | " + " | ".join(str(growth(rows, k)) for k in KEYS) + " | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10,100,1000", help="comma-separated N")
    ap.add_argument("--quick", action="store_true", help="N = 10, 100")
    ap.add_argument("--epochs", type=int, default=100, help="epochs per cloned cell run")
    ap.add_argument("--trials", type=int, default=4, help="new search trials run per size")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--md", default=None, help="and a Markdown table here")
    ap.add_argument("--note", default="", help="a line for the Markdown (e.g. machine load)")
    args = ap.parse_args()
    sizes = [10, 100] if args.quick else [int(x) for x in args.sizes.split(",")]
    from suite.studies.storage import quiet_optuna

    quiet_optuna()
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        template, captured = build_template(tmp, args.epochs)
        rows = []
        for n in sizes:
            row = measure(tmp, template, n, captured["epoch"], args.trials)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k in KEYS:
        print(f"{k}: growth exponents (CPU) {growth(rows, k)}")
    command = "python " + " ".join(sys.argv)
    if args.json:
        meta = {"command": command, "machine": platform.node(), "note": args.note}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(rows, command, args.note))
    print(markdown(rows, command, args.note))


if __name__ == "__main__":
    main()
