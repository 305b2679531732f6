"""Reports: tables equal the MLflow metrics, every format written, HTML renders in Chromium,
``tntbench ui`` serves the store."""

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

from suite.cli import main
from suite.outputs.report import build_report
from suite.studies.matrix import run_matrix
from suite.studies.search import run_search
from suite.tracking import make_tracker

TINY = [
    "data.train_size=128",
    "data.val_size=64",
    "train.epochs=2",
    "train.batch_size=32",
    "tracking.system_metrics=false",
    "model.depth=1",
]


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
    s.write_text(
        '[search]\nstudy = "st"\nsampler = "random"\npruner = "none"\nn_trials = 3\n'
        '[search.space]\n"model.inner_heads" = { choices = [1, 2, 4] }\n'
        f"[train]\nout_dir = '{tmp}/runs'\n[tracking]\nexperiment = 'st'\n"
    )
    run_search(s, TINY, tracking_uri=uri)
    return tmp, uri


def test_report_tables_equal_mlflow_metrics(store):
    mlflow = pytest.importorskip("mlflow")
    tmp, uri = store
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
        assert row["top-1"] == f"{mean:.2f} +- {std:.2f}"
        gm = [r.data.metrics["gmacs"] for r in runs if r.info.run_id in ids]
        assert row["GMACs"] == pytest.approx(sum(gm) / len(gm))
    abl = rep.tables["ablation_inner_heads"]
    assert sorted(abl["inner_heads"].astype(int)) == [1, 2]
    assert set(abl["paper top-1 (TNT-S, ImageNet)"]) == {81.0, 81.4}
    assert "search_st_best" in rep.tables and len(rep.tables["search_st_best"]) == 3
    csv = (rep.out / "main.csv").read_text()
    assert "run_ids" in csv.splitlines()[0]
    assert "\\toprule" in (rep.out / "report.tex").read_text()
    arts = mlflow.MlflowClient(uri).list_artifacts(rep.run_id, "report")
    assert any(a.path.endswith("report.html") for a in arts)


def test_report_cli_and_bad_experiment(store, capsys):
    tmp, uri = store
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


def test_html_renders_in_headless_chromium_with_images(store, tmp_path):
    from PIL import Image, ImageStat

    tmp, uri = store
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


def test_ui_serves_the_store_over_rest(store):
    tmp, uri = store
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
