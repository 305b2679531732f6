"""``tntbench demo``: every stage (matrix, search, viz, report) into a fresh store in its
``--out`` folder, and nothing written anywhere else: not the working folder,
nor HOME (matplotlib's font cache aside)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole demo, in a subprocess: minutes


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_demo_runs_every_stage_and_writes_only_into_out(tmp_path):
    cwd, home, out = tmp_path / "cwd", tmp_path / "home", tmp_path / "d"
    cwd.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "XDG_"))}
    env.pop("MPLCONFIGDIR", None)  # matplotlib's cache must not go to HOME either
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "suite", "demo", "--out", str(out), "--tiny"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout

    assert (out / "mlflow.db").is_file() and (out / "optuna.db").is_file()
    for model in ("tnt_nano", "vit_nano", "deit_nano_distilled"):
        assert model in text
    assert "study pixel_patch" in text and "best trial" in text
    assert "feature maps and t-SNE" in text and "mean_pdist" in text
    assert list((out / "viz").glob("tsne_layer*.png"))
    assert list((out / "report").glob("viz_*_tsne_layer*.png"))
    assert (out / "report" / "report.html").is_file()
    assert f"open the UI:  tntbench ui --tracking-uri sqlite:///{out}/mlflow.db" in text
    assert "mlflow ui" not in text

    assert _all_files(cwd) == []
    # in HOME only matplotlib's own font cache, as for any matplotlib user (no tntbench cache,
    # no mlruns)
    mpl = {".cache", ".config", ".cache/matplotlib", ".config/matplotlib"}
    assert {f for f in _all_files(home) if not f.startswith(".cache/matplotlib/font")} <= mpl
