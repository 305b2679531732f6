"""What the median pruner saves: the same TPE search on synthetic data with and without it.

Both searches sample the same space with the same seed (nano TNT: lr over two decades, inner
heads, depth); the pruner compares each trial's per-epoch val top-1 with the median of earlier
trials at that epoch. Prints trials pruned and epochs trained for both; the target is at least a
third of the trials pruned and at least 30% fewer epochs.

    python benchmarks/bench_search_pruning.py [--trials 12] [--epochs 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from suite.studies.search import run_search

CONFIG = """
[search]
study = "{study}"
sampler = "tpe"
pruner = "{pruner}"
n_trials = {trials}
seed = 0
[search.space]
"train.lr" = {{ low = 1e-5, high = 3e-3, log = true }}
"model.inner_heads" = {{ choices = [1, 2, 4] }}
"model.depth" = {{ low = 2, high = 6 }}
[model]
name = "tnt_nano"
[data]
train_size = 1000
val_size = 300
[train]
epochs = {epochs}
batch_size = 64
amp = "fp32"
out_dir = "{tmp}/runs"
[tracking]
experiment = "bench_search_pruning"
system_metrics = false
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    results = {}
    for pruner in ("none", "median"):
        cfg = tmp / f"{pruner}.toml"
        cfg.write_text(
            CONFIG.format(
                study=pruner, pruner=pruner, trials=args.trials, epochs=args.epochs, tmp=tmp
            )
        )
        t0 = time.perf_counter()
        r = run_search(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
        wall = time.perf_counter() - t0
        trials = r.study.get_trials(deepcopy=False)
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        epochs = sum(
            args.epochs if t.state == TrialState.COMPLETE else t.user_attrs.get("pruned_epoch", 0)
            for t in trials
        )
        best = r.study.best_value
        results[pruner] = (len(trials), len(pruned), epochs, best, wall)
        print(
            f"pruner={pruner:6s} trials {len(trials)}  pruned {len(pruned)}  epochs trained "
            f"{epochs}/{len(trials) * args.epochs}  best val top-1 {best:.1f}  {wall:.0f}s"
        )
    n, p, e, _, _ = results["median"]
    e0 = results["none"][2]
    print(
        f"median pruner: {p / n:.0%} of trials pruned (target >= 33%), "
        f"{1 - e / e0:.0%} fewer epochs than without pruning (target >= 30%)"
    )


if __name__ == "__main__":
    main()
