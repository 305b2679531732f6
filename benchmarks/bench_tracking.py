"""What MLflow tracking costs: the same short training with tracking on and off, alternating.

Each repetition trains tnt_nano on the synthetic data once with a fresh MLflow run in a
throw-away SQLite store (params, tags, dataset, per-step and per-epoch metrics, system metrics,
config, learning-curve PNG, best checkpoint) and once untracked. Prints median wall times and
the overhead; the target is under 2%.

    python benchmarks/bench_tracking.py [--reps 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from suite.config import load_config
from suite.tracking import Tracker, make_tracker
from suite.training.fit import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="tnt_nano")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    cfg = load_config(
        None,
        [
            f"model.name='{args.model}'",
            f"train.epochs={args.epochs}",
            "train.amp='fp32'",
            f"train.out_dir='{tmp / 'runs'}'",
            "tracking.experiment='bench_tracking'",
        ],
    )
    tracker = make_tracker(f"sqlite:///{tmp / 'mlflow.db'}")
    fit(cfg, Tracker(), progress=False)  # warm-up: imports, allocator, first-run costs
    walls: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(args.reps):
        order = ("on", "off") if rep % 2 else ("off", "on")
        for mode in order:
            t0 = time.perf_counter()
            fit(cfg, tracker if mode == "on" else Tracker(), progress=False)
            walls[mode].append(time.perf_counter() - t0)
    off, on = statistics.median(walls["off"]), statistics.median(walls["on"])
    print(f"{args.model}, {args.epochs} epochs x {cfg.data.train_size} images, {args.reps} reps")
    print(f"untracked  median {off:7.2f} s   {[round(w, 2) for w in walls['off']]}")
    print(f"tracked    median {on:7.2f} s   {[round(w, 2) for w in walls['on']]}")
    print(f"tracking overhead {100 * (on - off) / off:+.2f}% of wall time (target < 2%)")


if __name__ == "__main__":
    main()
