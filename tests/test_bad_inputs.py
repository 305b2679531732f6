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
from conftest import Evil, set_args, tiny_sets, tiny_toml

from suite.cli import main

mlflow = pytest.importorskip("mlflow")

SMALL = {"data.train_size": 64, "data.val_size": 32, "train.amp": "fp32"}  # the tiny run, halved
# keep_checkpoints: the store's finished run keeps last.pt, so the --resume cases reach their check
TRAIN = set_args(tiny_sets({**SMALL, "train.keep_checkpoints": "all"}))

SEARCH = (
    '[search]\nstudy = "s"\nn_trials = 2\n'
    '[search.space]\n"model.inner_heads" = { choices = [1, 2] }\n'
    + tiny_toml({"model.name": "tnt_nano", **SMALL})
)


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


def test_pickle_module_still_runs_the_payload_without_us(tmp_path):
    """Sanity check of the planted file: plain pickle does run it (so the tests mean it)."""
    pickle.loads(pickle.dumps(Evil(tmp_path / "PWNED")))
    assert (tmp_path / "PWNED").exists()


# =============================================================================================
# Issue 27: results that were silently wrong, tracebacks, odd data. Each bad input is one line
# naming the field or file (the harness above); inputs that are fine but odd are handled right.


def _matrix_with(tmp: Path, lines: str) -> str:
    """The one-cell matrix of ``_matrix_file`` with more [matrix] lines (axes, seeds)."""
    body = SEARCH.split("[model]", 1)[1]
    text = f'[matrix]\nname = "m"\nmodels = ["tnt_nano"]\n{lines}\n[model]{body}'
    return str(_write(tmp / "m.toml", text))


def _space(tmp: Path, spec: str) -> str:
    """The search file with its one space line replaced by ``spec`` (TOML lines)."""
    return _search_file(tmp, **{'"model.inner_heads" = { choices = [1, 2] }': spec})


def _deleted_experiment(tmp: Path, uri: str) -> str:
    """A new experiment of the store, deleted; its name (one per test: the store is shared)."""
    name = f"gone-{tmp.name}"
    client = mlflow.MlflowClient(uri)
    client.delete_experiment(client.create_experiment(name))
    return name


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    import struct
    import zlib

    out = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        crc = zlib.crc32(kind + data)
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    return out


def _bomb_png(side: int = 30000) -> bytes:
    """A PNG that claims side x side pixels (900 M: past twice PIL's limit) in a few bytes."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return _png([(b"IHDR", header), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])


def _imagefolder_with(tmp: Path, name: bytes, data: bytes) -> Path:
    """A small valid ImageFolder, plus ``data`` written as train/a/<name> (bytes: any name)."""
    from PIL import Image

    root = tmp / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 40, 0)).save(d / f"{i}.png")
    with open(os.fsencode(root / "train" / "a") + b"/" + name, "wb") as f:
        f.write(data)
    return root


def _imagefolder_train(t: Path, u: str, root: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--tracking-uri",
        u,
        *TRAIN,
        "--set",
        "data.name='imagefolder'",
        "--set",
        f"data.root='{root}'",
        "--set",
        f"train.out_dir='{t}/runs'",
        *extra,
    ]


def _folder(path: Path) -> str:
    path.mkdir(parents=True)
    return str(path)


def _sys_path() -> str:
    """A path even root cannot write (sysfs); the cases using it check that it is so."""
    return "/sys/tntbench-test/o.journal"


def _train_set(setting: str):
    """``tntbench train --set SETTING``: a bad value refused before any work."""
    return lambda t, u, r, c: ["train", "--set", setting]


def _matrix_case(lines: str | None, *args: str):
    """``tntbench matrix`` of the one-cell matrix (``lines``: more [matrix] lines; None: the
    file as it is) with ``args``, on the store."""

    def argv(t, u, r, c):
        path = _matrix_file(t) if lines is None else _matrix_with(t, lines)
        return ["matrix", path, *args, "--tracking-uri", u]

    return argv


def _search_case(make_file=_search_file, *args: str):
    """``tntbench search`` of ``make_file(tmp)`` (the tiny search by default) with ``args``."""
    return lambda t, u, r, c: ["search", make_file(t), *args, "--tracking-uri", u]


def _search_space(spec: str):
    """``tntbench search`` with the space line replaced by ``spec``."""
    return _search_case(lambda t: _space(t, spec))


def _search_line(line: str):
    """``tntbench search`` with ``line`` added to [search]."""
    return _search_case(lambda t: _search_file(t, **{"n_trials = 2": f"n_trials = 2\n{line}"}))


def _storage_case(command: str, storage):
    """``tntbench matrix`` or ``search`` of its tiny file with ``--storage storage(tmp, uri)``."""
    make_file = {"matrix": _matrix_file, "search": _search_file}[command]

    def argv(t, u, r, c):
        path = make_file(t)
        return [command, path, "--storage", storage(t, u), "--tracking-uri", u]

    return argv


# (id, argv builder, words the one line must contain), as CASES above
ISSUE27_CASES = [
    # --- A: results silently wrong
    ("matrix-duplicate-seeds", _matrix_case("seeds = [0, 0]"), ["matrix.seeds", "twice"]),
    (
        "matrix-duplicate-axis-value",
        _matrix_case('"model.inner_heads" = [1, 2, 1]'),
        ["matrix.model.inner_heads", "twice"],
    ),
    (
        "matrix-duplicate-models",
        _matrix_case("", "--set", "matrix.models=['tnt_nano', 'tnt_nano']"),
        ["matrix.models", "twice"],
    ),
    (
        "matrix-set-model-name",
        _matrix_case(None, "--set", "model.name='vit_nano'"),
        ["model.name", "matrix.models"],
    ),
    (
        "matrix-set-train-seed",
        _matrix_case(None, "--set", "train.seed=3"),
        ["train.seed", "matrix.seeds"],
    ),
    (
        "matrix-model-name-axis",
        _matrix_case('"model.name" = ["vit_nano", "tnt_nano"]'),
        ["model.name", "matrix.models"],
    ),
    (
        "matrix-model-name-in-tied-axis",
        _matrix_case('pair = [{ "model.name" = "vit_nano", "model.depth" = 1 }]'),
        ["matrix.pair", "model.name"],
    ),
    (
        "search-gmacs-budget-negative",
        _search_line("gmacs_budget = -1"),
        ["search.gmacs_budget", ">= 0"],
    ),
    ("search-timeout-nan", _search_case(_search_file, "--timeout", "nan"), ["--timeout"]),
    ("search-timeout-negative", _search_case(_search_file, "--timeout", "-5"), ["--timeout"]),
    ("model-drop-rate-nan", _train_set("model.drop_rate=nan"), ["drop_rate"]),
    ("model-mlp-ratio-inf", _train_set("model.mlp_ratio=inf"), ["mlp_ratio", "finite"]),
    ("model-drop-path-nan", _train_set("model.drop_path_rate=nan"), ["drop_path_rate", "finite"]),
    (
        "model-inner-mlp-ratio-inf",
        _train_set("model.inner_mlp_ratio=inf"),
        ["inner_mlp_ratio", "finite"],
    ),
    (
        "train-deleted-experiment",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            f"tracking.experiment='{_deleted_experiment(t, u)}'",
            "--set",
            f"train.out_dir='{t}/runs'",
        ],
        ["deleted", "restore", "tracking.experiment"],
    ),
    (
        "resume-into-another-experiment",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "tracking.experiment='elsewhere'",
            "--resume",
            r,
        ],
        ["--resume", "experiment", "elsewhere"],
    ),
    (
        "resume-with-other-params",
        lambda t, u, r, c: [
            "train",
            "--tracking-uri",
            u,
            *TRAIN,
            "--set",
            "data.train_size=96",
            "--resume",
            r,
        ],
        ["--resume", "data.train_size", "96"],
    ),
    # --- B: one line, not a traceback
    (
        "storage-parent-is-a-file",
        _storage_case("matrix", lambda t, u: f"{_write(t / 'f', 'x')}/o.journal"),
        ["--storage", "cannot write"],
    ),
    (
        "storage-sqlite-parent-is-a-file",
        _storage_case("search", lambda t, u: f"sqlite:///{_write(t / 'f', 'x')}/o.db"),
        ["--storage", "cannot write"],
    ),
    (
        "storage-read-only",
        _storage_case("search", lambda t, u: _sys_path()),
        ["--storage", "/sys/tntbench-test"],
    ),
    (
        "storage-journal-without-path",
        _storage_case("search", lambda t, u: "journal:"),
        ["--storage", "journal:"],
    ),
    (
        "storage-is-a-folder",
        _storage_case("matrix", lambda t, u: _folder(t / "q.journal")),
        ["--storage", "q.journal", "folder"],
    ),
    (
        "search-storage-is-the-mlflow-store",
        _storage_case("search", lambda t, u: u),
        ["--storage", "MLflow tracking store"],
    ),
    (
        "matrix-storage-is-the-mlflow-store",
        _storage_case("matrix", lambda t, u: u),
        ["--storage", "MLflow tracking store"],
    ),
    ("train-seed-past-int64", _train_set(f"train.seed={2**70}"), ["train.seed", "0.."]),
    ("data-seed-negative", _train_set("data.seed=-1"), ["data.seed"]),
    ("epochs-past-int64", _train_set(f"train.epochs={2**64}"), ["train.epochs", "64-bit"]),
    ("matrix-seed-out-of-range", _matrix_case(f"seeds = [{2**40}]"), ["matrix.seeds"]),
    (
        "search-log-range-from-zero",
        _search_space('"train.lr" = { low = 0, high = 0.1, log = true }'),
        ["search.space.train.lr", "log"],
    ),
    (
        "search-high-inf",
        _search_space('"train.lr" = { low = 0.001, high = inf }'),
        ["search.space.train.lr.high", "finite"],
    ),
    (
        "search-low-above-high",
        _search_space('"train.lr" = { low = 0.1, high = 0.01 }'),
        ["search.space.train.lr", "low"],
    ),
    ("search-seed-negative", _search_line("seed = -1"), ["search.seed"]),
    (
        "search-tie-to-unsearched-key",
        _search_space('"model.inner_dim" = { tie = "model.pixel_size", keep = "pixels_x_dim" }'),
        ["search.space.model.inner_dim", "model.pixel_size"],
    ),
    ("model-depth-huge", _train_set("model.depth=100000000"), ["depth", "at most"]),
    ("model-absurd-size", _train_set("model.embed_dim=60000"), ["parameters"]),
    (
        "models-command-depth-huge",
        lambda t, u, r, c: ["models", "tnt_nano", "--set", "depth=100000000"],
        ["depth"],
    ),
    # --- C: odd data
    (
        "imagefolder-decompression-bomb",
        lambda t, u, r, c: _imagefolder_train(t, u, _imagefolder_with(t, b"bomb.png", _bomb_png())),
        ["bomb.png", "decompression bomb"],
    ),
    (
        "imagefolder-non-utf8-name",
        lambda t, u, r, c: _imagefolder_train(t, u, _imagefolder_with(t, b"bad\xff.png", b"junk")),
        ["bad\\xff.png"],
    ),
]


@pytest.mark.parametrize(
    ("case", "argv", "words"), ISSUE27_CASES, ids=[c[0] for c in ISSUE27_CASES]
)
def test_issue27_bad_input_is_one_line(case, argv, words, store, tmp_path, capsys, monkeypatch):
    if case == "storage-read-only" and os.access("/sys", os.W_OK) and _sys_writable():
        pytest.skip("/sys is writable here")
    test_bad_input_is_one_line_and_harms_nothing(
        case, argv, words, store, tmp_path, capsys, monkeypatch
    )


def _sys_writable() -> bool:
    try:
        Path("/sys/tntbench-test").mkdir()
    except OSError:
        return False
    Path("/sys/tntbench-test").rmdir()
    return True


# --- A: handled right instead of refused


def _tiny_matrix(tmp: Path) -> str:
    return _matrix_file(tmp)


def test_issue27_edited_matrix_runs_new_cells_and_summarises_only_them(tmp_path, capsys):
    """train.epochs 1 -> 2: a new cell (run, not skipped), and the summary has n 1, not the
    old and new runs pooled as two seeds; the old run is named as left out."""
    from suite.studies.matrix import run_matrix
    from suite.tracking import make_tracker

    tracker = make_tracker(f"sqlite:///{tmp_path}/mlflow.db")
    path = _tiny_matrix(tmp_path)
    sets = [f"train.out_dir='{tmp_path}/runs'"]
    first = run_matrix(path, tracker, sets, progress=False, profile_steps=1)
    assert (first.ran, first.skipped, list(first.summary["n"])) == (1, 0, [1])
    capsys.readouterr()
    edited = run_matrix(path, tracker, [*sets, "train.epochs=2"], progress=False, profile_steps=1)
    assert (edited.ran, edited.skipped) == (1, 0)
    assert list(edited.summary["n"]) == [1]
    assert edited.summary["run_ids"].iloc[0] != first.summary["run_ids"].iloc[0]
    assert "1 finished run(s) of an earlier config" in capsys.readouterr().err
    again = run_matrix(path, tracker, [*sets, "train.epochs=2"], progress=False, profile_steps=1)
    assert (again.ran, again.skipped, list(again.summary["n"])) == (0, 1, [1])


def test_issue27_grid_search_stops_at_the_grid_size(tmp_path, capsys):
    """A grid of 2 points with n_trials = 5: 2 trials, no duplicates, and a note."""
    from suite.studies.search import run_search

    text = SEARCH.replace("n_trials = 2", 'n_trials = 5\nsampler = "grid"')
    text = text.replace("[train]", f"[train]\nout_dir = '{tmp_path}/runs'")
    path = _write(tmp_path / "grid.toml", text)
    r = run_search(
        path, storage=f"sqlite:///{tmp_path}/o.db", tracking_uri=f"sqlite:///{tmp_path}/m.db"
    )
    trials = r.study.get_trials()
    assert sorted(t.params["model.inner_heads"] for t in trials) == [1, 2]
    assert "the grid has 2 point(s); n_trials 5 lowered to 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("workers", "cells", "cuda", "want"),
    [(16, 2, False, 2), (16, 9, False, 2), (2, 9, False, 2), (1, 0, False, 1), (4, 2, True, 2)],
    ids=["more-than-cells", "more-than-cores", "fits", "nothing-left", "cuda-cells-only"],
)
def test_issue27_matrix_workers_clamped_with_a_note(
    workers, cells, cuda, want, monkeypatch, capsys
):
    from suite import runtime

    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    assert runtime.clamp_workers(workers, cells, 0, cuda) == want
    err = capsys.readouterr().err
    if want < workers:
        assert err.count("\n") == 1 and f"--workers {workers} lowered to {want}" in err
    else:
        assert err == ""


def test_issue27_deleted_experiment_stays_deleted(store, tmp_path, capsys):
    uri = store[0]
    name = _deleted_experiment(tmp_path, uri)
    argv = ["train", "--tracking-uri", uri, *TRAIN, "--set", f"tracking.experiment='{name}'"]
    assert main([*argv, "--set", f"train.out_dir='{tmp_path}/runs'"]) == 2
    exp = mlflow.MlflowClient(uri).get_experiment_by_name(name)
    assert exp.lifecycle_stage == "deleted"
    assert not mlflow.MlflowClient(uri).search_runs([exp.experiment_id], run_view_type=3)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"),
        MemoryError(),
    ],
    ids=["torch-cpu-allocator", "memory-error"],
)
def test_issue27_cpu_out_of_memory_is_one_line_and_run_failed(
    error, store, tmp_path, capsys, monkeypatch
):
    import suite.training.fit as fit_module

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(fit_module, "train_one_epoch", out_of_memory)
    uri = store[0]
    experiment = f"oom-{tmp_path.name}"
    argv = ["train", "--tracking-uri", uri, *TRAIN, "--set", f"tracking.experiment='{experiment}'"]
    capsys.readouterr()
    assert main([*argv, "--set", f"train.out_dir='{tmp_path}/runs'"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "train.batch_size = 32" in err and "lower train.batch_size" in err
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"


def test_issue27_other_runtime_errors_are_not_called_out_of_memory(monkeypatch):
    from suite.training.fit import is_cpu_oom

    assert is_cpu_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert not is_cpu_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# --- C: odd images, made here with PIL and numpy


def _folder_of(tmp: Path, per_class: int = 3) -> Path:
    from PIL import Image

    root = tmp / "split"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("mode", "value", "want"),
    [("I;16", 30000, 117), ("I;16", 65535, 255), ("I;16", 0, 0), ("I", 30000, 117)],
    ids=["I16-grey", "I16-white", "I16-black", "I-grey"],
)
def test_issue27_16bit_grey_png_scales_to_8bit(mode, value, want, tmp_path):
    import numpy as np
    from PIL import Image

    from suite.training.data import rgb_loader, to_rgb

    img = Image.fromarray(np.full((4, 4), value, np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    if mode == "I;16":  # a real 16-bit PNG file, through the loader
        img.save(tmp_path / "g.png")
        out = np.asarray(rgb_loader(str(tmp_path / "g.png")))
    else:  # PIL writes no 32-bit PNG: the conversion alone
        out = np.asarray(to_rgb(img))
    assert out.shape == (4, 4, 3) and (out == want).all(), out[0, 0]


def test_issue27_palette_transparency_becomes_white_not_its_hidden_colour(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from suite.training.data import rgb_loader

    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    la = Image.fromarray(np.stack([np.full((4, 4), 20, np.uint8), np.zeros((4, 4), np.uint8)], -1))
    la.save(tmp_path / "la.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency" warning too
        out = np.asarray(rgb_loader(str(tmp_path / "p.png")))
        clear = np.asarray(rgb_loader(str(tmp_path / "la.png")))
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque: its own colour
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent: white, not the hidden red
    assert (clear == 255).all()


@pytest.mark.parametrize(
    ("links", "images", "note"),
    [
        # a/up -> split: back into listed folders; a/up/b is b listed again under class a, once
        ({"a/up": "..", "b/self": "."}, 6 + 3, "loop"),
        ({"a/again": ".", "b/again": "."}, 6, "skipped 2 directory links"),
    ],
    ids=["loop-listed-once", "link-to-itself-keeps-six"],
)
def test_issue27_directory_symlinks_never_loop(links, images, note, tmp_path, capsys):
    from suite.training.data import CheckedImageFolder

    root = _folder_of(tmp_path)  # 2 classes of 3 images
    for link, target in links.items():
        os.symlink(target, root / link)
    ds = CheckedImageFolder(str(root), None, skip_bad=False)
    assert len(ds) == images
    assert note in capsys.readouterr().err


def test_issue27_fifo_and_socket_are_skipped_and_counted(tmp_path, capsys):
    import socket

    from suite.training.data import CheckedImageFolder

    root = _folder_of(tmp_path)
    os.mkfifo(root / "a" / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "b" / "s.png"))
    except OSError:  # a path too long for a socket here: the FIFO alone
        sock.close()
        sock = None
    ds = CheckedImageFolder(str(root), None, skip_bad=False)
    want = 2 if sock else 1
    assert len(ds) == 6 and len(ds.not_regular) == want
    assert f"skipped {want} entries that are not regular files" in capsys.readouterr().err
    for i in range(len(ds)):  # every item loads (a FIFO in the list would block forever)
        ds[i]
    if sock:
        sock.close()


def test_issue27_decompression_bomb_skipped_when_asked(tmp_path, capsys):
    from suite.training.data import CheckedImageFolder

    root = _folder_of(tmp_path)
    _write(root / "a" / "bomb.png", _bomb_png())
    ds = CheckedImageFolder(str(root), None, skip_bad=True)
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 7 and ds.skipped == {str(root / "a" / "bomb.png")}
    assert "bomb.png" in capsys.readouterr().err


def test_issue27_image_over_the_warning_limit_is_refused(tmp_path, monkeypatch):
    """Between PIL's limit and twice it, PIL only warns and decodes: refused here too."""
    from PIL import Image

    from suite.errors import UserError
    from suite.training.data import CheckedImageFolder

    root = _folder_of(tmp_path)
    Image.new("RGB", (10, 10)).save(root / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)  # the 8x8 images fit, 10x10 does not
    ds = CheckedImageFolder(str(root), None, skip_bad=False)
    with pytest.raises(UserError, match="big.png"):
        [ds[i] for i in range(len(ds))]


def test_issue27_non_utf8_names_train_and_are_tagged_safely(store, tmp_path, capsys):
    """A good image and a broken one with names that are not UTF-8: the run trains (the
    digest reads the names as bytes), the skipped one is named with \\x escapes."""
    from PIL import Image

    root = _imagefolder_with(tmp_path, b"bad\xff.png", b"junk")
    good = os.fsencode(root / "train" / "b") + b"/caf\xe9.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(good, format="PNG")
    uri = store[0]
    experiment = f"utf-{tmp_path.name}"
    argv = _imagefolder_train(tmp_path, uri, root, "--set", f"tracking.experiment='{experiment}'")
    capsys.readouterr()
    assert main([*argv, "--set", "data.skip_bad_images=true"]) == 0
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "bad\\xff.png" in err
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    ("sets", "same"),
    [
        (["data.hflip=true"], True),  # a default spelt out: the same cell
        ([], True),
        (["data.hflip=false"], False),
        (["train.epochs=2"], False),
        (["model.inner_heads=2"], False),
    ],
    ids=["default-spelt-out", "nothing-set", "hflip-off", "epochs-edited", "model-knob"],
)
def test_issue27_cell_hash_is_the_resolved_config(sets, same, tmp_path):
    from suite.studies.matrix import expand

    path = _matrix_file(tmp_path)
    (before,) = expand(path)[2]
    (after,) = expand(path, sets)[2]
    assert (before.digest == after.digest) is same


@pytest.mark.parametrize(
    ("storage", "tracking", "refused"),
    [
        ("postgresql+psycopg://u@h/db", "postgresql://u@h/db", True),
        ("sqlite:///{t}/m.db?timeout=5", "sqlite:///{t}/m.db", True),
        ("journal:{t}/m.db", "sqlite:///{t}/./m.db", True),
        ("sqlite:///{t}/o.db", "sqlite:///{t}/m.db", False),
        ("postgresql+psycopg://u@h/optuna", "postgresql://u@h/mlflow", False),
        ("sqlite:///{t}/o.db", "http://127.0.0.1:5000", False),
    ],
    ids=[
        "pg-driver-spelt-twice",
        "sqlite-options",
        "journal-on-the-db",
        "two-files",
        "two-dbs",
        "server",
    ],
)
def test_issue27_storage_must_not_be_the_tracking_store(storage, tracking, refused, tmp_path):
    from suite.errors import UserError
    from suite.studies.storage import check_not_tracking_store

    storage, tracking = storage.format(t=tmp_path), tracking.format(t=tmp_path)
    if refused:
        with pytest.raises(UserError, match="MLflow tracking store"):
            check_not_tracking_store(storage, tracking)
    else:
        check_not_tracking_store(storage, tracking)


def test_issue27_search_workers_clamped_to_trials(tmp_path, capsys, monkeypatch):
    """--workers 4 for a 2-trial search on 2 cores: 2 workers, and a note saying so."""
    from suite import runtime
    from suite.studies import search

    monkeypatch.setattr(runtime, "cpu_cores", lambda: 8)
    started = []
    monkeypatch.setattr(search, "_run_workers", lambda args, n: started.append(n))
    text = SEARCH.replace("[train]", f"[train]\nout_dir = '{tmp_path}/runs'")
    path = _write(tmp_path / "s.toml", text)
    search.run_search(path, workers=4, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert started == [2]
    assert "note: search: --workers 4 lowered to 2 (2 trial(s) to run" in capsys.readouterr().err
