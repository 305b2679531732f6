"""``tntbench demo``: the first thing a new user runs, end to end, into a fresh local store."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from suite.errors import UserError
from suite.studies.matrix import format_summary, run_matrix
from suite.studies.search import format_search, run_search
from suite.tracking import make_tracker, param_col

# the smallest settings that still run every stage (matrix, search, viz, report): tests
TINY_SETS = [
    "data.train_size=128",
    "data.val_size=64",
    "train.epochs=1",
    "train.batch_size=32",
    "tracking.system_metrics=false",
    "model.depth=1",
    "matrix.seeds=[0]",
]
TINY_SEARCH_SETS = ["search.n_trials=2"]


def smoke_config() -> Path:
    """The smoke matrix shipped inside the package (experiments/smoke.toml)."""
    return Path(str(resources.files("suite.experiments") / "smoke.toml"))


def search_config() -> Path:
    return Path(str(resources.files("suite.experiments") / "search_pixel_patch.toml"))


def run_demo(
    out: str | None = None, sets: list[str] | None = None, search_sets: list[str] | None = None
) -> int:
    root = Path(out or "tntbench-demo").resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root}: is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {root}: cannot create it ({e.strerror or e})") from None
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = make_tracker(uri)
    t0 = time.perf_counter()
    print(
        f"TNT Bench demo: smoke matrix (nano TNT, ViT, DeiT on synthetic data), a small search,"
        f" into {root}"
    )
    r = run_matrix(smoke_config(), tracker, [f"train.out_dir='{root / 'runs'}'", *(sets or [])])
    print(
        f"\nmatrix {r.name}: {r.ran} ran, {r.skipped} skipped, {r.failed} failed "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    print(format_summary(r.summary))

    print("\nsmall search: TPE + median pruner over patch, pixel, inner heads and lr (6 trials)")
    s_sets = [f"train.out_dir='{root / 'runs'}'", "search.n_trials=6", "train.epochs=2"]
    s = run_search(
        search_config(), [*s_sets, *(sets or []), *(search_sets or [])], tracking_uri=uri
    )
    print(format_search(s))

    # the paper's feature figures: TNT's pixel-level maps and t-SNE beside ViT's (seed 0)
    from suite.outputs.viz import VizOptions, format_viz, run_viz

    names = r.runs.get(param_col("model.name"))
    pick = []
    for m in ("tnt_nano", "vit_nano"):
        if names is not None and (names == m).any():
            pick.append(r.runs.loc[names == m, "run_id"].iloc[0])
    if len(pick) == 2:
        print("\nfeature maps and t-SNE: tnt_nano against vit_nano")
        print(format_viz(run_viz(tracker, pick, VizOptions(n_images=48), out=root / "viz")))

    from suite.outputs.report import build_report

    rep = build_report(tracker, out=root / "report")
    print(f"\nreport:       {rep.out / 'report.html'}  (md, csv, tex, png beside it)")
    print(f"\nresults:      {root}  (MLflow store {uri}, checkpoints {root / 'runs'})")
    print(f"open the UI:  tntbench ui --tracking-uri {uri}")
    return min(r.failed, 100)
