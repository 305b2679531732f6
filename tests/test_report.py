"""Reports: tables equal the MLflow metrics, every format written, HTML renders in Chromium,
``tntbench ui`` serves the store; numbers rounded, best bolded, disturbed timings starred,
paper deltas, a header stamp, trial counts as the console prints them, error bars."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import tiny_sets

from suite.cli import main
from suite.outputs.report import Report, build_report, mlflow_counts, run_link
from suite.outputs.report_format import git_commit, mask_uri, present, to_html
from suite.outputs.report_plots import accuracy_figure, history_figure, learning_curves_figure
from suite.studies.matrix import run_matrix
from suite.studies.search import format_search, run_search
from suite.tracking import make_tracker

TINY = tiny_sets({"train.epochs": 2})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    m = tmp / "m.toml"
    m.write_text(
        '[matrix]\nname = "abl"\nmodels = ["tnt_nano"]\nseeds = [0, 1]\n'
        '"model.inner_heads" = [1, 2]\n'
        f"[train]\nout_dir = '{tmp}/runs'\n[tracking]\nexperiment = 'abl'\n"
    )
    run_matrix(m, make_tracker(uri), TINY, progress=False)
    s = tmp / "s.toml"
    # a grid of 4: pixel size 3 does not divide the 8-pixel patches, so 2 trials are pruned
    # before any training (cheap), 2 complete
    s.write_text(
        '[search]\nstudy = "st"\nsampler = "grid"\npruner = "none"\nn_trials = 4\n'
        '[search.space]\n"model.inner_heads" = { choices = [1, 2] }\n'
        '"model.pixel_size" = { choices = [2, 3] }\n'
        f"[train]\nout_dir = '{tmp}/runs'\n[tracking]\nexperiment = 'st'\n"
    )
    res = run_search(s, TINY, tracking_uri=uri)
    return tmp, uri, format_search(res).splitlines()[0]


@pytest.mark.slow
def test_report_tables_equal_mlflow_metrics(store):
    mlflow = pytest.importorskip("mlflow")
    tmp, uri, _ = store
    rep = build_report(make_tracker(uri), out=tmp / "rep")
    for ext in ("md", "csv", "tex", "html", "png"):
        assert list(rep.out.glob(f"*.{ext}")), ext
    main_t = rep.tables["main"]
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("abl").experiment_id],
        "tags.kind = 'cell' and attributes.status = 'FINISHED'",
    )
    assert len(runs) == 4 and main_t["n"].sum() == 4
    for _, row in main_t.iterrows():
        ids = row["run_ids"].split()
        top1 = [r.data.metrics["val_top1"] for r in runs if r.info.run_id in ids]
        mean = sum(top1) / len(top1)
        std = (sum((v - mean) ** 2 for v in top1) / (len(top1) - 1)) ** 0.5
        assert row["top-1 mean"] == pytest.approx(mean) and row["top-1 std"] == pytest.approx(std)
        gm = [r.data.metrics["gmacs"] for r in runs if r.info.run_id in ids]
        assert row["GMACs"] == pytest.approx(sum(gm) / len(gm))
    abl = rep.tables["ablation_inner_heads"]
    assert sorted(abl["inner_heads"].astype(int)) == [1, 2]
    assert set(abl["paper top-1 (TNT-S, ImageNet)"]) == {81.0, 81.4}
    assert "search_st_best" in rep.tables and len(rep.tables["search_st_best"]) == 2
    csv = (rep.out / "main.csv").read_text()
    assert "run_ids" in csv.splitlines()[0]
    assert "\\toprule" in (rep.out / "report.tex").read_text()
    arts = mlflow.MlflowClient(uri).list_artifacts(rep.run_id, "report")
    assert any(a.path.endswith("report.html") for a in arts)


@pytest.mark.slow
def test_report_cli_and_bad_experiment(store, capsys):
    tmp, uri, _ = store
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp / "r2"), "--matrix", "abl"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (
        main(["report", "--tracking-uri", uri, "--experiment", "nope", "--out", str(tmp / "r3")])
        == 2
    )
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp / "r3").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("chromium is needed under CI (.ci/run installs Debian's chromium)")
    pytest.skip("chromium not installed")


@pytest.mark.slow
def test_html_renders_in_headless_chromium_with_images(store, tmp_path):
    from PIL import Image, ImageStat

    tmp, uri, _ = store
    rep = build_report(make_tracker(uri), out=tmp / "rep3")
    page = (rep.out / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == len(rep.plots) >= 3
    for data in imgs:  # every image is a real PNG, inlined (the page is self-contained)
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1200,3000",
        f"--screenshot={shot}",
        (rep.out / "report.html").as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file()
    img = Image.open(shot).convert("L")
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 10, "screenshot is blank"
    assert img.size == (1200, 3000)


@pytest.mark.slow
def test_ui_serves_the_store_over_rest(store):
    tmp, uri, _ = store
    proc = subprocess.Popen(
        [sys.executable, "-m", "suite", "ui", "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        deadline, runs = time.time() + 90, None
        while time.time() < deadline:
            try:
                req = urllib.request.Request(
                    f"{url}/api/2.0/mlflow/experiments/search",
                    data=json.dumps({"max_results": 100}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                exps = json.load(urllib.request.urlopen(req, timeout=5))["experiments"]
                ids = [e["experiment_id"] for e in exps if e["name"] == "abl"]
                req = urllib.request.Request(
                    f"{url}/api/2.0/mlflow/runs/search",
                    data=json.dumps({"experiment_ids": ids, "max_results": 100}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                runs = json.load(urllib.request.urlopen(req, timeout=5))["runs"]
                break
            except OSError:
                time.sleep(1)
        assert runs is not None, "the MLflow server did not answer within 90 s"
        names = {r["info"]["run_name"] for r in runs}
        assert "tnt_nano s0 inner_heads=1" in names and "matrix/abl" in names
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# The report as a reader wants it

NUMBER = re.compile(r"[-+]?\d+\.\d+")


def _significant(number: str) -> int:
    return len(number.lstrip("+-").replace(".", "").lstrip("0"))


def _md_cells(md: str) -> list[str]:
    rows = [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [c.strip() for ln in rows for c in ln.strip("|").split(" | ")]


def _html_cells(page: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", page)]


def _assert_rounded(cells: list[str]) -> None:
    assert cells
    too_long = [c for c in cells for n in NUMBER.findall(c) if _significant(n) > 4]
    assert not too_long, too_long


@pytest.mark.slow
def test_report_rounds_stamps_counts_and_links(store, monkeypatch):
    tmp, uri, console = store
    rep = build_report(make_tracker(uri), out=tmp / "rep_read")
    md, page = (rep.out / "report.md").read_text(), (rep.out / "report.html").read_text()
    for cells in (_md_cells(md), _html_cells(page)):
        _assert_rounded(cells)
    # no exponent notation (7.9e-04) anywhere on the page
    assert not re.search(r"\de[-+]\d", md + re.sub(r"base64,[^\"]+", "", page))
    # counts: the console's line, word for word (2 complete, 2 pruned before training)
    assert console == "study st: 2 complete, 2 pruned, 0 failed"
    assert console in md and console in page
    # fewer than 10 complete trials: no importances, a sentence why
    assert "search_st_importances" not in rep.tables and "search_st_importances" not in rep.plots
    why = "Parameter importances need at least 10 completed trials; this search has 2"
    assert why in md and why in page
    # header stamp
    h = rep.header
    assert abs(time.mktime(time.strptime(h["generated"], "%Y-%m-%d %H:%M:%S UTC"))
               - time.mktime(time.gmtime())) < 120  # fmt: skip
    import suite

    assert h["suite version"] == suite.__version__
    assert h["git commit"] == git_commit()
    assert h["store"] == uri and h["device"] == "cpu" and h["dtype"] in ("fp32", "bf16")
    for k, v in h.items():
        assert f"**{k}**: {v}" in md and f"<dt>{k}</dt><dd>{v}</dd>" in page
    # short IDs: 8 hex per run, never the 32-hex IDs (a local store has no pages to link)
    main_t = rep.tables["main"]
    ids = [i for v in main_t["run_ids"] for i in v.split()]
    assert len(ids) == 4 and all(i[:8] in page and i[:8] in md for i in ids)
    assert not re.search(r"[0-9a-f]{32}", md + page) and "<a href" not in page
    assert set(ids) <= set(rep.experiment_ids)
    # human figure titles, not file names
    assert "<h2>Accuracy vs compute (GMACs), with the Pareto frontier</h2>" in page
    assert not re.search(r"<h2>[^<]*\.png", page) and "<h2>top1_vs_gmacs</h2>" not in page
    # the commit is the working directory's, "unknown" outside a git checkout
    monkeypatch.chdir(tmp)
    assert git_commit() == "unknown"


@pytest.mark.slow
def test_plots_draw_error_bars_a_frontier_line_and_integer_ticks(store):
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D

    tmp, uri, _ = store
    tracker = make_tracker(uri)
    rep = build_report(tracker, out=tmp / "rep_plots")
    main_t = rep.tables["main"]
    fig = accuracy_figure(main_t, "GMACs")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars and all(c.has_yerr for c in bars)
    # each bar spans mean - std .. mean + std of its row: the std over the two seeds
    half = sorted(
        round((seg[1][1] - seg[0][1]) / 2, 6) for c in bars for seg in c.lines[2][0].get_segments()
    )
    assert half == sorted(round(v, 6) for v in main_t["top-1 std"])
    assert max(half) > 0
    leg = ax.get_legend()
    frontier = [
        h
        for h, t in zip(leg.legend_handles, leg.get_texts(), strict=True)
        if t.get_text() == "Pareto frontier"
    ]
    assert len(frontier) == 1 and isinstance(frontier[0], Line2D)
    assert frontier[0].get_linestyle() == "-" and frontier[0].get_linewidth() >= 1.5
    cells = tracker.runs("abl", status="FINISHED", kind="cell")
    curves = {"tnt_nano": [tracker.metric_history(r, "val_top1") for r in cells["run_id"]]}
    lc = learning_curves_figure(curves).axes[0]
    assert any(isinstance(c, ErrorbarContainer) and c.has_yerr for c in lc.containers)
    hist = rep.tables["search_st_best"].attrs["history"]
    hx = history_figure(hist).axes[0]
    lo, hi = hx.get_xlim()
    ticks = [t for t in hx.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert {"top1_vs_gmacs", "learning_curves", "search_st_history"} <= set(rep.plots)


def _fake_run(tracker, experiment, name, metrics, *, params=None, tags=None, status="FINISHED"):
    with tracker.run(experiment, name, tags or {}) as run:
        run.log_params(params or {})
        run.log_metrics(metrics)
        if status != "FINISHED":
            run.fail("stopped", status=status)
    return run.run_id


@pytest.mark.slow
def test_paper_deltas_noisy_marks_and_bold_best(tmp_path):
    """Runs logged directly (no training): TNT-S and DeiT-S on ImageNet, TNT-S on CIFAR-10,
    one run timed under load (timing_noisy)."""
    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    imagenet = {"data.name": "imagefolder", "data.root": "/data/imagenet"}
    common = {"infer_step_ms": 41.234567, "infer_peak_mb": 1234.5678, "val_top5": 95.1234}

    def run(model, data, top1, img_s, params_m, gmacs, device, noisy=None):
        tags = {"kind": "cell", "device_name": device, "amp": "bf16"}
        if noisy:
            tags["timing_noisy"] = noisy
        m = {"params_m": params_m, "gmacs": gmacs, "val_top1": top1, "train_img_per_s": img_s}
        p = {"model.name": model, **data}
        return _fake_run(tracker, "paper", model, {**m, **common}, params=p, tags=tags)

    run("tnt_s_patch16_224", imagenet, 81.21, 894.969, 23.7676, 5.2512, "NVIDIA H100")
    noisy = run("tnt_s_patch16_224", imagenet, 81.43, 211.4, 23.7676, 5.2512, "NVIDIA H100", "load")
    run("deit_small_patch16_224", imagenet, 79.52, 1500.25, 22.0502, 4.6080, "NVIDIA H100")
    run("tnt_s_patch16_224", {"data.name": "cifar10"}, 97.81, 3000.7, 23.7676, 5.2512, "cpu")
    rep = build_report(tracker, out=tmp_path / "rep")
    t = rep.tables["main"].set_index(["model", "dataset"])
    tnt = t.loc[("tnt_s_patch16_224", "imagefolder")]
    assert tnt["Δ params (M)"] == pytest.approx(23.7676 - 23.8)
    assert tnt["Δ GMACs"] == pytest.approx(5.2512 - 5.2)
    assert tnt["Δ top-1"] == pytest.approx((81.21 + 81.43) / 2 - 81.5)
    assert t.loc[("deit_small_patch16_224", "imagefolder"), "Δ top-1"] == pytest.approx(
        79.52 - 79.8
    )
    # not ImageNet: the paper's top-1 is no reference, its params and GMACs still are
    cifar = t.loc[("tnt_s_patch16_224", "cifar10")]
    assert cifar["Δ top-1"] != cifar["Δ top-1"] and cifar["Δ GMACs"] == pytest.approx(0.0512)
    assert noisy in tnt["run_ids"].split() and tnt["timing_noisy"] == "load"

    md = (rep.out / "report.md").read_text()
    page = (rep.out / "report.html").read_text()
    _assert_rounded(_md_cells(md))
    _assert_rounded(_html_cells(page))
    rows = {ln.split(" | ")[0].strip("| ") + ln.split(" | ")[1]: ln for ln in md.splitlines()
            if ln.startswith("| tnt_s") or ln.startswith("| deit")}  # fmt: skip
    row = rows["tnt_s_patch16_224imagefolder"]
    # img/s an integer, starred; GMACs 3 digits; top-1 one decimal ± std; deltas signed
    assert "553\\*" in row and "5.25" in row and "81.3 ± 0.2" in row
    assert "-0.0324" in row and "+0.0512" in row and "-0.2" in row
    assert "41.2\\*" in row  # latency starred too
    assert "\\* timing disturbed (load or spread); see the run's timing_noisy tag" in md
    assert "<td class=num>553*</td>" in page and "* timing disturbed" in page
    # best per dataset in bold: DeiT's img/s, TNT's top-1 on ImageNet; alone on CIFAR: no bold
    assert "**1500**" in rows["deit_small_patch16_224imagefolder"]
    assert "**81.3 ± 0.2**" in row and "<b>81.3 ± 0.2</b>" in page
    assert "**" not in rows["tnt_s_patch16_224cifar10"]
    assert rep.header["device"] == "mixed (NVIDIA H100, cpu)" and rep.header["dtype"] == "bf16"
    assert "\\textbf{1500}" in (rep.out / "report.tex").read_text()


@pytest.mark.slow
def test_importances_only_from_ten_complete_trials(tmp_path):
    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    for study, n in (("ten", 10), ("nine", 9)):
        for i in range(n):
            _fake_run(
                tracker,
                "search",
                f"{study}/trial-{i}",
                {"val_top1": 50.0 + 5 * (i % 3) + (i % 2) * 0.1, "gmacs": 0.1 + 0.01 * i},
                params={
                    "search.model.inner_heads": i % 3,
                    "search.train.lr": [0.0007895415835283402, 2.5e-3][i % 2],
                },
                tags={"kind": "trial", "study": study, "trial": i},
            )
    # a pruned trial ends KILLED (no optuna_state tag when pruned during training)
    _fake_run(
        tracker, "search", "nine/trial-9", {"val_top1": 1.0}, params={},
        tags={"kind": "trial", "study": "nine", "trial": 9}, status="KILLED",
    )  # fmt: skip
    rep = build_report(tracker, out=tmp_path / "rep")
    imp = rep.tables["search_ten_importances"]
    assert set(imp["param"]) == {"model.inner_heads", "train.lr"}
    assert imp["importance"].sum() == pytest.approx(1.0)
    # inner heads moves top-1 by 5 points, lr by 0.1: fANOVA ranks it first
    assert imp.iloc[0]["param"] == "model.inner_heads" and imp.iloc[0]["importance"] > 0.9
    assert "search_ten_importances" in rep.plots
    assert "search_nine_importances" not in rep.tables
    md = (rep.out / "report.md").read_text()
    # searched floats come back from MLflow as strings: rounded all the same
    _assert_rounded(_md_cells(md))
    assert "| 0.000790 |" in md and "| 0.00250 |" in md and "0.00078954" not in md
    assert "study nine: 9 complete, 1 pruned" in md and "study ten: 10 complete" in md
    assert "at least 10 completed trials; this search has 9" in md
    assert "this search has 10" not in md
    trials = tracker.runs("search", kind="trial", study="nine")
    assert mlflow_counts(trials) == {"RUNNING": 0, "COMPLETE": 9, "PRUNED": 1, "FAIL": 0}


def test_run_ids_link_to_the_server_and_passwords_are_masked():
    rep = Report(out=None, experiment_ids={"a" * 32: "7"})
    link = run_link(rep, "https://bob:s3cret@mlflow.example:5000/")
    assert link("a" * 32) == f"https://bob:***@mlflow.example:5000/#/experiments/7/runs/{'a' * 32}"
    assert run_link(rep, "sqlite:///x.db")("a" * 32) is None
    import pandas as pd

    shown = present(pd.DataFrame({"model": ["m"], "run_ids": ["a" * 32 + " " + "b" * 32]}))
    page = to_html(shown, run_link(rep, "http://host:5000"))
    assert f"<a href='http://host:5000/#/experiments/7/runs/{'a' * 32}'" in page
    assert f">{'a' * 8}</a>" in page and f" {'b' * 8}</td>" in page  # b: no experiment known
    assert mask_uri("postgresql+psycopg://u:pw@db:5432/mlflow") == (
        "postgresql+psycopg://u:***@db:5432/mlflow"
    )
    assert mask_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_tsne_has_a_class_legend():
    from types import SimpleNamespace

    import torch

    from suite.outputs.viz import tsne_plot

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    points = [{1: torch.randn(60, 8, generator=gen) + labels[:, None]} for _ in range(2)]
    runs = [SimpleNamespace(label=f"run{i}", classes=("cat", "dog", "ship")) for i in range(2)]
    spreads = [{1: {"mean_pdist": 1.0, "dim_std": 1.0}}] * 2
    fig = tsne_plot(runs, points, [labels, labels], 1, spreads)
    (leg,) = fig.legends
    assert [t.get_text() for t in leg.get_texts()] == ["cat", "dog", "ship"]
    colors = [tuple(h.get_color()) for h in leg.legend_handles]
    assert len(set(colors)) == 3
    # the points of class k have the legend's color k
    pts = fig.axes[0].collections[0].get_facecolors()
    assert tuple(pts[1][:3]) == pytest.approx(colors[1][:3])  # RGB; the points are translucent


def _alarm(seconds: int):
    """A generous bound (no pytest-timeout here): a hang fails the test instead of the job."""
    import signal

    def stop(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)


def test_importances_keep_float_params_as_floats_on_50_trials():
    """50 trials with a continuous lr: rebuilt as one category per trial, fANOVA never
    finished (issue 24); with the space's own distributions it takes seconds and still ranks
    the parameter that moves top-1 first."""
    import random

    import pandas as pd
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from suite.outputs.report import _distribution, importances

    rng = random.Random(0)

    def trials(n: int) -> pd.DataFrame:
        rows = []
        for i in range(n):
            heads, lr, depth = rng.choice([1, 2, 4]), 10 ** rng.uniform(-4, -2), rng.randint(1, 12)
            # MLflow hands params back as strings
            rows.append(
                {
                    "params.search.model.inner_heads": str(heads),
                    "params.search.train.lr": str(lr),
                    "params.search.model.depth": str(depth),
                    "top-1 mean": 40.0 + 10 * heads + rng.random(),
                    "run_id": f"r{i}",
                }
            )
        return pd.DataFrame(rows)

    done = trials(50)
    pcols = [c for c in done if c.startswith("params.search.")]
    space = {
        "model.inner_heads": {"choices": [1, 2, 4]},
        "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "model.depth": {"low": 1, "high": 12, "log": False},
    }
    lr = done["params.search.train.lr"]
    assert _distribution(lr, space["train.lr"]) == FloatDistribution(1e-4, 1e-2, log=True)
    assert _distribution(done["params.search.model.depth"], space["model.depth"]) == (
        IntDistribution(1, 12)
    )
    heads = _distribution(done["params.search.model.inner_heads"], space["model.inner_heads"])
    assert isinstance(heads, CategoricalDistribution) and set(heads.choices) == {"1", "2", "4"}
    # no space (a study without its parent run): 50 distinct numbers were a range, not choices
    inferred = _distribution(lr, None)
    assert isinstance(inferred, FloatDistribution) and not inferred.log
    assert inferred.low == min(map(float, lr)) and inferred.high == max(map(float, lr))
    _alarm(240)
    try:
        for sp in (space, None):
            imp = importances(done, pcols, sp)
            assert set(imp["param"]) == {"model.inner_heads", "train.lr", "model.depth"}
            assert imp["importance"].sum() == pytest.approx(1.0)
            assert imp.iloc[0]["param"] == "model.inner_heads"
            assert imp.iloc[0]["importance"] > 0.8 and imp.attrs["evaluator"] == "fANOVA"
        # a study past FANOVA_MAX_TRIALS: PED-ANOVA, the same ranking
        imp = importances(trials(400), pcols, space)
        assert imp.attrs["evaluator"] == "PED-ANOVA" and imp.iloc[0]["param"] == "model.inner_heads"
    finally:
        import signal

        signal.alarm(0)
