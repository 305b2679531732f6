"""``tntbench ui``: SIGTERM or SIGINT stop the MLflow server child too; the help names the store."""

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
from conftest import free_port, wait_until_answers

from suite.cli import main


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_its_server_on_a_signal(tmp_path, sig):
    port = free_port()
    cmd = [sys.executable, "-m", "suite", "ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}", proc)
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
