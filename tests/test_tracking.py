"""The tracking layer's own guarantees: escaped filters, long params, idempotent dataset
records, a silent server found out within seconds."""

import socket
import time

import pytest

from suite.errors import UserError
from suite.tracking import filter_string, make_tracker

mlflow = pytest.importorskip("mlflow")

# each test makes a fresh MLflow store (its schema migrations take seconds) or waits on a server
pytestmark = pytest.mark.slow


def test_filters_match_names_with_quotes(tmp_path):
    tracker = make_tracker(f"sqlite:///{tmp_path}/m.db")
    for name in ("o'brien", 'say "hi"', "plain"):
        with tracker.run("e", "r", {"kind": "matrix", "matrix": name}):
            pass
    for name in ("o'brien", 'say "hi"', "plain"):
        df = tracker.runs("e", status="FINISHED", kind="matrix", matrix=name)
        assert list(df["tags.matrix"]) == [name]
    with pytest.raises(UserError, match="cannot be searched"):
        filter_string(matrix="both ' and \"")


def test_param_over_mlflows_limit_is_logged_as_a_hash(tmp_path, capsys):
    tracker = make_tracker(f"sqlite:///{tmp_path}/m.db")
    with tracker.run("e", "r") as run:
        run.log_params({"long": "x" * 7000, "short": "y"})
    (r,) = mlflow.MlflowClient(tracker.uri).search_runs(["1"])
    assert r.data.params["long"].startswith("sha256:") and "7000 chars" in r.data.params["long"]
    assert r.data.params["short"] == "y"
    err = capsys.readouterr().err
    assert "param long is 7,000 characters" in err and "config.toml" in err


def test_dataset_record_race_is_retried(tmp_path, monkeypatch):
    """Two workers inserting the same dataset: the loser's unique-constraint error is retried
    (the record exists then) instead of failing the run."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    from suite.config import DataConfig
    from suite.training.data import build_datasets

    tracker = make_tracker(f"sqlite:///{tmp_path}/m.db")
    _, _, info = build_datasets(DataConfig(train_size=8, val_size=8), 32)
    real = mlflow.MlflowClient.log_inputs
    calls = []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            try:
                raise IntegrityError("INSERT INTO datasets", {}, Exception("UNIQUE constraint"))
            except IntegrityError as e:
                raise MlflowException("UNIQUE constraint failed: datasets") from e
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", racing)
    with tracker.run("e", "r") as run:
        run.log_dataset(info, "train")
    (r,) = mlflow.MlflowClient(tracker.uri).search_runs(["1"])
    assert len(calls) == 2 and r.info.status == "FINISHED"
    assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["synthetic"]


def test_silent_server_fails_within_seconds(tmp_path):
    """A server that accepts connections and never answers: one UserError within ~10 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UserError, match="unreachable"):
            make_tracker(uri)
        assert time.monotonic() - t0 < 25


def test_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    """Not in ./mlruns of the folder the command ran in."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tracker = make_tracker(f"sqlite:///{tmp_path}/store/m.db")
    with tracker.run("e", "r") as run:
        run.log_text("hello", "note.txt")
    (r,) = mlflow.MlflowClient(tracker.uri).search_runs(["1"])
    assert r.info.artifact_uri.startswith((tmp_path / "store" / "mlruns").as_uri())
    assert list(cwd.iterdir()) == []
