"""``tntbench ui``: SIGTERM or SIGINT stop the MLflow server child too; the help names the store."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from suite.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_its_server_on_a_signal(tmp_path, sig):
    port = _free_port()
    cmd = [sys.executable, "-m", "suite", "ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120  # mlflow server starts slowly on a busy machine
        while not _answers(port):
            assert proc.poll() is None, "tntbench ui exited before the server answered"
            assert time.monotonic() < deadline, f"no answer on port {port} within 120 s"
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the server (and its workers) run beside us
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert proc.stdout.readline().startswith(f"MLflow UI for sqlite:///{tmp_path}/m.db at http")
    assert _refused(port)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_ui_help_names_the_store_it_opens(capsys):
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder" in text
