"""benchmarks/gpu_check.sh works (its CPU smoke run, as CI can prove it), and the wheelhouse
check catches what the GPU image would lack."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "bench_tnt_speed",
    "profile_step",
    "matrix_workers",
    "train",
    "profile_train",
    "profile_infer",
    "bench_data",
    "cuda_tests",
]


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    cmd = [
        "bash",
        str(ROOT / "benchmarks/gpu_check.sh"),
        "--device",
        "cpu",
        "--smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS and all(s[1] == "0" for s in steps)
    bench = json.loads((out / "bench_tnt_speed.json").read_text())
    assert {"ours tnt compiled", "timm tnt"} <= set(bench["img_per_s"]["train bf16"])
    assert bench["targets"] == {}  # tiny models: the targets are about TNT-S at 224
    for mode in ("train", "infer"):
        rows = json.loads((out / f"profile_{mode}.json").read_text())
        assert [r["model"] for r in rows] == ["tnt_nano", "deit_nano"]
        assert all(r["mfu"] > 0 and r["mode"] == mode for r in rows)
    workers = json.loads((out / "matrix_workers.json").read_text())
    assert set(workers["wall_s"]) == {"1 process", "2 workers"} and workers["ratio"] > 0
    train = json.loads((out / "train.json").read_text())
    assert train["status"] == "FINISHED" and [e["epoch"] for e in train["epochs"]] == [1, 2]
    assert train["tags"]["compile"] == "eager"  # train.compile = auto on CPU
    data = json.loads((out / "bench_data.json").read_text())
    assert data["ratios"]["deit recipe per core: new / today"] > 0 and data["device"] == "cpu"
    readme = (out / "README.md").read_text()
    assert all(f"| {s} | ok |" in readme for s in STEPS)
    assert "ours/timm TNT-S" in readme and "tnt_nano" in readme
    assert "deit recipe per core: new / today" in readme
    assert "System metrics logged by MLflow" in readme  # MLflow samples them every 5 s


def test_gpu_check_refuses_bad_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--device must be cuda or cpu" in proc.stderr


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheelhouse_check_finds_missing_and_mismatched_requirements(tmp_path):
    image = tmp_path / "image.txt"
    image.write_text("# the image\nnumpy\ntyping_extensions\n")
    good = tmp_path / "good"
    good.mkdir()
    _wheel(
        good,
        "mlflow",
        "3.0",
        ["numpy>=1", "alembic<2", "pywin32; sys_platform == 'win32'", "boto3; extra == 'aws'"],
    )
    _wheel(good, "alembic", "1.5", ["typing-extensions"])
    check = [sys.executable, str(ROOT / "benchmarks/check_wheelhouse.py")]
    ok = subprocess.run([*check, str(good), str(image)], capture_output=True, text=True)
    assert ok.returncode == 0 and "2 wheels" in ok.stdout and "OK" in ok.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "mlflow", "3.0", ["alembic>=2", "sqlparse"])
    _wheel(bad, "alembic", "1.5", [])
    proc = subprocess.run(
        [*check, str(bad), str(image), "--max-mib", "0"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "needs alembic>=2; the wheelhouse has ['1.5']" in proc.stderr
    assert "needs sqlparse: neither in the wheelhouse nor on the image" in proc.stderr
    assert "over the 0 MiB limit" in proc.stderr
