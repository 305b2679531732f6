"""Bad input, across every subcommand: a non-zero exit, one line on stderr naming what is wrong,
no traceback, and nothing already stored harmed (the store's runs are unchanged).

Each case builds its input in a temporary folder that also holds a store with one finished run
in it; the case runs in-process through ``suite.cli.main`` (fast), and the store is compared
before and after.
"""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from suite.cli import main

mlflow = pytest.importorskip("mlflow")

TRAIN = [
    "--set",
    "data.train_size=64",
    "--set",
    "data.val_size=32",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=32",
    "--set",
    "tracking.system_metrics=false",
    "--set",
    "model.depth=1",
    "--set",
    "train.amp='fp32'",
]

SEARCH = """
[search]
study = "s"
n_trials = 2
[search.space]
"model.inner_heads" = { choices = [1, 2] }
[model]
name = "tnt_nano"
depth = 1
[data]
train_size = 64
val_size = 32
[train]
epochs = 1
batch_size = 32
amp = "fp32"
[tracking]
system_metrics = false
"""


class Evil:
    """A pickle that runs code when loaded: it must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one finished training run, and its checkpoint."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    argv = ["train", "--tracking-uri", uri, *TRAIN, "--set", f"train.out_dir='{root}/runs'"]
    assert main(argv) == 0
    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])
    return uri, run.info.run_id, Path(run.data.tags["checkpoint_dir"])


def snapshot(uri: str) -> list[tuple]:
    client = mlflow.MlflowClient(uri)
    out = []
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            out.append(
                (
                    r.info.run_id,
                    r.info.status,
                    sorted(r.data.metrics.items()),
                    sorted(r.data.params.items()),
                )
            )
    return sorted(out)


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _evil_checkpoint(tmp: Path) -> Path:
    p = tmp / "evil.pt"
    torch.save({"model": Evil(tmp / "PWNED")}, p)
    return p


def _truncated(tmp: Path, ckpt_dir: Path) -> Path:
    data = (ckpt_dir / "best.pt").read_bytes()  # a finished run keeps only its best.pt
    return _write(tmp / "trunc.pt", data[: len(data) // 2])


def _other_arch(tmp: Path, ckpt_dir: Path) -> Path:
    ckpt = torch.load(ckpt_dir / "best.pt", weights_only=True)
    ckpt["model_name"] = "vit_nano"
    torch.save(ckpt, tmp / "other.pt")
    return tmp / "other.pt"


def _corrupt_imagefolder(tmp: Path) -> Path:
    from PIL import Image

    root = tmp / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(d / f"{i}.png")
    _write(root / "train" / "a" / "broken.png", b"\x89PNG\r\n\x1a\n not really")
    return root


def _readonly_store(tmp: Path, uri: str) -> str:
    src = Path(uri.removeprefix("sqlite:///"))
    dst = tmp / "ro.db"
    dst.write_bytes(src.read_bytes())
    dst.chmod(stat.S_IRUSR)
    return f"sqlite:///{dst}"


def _search_file(tmp: Path, text: str = SEARCH, **replace: str) -> str:
    for a, b in replace.items():
        text = text.replace(a, b)
    return str(_write(tmp / "search.toml", text))


def _matrix_file(tmp: Path) -> str:
    body = SEARCH.split("[model]", 1)[1]  # the same tiny run, as a one-cell matrix
    return str(
        _write(tmp / "m.toml", f'[matrix]\nname = "m"\nmodels = ["tnt_nano"]\n[model]{body}')
    )


def _existing_study(tmp: Path, uri: str) -> str:
    """An SQLite Optuna storage holding study "s" run over another space (inner_heads 1, 2)."""
    storage = f"sqlite:///{tmp}/o.db"
    text = SEARCH.replace("n_trials = 2", "n_trials = 1")
    path = str(_write(tmp / "first" / "search.toml", text))
    assert main(["search", path, "--tracking-uri", uri, "--storage", storage]) == 0
    return storage


# (id, argv builder, words the one line must contain). Builders get (tmp, uri, run_id, ckpt_dir).
CASES = [
    # --- train: the config
    ("missing-config", lambda t, u, r, c: ["train", str(t / "nope.toml")], ["nope.toml"]),
    (
        "non-utf8-toml",
        lambda t, u, r, c: [
            "train",
            str(_write(t / "x.toml", b"[train]\nepochs = 1 # \xff\xfe\n")),
        ],
        ["x.toml", "UTF-8"],
    ),
    (
        "invalid-toml",
        lambda t, u, r, c: ["train", str(_write(t / "x.toml", "[train\n"))],
        ["x.toml", "TOML"],
    ),
    (
        "unknown-section",
        lambda t, u, r, c: ["train", str(_write(t / "x.toml", "[trian]\nepochs = 1\n"))],
        ["trian"],
    ),
    ("set-typo", lambda t, u, r, c: ["train", "--set", "train.epoch=1"], ["--set", "train.epoch"]),
    (
        "set-no-equals",
        lambda t, u, r, c: ["train", "--set", "train.epochs"],
        ["--set", "KEY=VALUE"],
    ),
    ("wrong-type", lambda t, u, r, c: ["train", "--set", "train.epochs='x'"], ["train.epochs"]),
    ("zero-epochs", lambda t, u, r, c: ["train", "--set", "train.epochs=0"], ["train.epochs"]),
    ("min-lr-inf", lambda t, u, r, c: ["train", "--set", "train.min_lr=inf"], ["train.min_lr"]),
    ("lr-nan", lambda t, u, r, c: ["train", "--set", "train.lr=nan"], ["train.lr"]),
    ("bad-compile", lambda t, u, r, c: ["train", "--set", "train.compile=3"], ["train.compile"]),
    ("bad-device", lambda t, u, r, c: ["train", "--set", "train.device='tpu'"], ["train.device"]),
    ("bad-dataset", lambda t, u, r, c: ["train", "--set", "data.name='imagenet'"], ["data.name"]),
    ("cifar-no-root", lambda t, u, r, c: ["train", "--set", "data.name='cifar10'"], ["data.root"]),
    ("unknown-model", lambda t, u, r, c: ["train", "--set", "model.name='tnt_xl'"], ["tnt_xl"]),
    (
        "bad-inner-heads",
        lambda t, u, r, c: ["train", "--set", "model.inner_heads=5"],
        ["inner_heads"],
    ),
    (
        "long-experiment",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            f"tracking.experiment='{'e' * 501}'",
        ],
        ["tracking.experiment", "500"],
    ),
    (
        "out-dir-is-a-file",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            f"train.out_dir='{_write(t / 'f', 'x')}'",
        ],
        ["train.out_dir"],
    ),
    (
        "corrupt-image",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "data.name='imagefolder'",
            "--set",
            f"data.root='{_corrupt_imagefolder(t)}'",
            "--set",
            f"train.out_dir='{t}/runs'",
        ],
        ["broken.png"],
    ),
    (
        "diverging-run",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "train.lr=1e12",
            "--set",
            "tracking.log_every=1",
            "--set",
            f"train.out_dir='{t}/runs'",
            "--set",
            "tracking.experiment='div'",
        ],
        ["diverged", "train.lr"],
    ),
    # --- train: resume and teacher files
    (
        "resume-missing",
        lambda t, u, r, c: ["train", "--tracking-uri", u, *TRAIN, "--resume", str(t / "none.pt")],
        ["--resume"],
    ),
    (
        "resume-truncated",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--resume",
            str(_truncated(t, c)),
        ],
        ["trunc.pt"],
    ),
    (
        "resume-not-a-checkpoint",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--resume",
            str(_write(t / "notes.pt", "hello")),
        ],
        ["notes.pt"],
    ),
    (
        "resume-malicious-pickle",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--resume",
            str(_evil_checkpoint(t)),
        ],
        ["evil.pt"],
    ),
    (
        "resume-other-architecture",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--resume",
            str(_other_arch(t, c)),
        ],
        ["other.pt", "vit_nano"],
    ),
    (
        "resume-unknown-run-id",
        lambda t, u, r, c: ["train", "--tracking-uri", u, *TRAIN, "--resume", "0" * 32],
        ["--resume"],
    ),
    (
        "teacher-malicious-pickle",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "model.name='deit_nano_distilled'",
            "--set",
            "distill.kind='hard'",
            "--set",
            f"distill.teacher='{_evil_checkpoint(t)}'",
            "--set",
            "distill.teacher_model='tnt_nano'",
            "--set",
            f"train.out_dir='{t}/runs'",
        ],
        ["evil.pt"],
    ),
    (
        "teacher-missing",
        lambda t, u, r, c: [
            "train",
            "--set",
            "model.name='deit_nano_distilled'",
            "--set",
            "distill.kind='hard'",
            "--set",
            f"distill.teacher='{t}/none.pt'",
            "--set",
            "distill.teacher_model='tnt_nano'",
        ],
        ["distill.teacher"],
    ),
    (
        "teacher-bad-run-uri",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "model.name='deit_nano_distilled'",
            "--set",
            "distill.kind='hard'",
            "--set",
            f"distill.teacher='runs:/{'0' * 32}'",
            "--set",
            f"train.out_dir='{t}/runs'",
        ],
        ["runs:/"],
    ),
    # --- the store
    (
        "unsupported-uri",
        lambda t, u, r, c: ["train", "--tracking-uri", "foo://bar", *TRAIN],
        ["foo://bar"],
    ),
    (
        "unreachable-server",
        lambda t, u, r, c: ["train", "--tracking-uri", "http://127.0.0.1:9", *TRAIN],
        ["http://127.0.0.1:9", "unreachable"],
    ),
    (
        "read-only-store",
        lambda t, u, r, c: ["train", "--tracking-uri", _readonly_store(t, u), *TRAIN],
        ["read-only"],
    ),
    # --- profile
    (
        "profile-zero-steps",
        lambda t, u, r, c: ["profile", "tnt_nano", "--steps", "0", "--device", "cpu"],
        ["--steps"],
    ),
    (
        "profile-json-missing-folder",
        lambda t, u, r, c: [
            "profile",
            "tnt_nano",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--json",
            str(t / "no" / "x.json"),
        ],
        ["--json"],
    ),
    ("profile-unknown-model", lambda t, u, r, c: ["profile", "tnt_xl"], ["tnt_xl"]),
    (
        "profile-zero-batch",
        lambda t, u, r, c: ["profile", "tnt_nano", "--batch-size", "0"],
        ["--batch-size"],
    ),
    (
        "profile-negative-warmup",
        lambda t, u, r, c: ["profile", "tnt_nano", "--warmup", "-1"],
        ["--warmup"],
    ),
    # --- search
    (
        "search-n-trials-many",
        lambda t, u, r, c: [
            "search",
            _search_file(t, **{"n_trials = 2": 'n_trials = "many"'}),
            "--tracking-uri",
            u,
        ],
        ["search.n_trials"],
    ),
    (
        "search-cli-zero-trials",
        lambda t, u, r, c: ["search", _search_file(t), "--n-trials", "0", "--tracking-uri", u],
        ["--n-trials"],
    ),
    (
        "search-cli-negative-trials",
        lambda t, u, r, c: ["search", _search_file(t), "--n-trials", "-3", "--tracking-uri", u],
        ["--n-trials"],
    ),
    (
        "search-no-table",
        lambda t, u, r, c: [
            "search",
            str(_write(t / "x.toml", "[train]\nepochs = 1\n")),
            "--tracking-uri",
            u,
        ],
        ["[search]"],
    ),
    (
        "search-unbuildable-space",
        lambda t, u, r, c: [
            "search",
            _search_file(t, **{"choices = [1, 2]": "choices = [5, 7]"}),
            "--tracking-uri",
            u,
            "--storage",
            f"sqlite:///{t}/o.db",
        ],
        ["no trial", "built"],
    ),
    (
        "search-study-with-another-space",
        lambda t, u, r, c: [
            "search",
            _search_file(t, **{"choices = [1, 2]": "choices = [1, 2, 4]"}),
            "--tracking-uri",
            u,
            "--storage",
            _existing_study(t, u),
        ],
        ["already exists", "--study"],
    ),
    (
        "search-zero-workers",
        lambda t, u, r, c: ["search", _search_file(t), "--workers", "0", "--tracking-uri", u],
        ["--workers"],
    ),
    (
        "search-bad-storage",
        lambda t, u, r, c: ["search", _search_file(t), "--storage", "nowhere", "--tracking-uri", u],
        ["--storage"],
    ),
    # --- matrix
    (
        "matrix-no-table",
        lambda t, u, r, c: [
            "matrix",
            str(_write(t / "x.toml", "[train]\nepochs = 1\n")),
            "--tracking-uri",
            u,
        ],
        ["[matrix]"],
    ),
    (
        "matrix-missing-file",
        lambda t, u, r, c: ["matrix", str(t / "none.toml"), "--tracking-uri", u],
        ["none.toml"],
    ),
    (
        "matrix-zero-workers",
        lambda t, u, r, c: ["matrix", _matrix_file(t), "--workers", "0", "--tracking-uri", u],
        ["--workers"],
    ),
    (
        "matrix-bad-storage",
        lambda t, u, r, c: ["matrix", _matrix_file(t), "--storage", "nowhere", "--tracking-uri", u],
        ["--storage"],
    ),
    (
        "matrix-workers-on-a-server-without-storage",
        lambda t, u, r, c: [
            "matrix",
            _matrix_file(t),
            "--workers",
            "2",
            "--tracking-uri",
            "http://127.0.0.1:9",
        ],
        ["127.0.0.1:9"],  # the server is checked first: unreachable, named
    ),
    # --- report, viz, ui, demo, models
    (
        "report-unknown-matrix",
        lambda t, u, r, c: [
            "report",
            "--tracking-uri",
            u,
            "--matrix",
            "nope",
            "--out",
            str(t / "r"),
        ],
        ["--matrix", "nope"],
    ),
    (
        "report-unknown-study",
        lambda t, u, r, c: [
            "report",
            "--tracking-uri",
            u,
            "--study",
            "nope",
            "--out",
            str(t / "r"),
        ],
        ["--study", "nope"],
    ),
    (
        "report-out-is-a-file",
        lambda t, u, r, c: ["report", "--tracking-uri", u, "--out", str(_write(t / "f", "x"))],
        ["--out"],
    ),
    (
        "demo-out-is-a-file",
        lambda t, u, r, c: ["demo", "--out", str(_write(t / "f", "x"))],
        ["--out"],
    ),
    (
        "ui-port-out-of-range",
        lambda t, u, r, c: ["ui", "--tracking-uri", u, "--port", "99999"],
        ["--port"],
    ),
    ("viz-unknown-run", lambda t, u, r, c: ["viz", "0" * 32, "--tracking-uri", u], ["0" * 32]),
    ("models-unknown", lambda t, u, r, c: ["models", "tnt_xl"], ["tnt_xl"]),
]


# stderr lines that are not the error: warnings, and the stage/trial lines of viz, report, search
NOT_ERRORS = ("warning:", "viz: ", "report: ", "trial ")


@pytest.mark.parametrize(("case", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_harms_nothing(
    case, argv, words, store, tmp_path, capsys, monkeypatch
):
    uri, run_id, ckpt_dir = store
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands in the temporary folder
    before = snapshot(uri)
    args = argv(tmp_path, uri, run_id, ckpt_dir)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(NOT_ERRORS)]
    assert code not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "PWNED").exists()  # no code from a file ran
    after = [r for r in snapshot(uri) if r[0] in {b[0] for b in before}]
    assert after == before  # nothing stored was changed by the mistake


def test_malicious_viz_checkpoint_is_refused(store, tmp_path, capsys):
    """A run whose checkpoint_dir tag points at a planted pickle: viz refuses, runs nothing."""
    uri, run_id, _ = store
    client = mlflow.MlflowClient(uri)
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    torch.save({"model": Evil(tmp_path / "PWNED")}, evil_dir / "best.pt")
    old = client.get_run(run_id).data.tags["checkpoint_dir"]
    client.set_tag(run_id, "checkpoint_dir", str(evil_dir))
    try:
        assert main(["viz", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "v")]) == 2
    finally:
        client.set_tag(run_id, "checkpoint_dir", old)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(NOT_ERRORS)]
    assert len(lines) == 1 and "best.pt" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()


def test_pickle_module_still_runs_the_payload_without_us():
    """Sanity check of the planted file: plain pickle would run it (so the tests mean it)."""
    assert Evil(Path("/nonexistent")).__reduce__()[0] is os.system
    assert pickle.dumps(Evil(Path("/x")))
