"""What ``--workers 2`` buys: the same nano matrix in one process and over two workers.

Both run a fresh copy of a 6-cell matrix (tnt/vit/deit nano x 2 seeds, synthetic data) into
their own SQLite store, as the user would: ``tntbench matrix M.toml`` against ``tntbench
matrix M.toml --workers 2`` (a journal-file queue; each worker gets half the cores). Wall time
includes everything the command does (start, store, queue, summary). Target (issue 17): two
workers take at most 0.7x the time of one process, on a machine with at least 2 free cores.

    python benchmarks/bench_matrix_workers.py [--epochs 2] [--train-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
# Question: how much faster are 2 workers than 1? Run: benchmarks/bench_matrix_workers.py
[matrix]
name = "bench"
models = ["tnt_nano", "vit_nano", "deit_nano"]
seeds = [0, 1]
[model]
depth = 2
[data]
train_size = {train_size}
val_size = 128
[train]
epochs = {epochs}
batch_size = 64
amp = "fp32"
device = "cpu"
out_dir = "{tmp}/runs"
[tracking]
system_metrics = false
"""
TARGET = 0.7


def timed(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "suite", *argv], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"6 cells, {args.epochs} epochs of {args.train_size} images each; {cores} cores")
    times = {}
    for label, extra in (("1 process", []), ("2 workers", ["--workers", "2"])):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            cfg = tmp / "m.toml"
            cfg.write_text(CONFIG.format(tmp=tmp, epochs=args.epochs, train_size=args.train_size))
            argv = ["matrix", str(cfg), "--tracking-uri", f"sqlite:///{tmp}/m.db", *extra]
            times[label] = timed([*argv, "--no-progress"], tmp)
        print(f"{label:10s} {times[label]:7.1f} s")
    ratio = times["2 workers"] / times["1 process"]
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(f"2 workers / 1 process = {ratio:.2f}  (target <= {TARGET}: {verdict})")
    if args.json:
        figures = {"cores": cores, "epochs": args.epochs, "train_size": args.train_size}
        figures.update(wall_s=times, ratio=ratio, target=TARGET)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
