"""User commands run in a checkout write only where the README says: the default store
``./mlflow.db`` with its artifacts in ``./mlruns/``, checkpoints in ``./runs/``. Nothing else
appears (git status of a fresh copy, ignored files included)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import CHECKOUT, checkout_state, tiny_sets

pytestmark = pytest.mark.slow  # a copy of the checkout and three commands in subprocesses

TINY = tiny_sets({"model.name": "tnt_nano", "data.train_size": 64, "data.val_size": 32})


def _copy(dst):
    """The checkout's files as they are now (tracked and new, ignored ones left out), committed
    in a fresh repository at ``dst``."""
    git = ["git", "-C", str(CHECKOUT), "ls-files", "-z", "--cached", "--others"]
    files = subprocess.run([*git, "--exclude-standard"], capture_output=True, check=True)
    for rel in filter(None, files.stdout.decode().split("\0")):
        if (CHECKOUT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CHECKOUT / rel, dst / rel)
    who = ["-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "-A"], [*who, "commit", "-qm", "copy"]):
        subprocess.run(["git", "-C", str(dst), *cmd], check=True, capture_output=True)


def _tntbench(copy, home, *argv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "suite", *argv]
    done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_user_commands_write_only_the_documented_paths(tmp_path):
    if checkout_state() is None:
        pytest.skip("not a git checkout, or git is missing")
    copy, home = tmp_path / "copy", tmp_path / "home"
    copy.mkdir()
    home.mkdir()
    _copy(copy)
    assert checkout_state(copy) == set()

    assert "tnt_nano" in _tntbench(copy, home, "models", "tnt_nano")
    assert "6 cells" in _tntbench(copy, home, "matrix", "experiments/smoke.toml", "--dry-run")
    assert checkout_state(copy) == set()  # listing and dry runs write nothing

    out = _tntbench(copy, home, "train", *[f"--set={s}" for s in TINY])
    assert "tracking: sqlite:///mlflow.db  (tntbench ui --tracking-uri sqlite:///mlflow.db)" in out
    written = {line.split(maxsplit=1)[1] for line in checkout_state(copy)}
    assert "!! mlflow.db" in checkout_state(copy)
    top = {p.split("/")[0] for p in written}
    assert top <= {"mlflow.db", "mlflow.db.lock", "mlruns", "runs"}, written
    assert any(p.startswith("runs/") and p.endswith("/best.pt") for p in written), written
    assert any(p.startswith("mlruns/") for p in written), written  # the run's artifacts
