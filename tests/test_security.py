"""Issue 27's security class: no code runs from a data file (CIFAR batches, also reached through
a checkpoint's stored config), no password reaches the store or a printed line, a report opens
the storages a store names read-only, and a checkpoint's stored model arguments are bounded.

Every planted pickle here would run ``touch PWNED`` when unpickled; each test checks that the
marker never appears, and that the refusal is one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Evil, tiny_toml

from suite.cli import main
from suite.config import DataConfig
from suite.errors import UserError, redact, unredacted_for_connect
from suite.training.cifar import read_pickle
from suite.training.data import build_datasets

mlflow = pytest.importorskip("mlflow")
optuna = pytest.importorskip("optuna")


def tiny_config(tmp: Path, exp: str) -> str:
    """The tiny run's config file (TOML), checkpoints under ``tmp``, in experiment ``exp``."""
    run = {"model.name": "tnt_nano", "data.train_size": 64, "data.val_size": 32}
    run |= {"train.amp": "fp32", "train.device": "cpu", "train.out_dir": f"{tmp}/runs"}
    return tiny_toml({**run, "tracking.experiment": exp})


# stderr lines that are not the error: warnings and progress lines
NOT_ERRORS = ("warning:", "viz: ", "report: ", "trial ")


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(NOT_ERRORS)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# CIFAR: a restricted unpickler


def write_cifar10(root: Path, protocol: int = 2) -> Path:
    """Tiny CIFAR-10 in torchvision's format: 5 train batches of 4, a test batch of 6."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 6)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        # labels as numpy ints in one batch (as numpy-written files have), plain ints elsewhere
        labels = [np.int64(i % 10) if name == "test_batch" else i % 10 for i in range(n)]
        entry = {"data": data, "labels": labels, "batch_label": name, "filenames": ["a.png"] * n}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_format_loads_from_every_pickle_protocol(tmp_path, protocol):
    """The restricted reader still admits the real format, however it was pickled."""
    folder = write_cifar10(tmp_path, protocol)
    tr, va, info = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    assert (len(tr), len(va), info.num_classes, info.classes[9]) == (20, 6, 10, "truck")
    raw = pickle.loads((folder / "test_batch").read_bytes())
    assert torch.equal(va.images, torch.from_numpy(raw["data"]).view(-1, 3, 32, 32))
    assert va.labels.tolist() == [i % 10 for i in range(6)]


@pytest.mark.parametrize("planted", ["batches.meta", "data_batch_1", "data_batch_5", "test_batch"])
def test_cifar_planted_pickle_never_runs(tmp_path, planted):
    folder = write_cifar10(tmp_path)
    (folder / planted).write_bytes(pickle.dumps(Evil(tmp_path / "PWNED")))
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    msg = str(e.value)
    assert planted in msg and "refused global" in msg and "\n" not in msg
    assert not (tmp_path / "PWNED").exists()


def test_cifar_evil_objects_nested_in_an_array_never_run(tmp_path):
    """An object array whose items are planted: still refused (items go through the same
    restricted lookup), and the format check would refuse the dtype anyway."""
    folder = write_cifar10(tmp_path)
    data = np.empty((4, 3072), dtype=object)
    data[0, 0] = Evil(tmp_path / "PWNED")
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": data, "labels": [0] * 4}))
    with pytest.raises(UserError, match="data_batch_2"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, "uint8"),
        ({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, "100 values"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, "labels"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, "outside 0..9"),
        ({"labels": [0] * 4}, "no 'data'"),
        ([1, 2, 3], "not a dict"),
    ],
    ids=["float-data", "short-rows", "label-count", "label-range", "no-data", "a-list"],
)
def test_cifar_batch_not_in_the_format_is_one_line(tmp_path, entry, words):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    assert "data_batch_3" in str(e.value) and words in str(e.value)


def test_cifar100_planted_meta_never_runs(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        entry = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [1, 2, 3, 99]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps(Evil(tmp_path / "PWNED"), protocol=0))
    with pytest.raises(UserError, match="meta"):
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path)), 32)
    assert not (tmp_path / "PWNED").exists()


def test_read_pickle_refuses_every_global_but_arrays(tmp_path):
    for payload in (Evil(tmp_path / "PWNED"), [print], {"f": Path("/x")}):
        p = tmp_path / "x.pkl"
        p.write_bytes(pickle.dumps(payload))
        with pytest.raises(pickle.UnpicklingError, match="refused global"):
            read_pickle(p)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_train_on_a_planted_cifar_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar10(tmp_path / "data")
    (folder / "batches.meta").write_bytes(pickle.dumps(Evil(tmp_path / "PWNED")))
    argv = ["train", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    argv += ["--set", "data.name='cifar10'", "--set", f"data.root='{tmp_path / 'data'}'"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "batches.meta" in line and "data.root" in line
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# A trained run, for the checkpoint and viz paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store URI, run ID, checkpoint folder) of one finished tiny run."""
    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root}/m.db"
    cfg = root / "c.toml"
    cfg.write_text(tiny_config(root, "t"))
    assert main(["train", str(cfg), "--tracking-uri", uri]) == 0
    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])
    return uri, run.info.run_id, Path(run.data.tags["checkpoint_dir"])


def _altered_checkpoint(src: Path, dst: Path, toml_edit=None, **kwargs) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["model_kwargs"] = {**ckpt["model_kwargs"], **kwargs}
    if toml_edit:
        ckpt["config_toml"] = toml_edit(ckpt["config_toml"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


def test_viz_of_a_checkpoint_naming_a_planted_cifar_folder_never_runs_it(trained, tmp_path, capsys):
    """viz builds the run's dataset from the config stored in its checkpoint: a checkpoint whose
    config names a planted CIFAR folder is refused at the pickle, never run."""
    uri, run_id, ckpt_dir = trained
    folder = write_cifar10(tmp_path / "data")
    (folder / "test_batch").write_bytes(pickle.dumps(Evil(tmp_path / "PWNED")))

    def to_cifar(text: str) -> str:
        return text.replace('name = "synthetic"', 'name = "cifar10"').replace(
            'root = ""', f"root = '{tmp_path / 'data'}'"
        )

    _altered_checkpoint(ckpt_dir / "best.pt", tmp_path / "ck" / "best.pt", to_cifar)
    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "checkpoint_dir", str(tmp_path / "ck"))
    try:
        code = main(["viz", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "v")])
    finally:
        client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "test_batch" in line
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("path", ["teacher", "viz"])
def test_checkpoint_model_arguments_are_bounded(trained, tmp_path, capsys, path):
    """A checkpoint claiming depth 100,000,000: refused in well under a second of work, on
    every path that builds a model from a checkpoint's arguments (``--resume`` builds the
    model from the config, checked as any config is)."""
    uri, run_id, ckpt_dir = trained
    big = _altered_checkpoint(
        ckpt_dir / "best.pt",
        tmp_path / "ck" / "best.pt",
        lambda t: t.replace("depth = 1\n", "depth = 100000000\n"),
        depth=100_000_000,
    )
    base = ["train", "--tracking-uri", uri, "--set", f"train.out_dir='{tmp_path}/r'"]
    if path == "teacher":
        argv = [*base, "--set", "model.name='deit_nano_distilled'", "--set", "model.depth=1"]
        argv += ["--set", "distill.kind='hard'", "--set", f"distill.teacher='{big}'"]
        argv += ["--set", "distill.teacher_model='tnt_nano'"]
        argv += ["--set", "data.train_size=64", "--set", "data.val_size=32"]
    else:
        argv = ["viz", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "v")]
        client = mlflow.MlflowClient(uri)
        client.set_tag(run_id, "checkpoint_dir", str(tmp_path / "ck"))
    t0 = time.perf_counter()
    try:
        code = main(argv)
    finally:
        if path == "viz":
            client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir))
    elapsed = time.perf_counter() - t0
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "depth" in line and "at most" in line, line
    assert elapsed < 60  # not minutes of building or validating a hundred million layers


# ---------------------------------------------------------------------------------------------
# Credentials


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql+psycopg://bench:s3cret@db:5432/x", "postgresql+psycopg://bench:***@db:5432/x"),
        ("mysql://u:p%40ss@h/d?x=1", "mysql://u:***@h/d?x=1"),
        ("https://tok:abc:def@host/api", "https://tok:***@host/api"),
        ("at 'postgresql://u:pw@h/d' (password=pw)", "at 'postgresql://u:***@h/d' (password=***)"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("file:///a/b:c@d", "file:///a/b:c@d"),
    ],
)  # fmt: skip
def test_redact_hides_passwords_and_only_them(text, shown):
    assert redact(text) == shown


def test_a_redacted_url_connects_with_the_drivers_own_credentials():
    assert unredacted_for_connect("postgresql://u:***@h/d") == "postgresql://u@h/d"
    assert unredacted_for_connect("postgresql://u:real@h/d") == "postgresql://u:real@h/d"


def _everything_in(store: Path) -> bytes:
    """Every byte of an SQLite store and the artifacts beside it."""
    return b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())


def test_unreachable_storage_password_is_never_printed_or_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "s.toml"
    space = '[search]\nstudy = "p"\nn_trials = 1\n[search.space]\n'
    space += '"model.inner_heads" = { choices = [1, 2] }\n'
    cfg.write_text(space + tiny_config(tmp_path, "p"))
    url = "postgresql+psycopg://bench:Sup3rSecretPw@127.0.0.1:9/none?connect_timeout=2"
    code = main(
        ["search", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", url]
    )
    out, err = capsys.readouterr()
    assert code == 2 and "Sup3rSecretPw" not in out + err and "bench:***@" in err
    assert b"Sup3rSecretPw" not in _everything_in(tmp_path)


@pytest.mark.slow
def test_postgres_storage_password_is_not_in_the_store(tmp_path, pg_storage_url, capsys):
    """A real search on PostgreSQL: the URL with its password is logged as a param, in the
    config artifact and in each trial's tags: all redacted, and the report still reads the
    study's counts from the storage (the driver takes the password from PGPASSWORD)."""
    from sqlalchemy.engine import make_url

    password = make_url(pg_storage_url).password
    assert password
    cfg = tmp_path / "s.toml"
    space = '[search]\nstudy = "p"\nn_trials = 2\n[search.space]\n'
    space += '"model.inner_heads" = { choices = [1, 2] }\n'
    cfg.write_text(space + tiny_config(tmp_path, "p"))
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/m.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PGPASSWORD", None)
    cmd = [sys.executable, "-m", "suite", "search", str(cfg), "--tracking-uri", uri]
    done = subprocess.run(
        [*cmd, "--storage", pg_storage_url], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    leaked = f":{password}@".encode()
    assert leaked not in (done.stdout + done.stderr).encode()
    assert leaked not in _everything_in(store)
    params = [
        r.data.params.get("search.storage") for r in mlflow.MlflowClient(uri).search_runs(["1"])
    ]
    assert any(p and ":***@" in p for p in params), params
    report = [
        sys.executable,
        "-m",
        "suite",
        "report",
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "rep"),
    ]
    done = subprocess.run(
        report, cwd=tmp_path, env={**env, "PGPASSWORD": password}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert leaked not in _everything_in(tmp_path / "rep")


# ---------------------------------------------------------------------------------------------
# A report opens the storages a store names read-only


@pytest.fixture
def searched(tmp_path):
    """A finished 2-trial search on an SQLite storage: (store URI, storage file)."""
    cfg = tmp_path / "s.toml"
    space = '[search]\nstudy = "r"\nn_trials = 2\n[search.space]\n'
    space += '"model.inner_heads" = { choices = [1, 2] }\n'
    cfg.write_text(space + tiny_config(tmp_path, "r"))
    uri = f"sqlite:///{tmp_path}/m.db"
    storage = tmp_path / "optuna.db"
    assert (
        main(["search", str(cfg), "--tracking-uri", uri, "--storage", f"sqlite:///{storage}"]) == 0
    )
    return uri, storage


def _point_storage_param_at(uri: str, url: str) -> None:
    """Rewrite the search parent's ``search.storage`` param (MLflow params are immutable, so
    in the database: what a store received from someone else could say)."""
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        n = db.execute("UPDATE params SET value = ? WHERE key = 'search.storage'", (url,)).rowcount
    assert n >= 1


def test_report_reads_the_study_counts_from_the_storage_without_writing(searched, tmp_path):
    uri, storage = searched
    before = sha(storage)
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    assert "study r: 2 complete" in (tmp_path / "rep" / "report.md").read_text()
    assert sha(storage) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["sqlite-other", "sqlite-missing", "journal-other", "journal-missing"]
)
def test_report_never_writes_into_a_storage_the_store_names(searched, tmp_path, kind):
    uri, _ = searched
    other = tmp_path / "victim"
    other.mkdir()
    if kind == "sqlite-other":
        target = other / "app.db"
        with sqlite3.connect(target) as db:
            db.execute("CREATE TABLE accounts (name TEXT)")
        url = f"sqlite:///{target}"
    elif kind == "journal-other":
        target = other / "notes.journal"
        target.write_text("my notes\n")
        url = str(target)
    else:
        target = other / ("gone.db" if kind == "sqlite-missing" else "gone.journal")
        url = f"sqlite:///{target}" if kind == "sqlite-missing" else f"journal:{target}"
    _point_storage_param_at(uri, url)
    before = {p.name: sha(p) for p in other.iterdir()}
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    assert {p.name: sha(p) for p in other.iterdir()} == before  # nothing made, nothing changed
    # the counts come from the MLflow runs instead
    assert "study r: 2 complete" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_report_never_creates_tables_in_a_postgres_database_the_store_names(
    searched, tmp_path, pg_storage_url
):
    from sqlalchemy import create_engine, inspect

    uri, _ = searched
    _point_storage_param_at(uri, pg_storage_url)
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    engine = create_engine(pg_storage_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Leftovers: viz of a run whose checkpoint is only in the store's artifacts


def test_viz_from_an_artifact_leaves_no_copy_behind(trained, tmp_path, monkeypatch, capsys):
    """The checkpoint is read from a temporary folder that is removed: nothing under ~/.cache
    (HOME is the test's folder) and nothing left in the temporary directory."""
    uri, run_id, ckpt_dir = trained
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "checkpoint_dir", str(tmp_path / "moved-away"))
    try:
        argv = ["viz", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "v")]
        argv += ["--images", "16"]
        code = main(argv)
    finally:
        client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir))
    assert code == 0, capsys.readouterr().err
    assert list(home.rglob("*")) == [] and list(tmp.iterdir()) == []
    assert any((tmp_path / "v").iterdir())
