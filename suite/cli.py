"""The ``tntbench`` command: parse arguments and dispatch. Work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import suite
from suite.errors import (
    Terminated,
    UserError,
    first_line,
    parse_assignment,
    redact,
    sigterm_as_interrupt,
)

# ---------------------------------------------------------------------------------------------
# The commands: each one's work, then its parser (in the order --help lists them)


def _cmd_models(args: argparse.Namespace) -> int:
    from suite.models.summary import models_table

    overrides = dict(parse_assignment(s, "--set") for s in args.set)
    counted = bool(args.names) or args.gmacs
    table = models_table(args.names or None, overrides, _gmacs if counted else None)
    print(table.to_string(index=False))
    if not counted:
        print("(GMACs: name the models, or --gmacs for all; seconds each)", file=sys.stderr)
    return 0


def _gmacs(name: str, **overrides: Any) -> float:
    """fvcore GMACs of one image at the model's size; weights left uninitialised (the count
    does not depend on them), which saves most of the building time."""
    import torch

    from suite.models import create_model, model_img_size
    from suite.profile import count_flops

    with torch.device("meta"):
        model = create_model(name, **overrides)
    model = model.to_empty(device="cpu")
    return count_flops(model, model_img_size(name, overrides)).gmacs_fvcore


def _models_parser(sub: Any) -> None:
    m = sub.add_parser("models", help="list the model registry with paper reference values")
    m.add_argument("names", nargs="*", metavar="MODEL", help="models to show (default: all)")
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a constructor argument, e.g. --set inner_heads=2",
    )
    m.add_argument(
        "--gmacs",
        action="store_true",
        help="count GMACs (fvcore) for every model too; the models named are always counted",
    )
    m.set_defaults(func=_cmd_models)


def _cmd_train(args: argparse.Namespace) -> int:
    from suite.config import load_config
    from suite.models import check_model_config
    from suite.tracking import make_tracker
    from suite.training.engine import NonFiniteLoss
    from suite.training.fit import dist_env, fit

    cfg = load_config(args.config, args.set)
    check_model_config(cfg.model.name, cfg.model.overrides)
    uri = args.tracking_uri or cfg.tracking.uri or None
    # under torchrun only rank 0 records (the others only look up, e.g. the run to resume)
    tracker = make_tracker(uri, enabled=cfg.tracking.enabled, rank=dist_env()[0])
    try:
        result = fit(cfg, tracker, resume=args.resume)
    except NonFiniteLoss as e:  # the run is recorded FAILED with the error as a tag
        raise UserError(f"the run diverged ({e}): lower train.lr or set train.clip_grad") from None
    if dist_env()[0] == 0:
        m = result.metrics
        print(f"run {result.run_id or '(untracked)'}  checkpoints {result.checkpoint_dir}")
        print(
            f"val_top1 {m.get('val_top1', float('nan')):.2f}  "
            f"val_top5 {m.get('val_top5', float('nan')):.2f}  "
            f"val_loss {m.get('val_loss', float('nan')):.4f}  "
            f"best_val_top1 {result.best_top1:.2f}  "
            f"params {m['params_m']:.2f}M  GMACs {m['gmacs']:.3f}"
        )
        if tracker.uri:
            shown = redact(tracker.uri)
            print(f"tracking: {shown}  (tntbench ui --tracking-uri {shown})")
    return 0


def _train_parser(sub: Any) -> None:
    tr = sub.add_parser("train", help="train one model from a TOML config, tracked in MLflow")
    tr.add_argument("config", nargs="?", default=None, help="TOML config (default: built-in)")
    _add_set(tr)
    tr.add_argument("--resume", metavar="RUN_ID_OR_PATH", help="continue a run from its checkpoint")
    _add_tracking_uri(tr)
    tr.set_defaults(func=_cmd_train)


def _cmd_matrix(args: argparse.Namespace) -> int:
    if args.run_cell:  # a torchrun rank: first of all, never outlive its launcher
        from suite.procs import rank_dies_with_launcher

        rank_dies_with_launcher()
    from suite.studies.matrix import expand, format_summary, run_matrix
    from suite.studies.workers import run_one_cell, run_queued_matrix
    from suite.tracking import make_tracker

    if args.dry_run:
        return _matrix_dry_run(args)
    if args.run_cell:  # one cell in this process: what a worker starts under torchrun
        ok = run_one_cell(
            args.config,
            args.set,
            args.run_cell,
            tracking_uri=args.tracking_uri,
            parent_id=args.parent_run,
            continue_run=args.continue_run,
        )
        return 0 if ok else 1
    if args.workers < 1 or args.gpus_per_cell < 0:
        raise UserError(
            f"--workers must be >= 1 and --gpus-per-cell >= 0, got {args.workers} and "
            f"{args.gpus_per_cell}"
        )
    expand(args.config, args.set)  # a bad config or --set fails before the store is made
    tracker = make_tracker(args.tracking_uri)
    if args.status:
        return _matrix_status(args, tracker)
    if args.storage or args.workers > 1 or args.gpus_per_cell:
        r = run_queued_matrix(
            args.config,
            tracker,
            args.set,
            storage=args.storage,
            workers=args.workers,
            gpus_per_cell=args.gpus_per_cell,
        )
    else:
        r = run_matrix(args.config, tracker, args.set, progress=not args.no_progress)
    print(
        f"matrix {r.name}: {r.ran} ran, {r.skipped} skipped (already finished), {r.failed} failed"
    )
    print(format_summary(r.summary))
    print(f"parent run {r.parent_run_id}  tracking {redact(tracker.uri)}")
    return min(r.failed, 100)


def _matrix_dry_run(args: argparse.Namespace) -> int:
    """--dry-run: the matrix's cells."""
    from suite.studies.matrix import cells_table, expand

    name, _, cells, _ = expand(args.config, args.set)
    print(f"matrix {name}: {len(cells)} cells")
    print(cells_table(cells).to_string(index=False))
    return 0


def _matrix_status(args: argparse.Namespace, tracker: Any) -> int:
    """--status: each cell's state, and how many are in each."""
    from suite.studies.workers import count_states, status_table

    table = status_table(args.config, tracker, args.set, args.storage)
    print(table.to_string(index=False))
    print(count_states(table))
    return 0


def _matrix_parser(sub: Any) -> None:
    mx = sub.add_parser("matrix", help="run a benchmark matrix (models x datasets x seeds x ...)")
    mx.add_argument("config", help="TOML with a [matrix] table, e.g. experiments/smoke.toml")
    _add_set(mx)
    mx.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    _add_tracking_uri(mx)
    mx.add_argument("--no-progress", action="store_true", help="no progress bar over the cells")
    mx.add_argument(
        "--storage",
        metavar="URL",
        help="run the cells as a work queue in this Optuna storage (postgresql+psycopg://... "
        "shared by many machines, sqlite:///... or a .journal file on one); the same command "
        "on every machine shares the work",
    )
    mx.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine (CPU cores split between them; on CUDA one GPU "
        "group each); without --storage, a journal file beside the MLflow store",
    )
    mx.add_argument(
        "--gpus-per-cell",
        type=int,
        default=0,
        metavar="K",
        help="run each cell under torchrun (DDP) on K GPUs (K gloo processes on CPU)",
    )
    mx.add_argument(
        "--status",
        action="store_true",
        help="print each cell's state (waiting, running where and since when, finished, "
        "failed, todo) from MLflow and --storage, and exit",
    )
    # what a worker passes to the cell it starts under torchrun; not for users
    mx.add_argument("--run-cell", metavar="HASH", help=argparse.SUPPRESS)
    mx.add_argument("--parent-run", help=argparse.SUPPRESS)
    mx.add_argument("--continue-run", help=argparse.SUPPRESS)
    mx.set_defaults(func=_cmd_matrix)


def _cmd_search(args: argparse.Namespace) -> int:
    from suite.studies.search import format_search, run_search

    r = run_search(
        args.config,
        args.set,
        storage=args.storage,
        study_name=args.study,
        n_trials=args.n_trials,
        timeout=args.timeout,
        workers=args.workers,
        tracking_uri=args.tracking_uri,
    )
    print(format_search(r))
    return 0


def _search_parser(sub: Any) -> None:
    se = sub.add_parser("search", help="Optuna search over inner heads, patch/pixel size, ...")
    se.add_argument("config", help="TOML with [search] and [search.space] tables")
    _add_set(se)
    se.add_argument(
        "--storage", help="Optuna storage URL or .journal path (default: beside MLflow)"
    )
    se.add_argument("--study", help="study name (default: search.study)")
    se.add_argument(
        "--n-trials", type=int, help="finished trials wanted (default: search.n_trials)"
    )
    se.add_argument("--timeout", type=float, help="seconds per worker")
    se.add_argument("--workers", type=int, default=1, help="local worker processes on the study")
    _add_tracking_uri(se)
    se.set_defaults(func=_cmd_search)


def _cmd_report(args: argparse.Namespace) -> int:
    from suite.outputs.report import build_report
    from suite.tracking import make_tracker

    tracker = make_tracker(args.tracking_uri)
    what = ", ".join(args.experiment or ["all experiments"])
    print(
        f"report: reading runs of {what} from {redact(tracker.uri)} ...",
        file=sys.stderr,
        flush=True,
    )
    rep = build_report(tracker, args.experiment, args.matrix, args.study, args.out)
    print(f"report: wrote {rep.out.resolve()}", file=sys.stderr, flush=True)
    print(
        f"report: {rep.out.resolve()}  ({len(rep.tables)} tables, {len(rep.plots)} plots; "
        f"open {rep.out.resolve() / 'report.html'})"
    )
    print(f"logged as run {rep.run_id} in experiment 'reports' at {redact(tracker.uri)}")
    return 0


def _report_parser(sub: Any) -> None:
    rp = sub.add_parser("report", help="tables and plots from MLflow runs, the paper beside them")
    rp.add_argument("--experiment", action="append", help="experiment(s) to read (default: all)")
    rp.add_argument("--matrix", help="only this matrix's cells")
    rp.add_argument("--study", help="only this search study")
    rp.add_argument("--out", help="folder (default: reports/<timestamp>/)")
    _add_tracking_uri(rp)
    rp.set_defaults(func=_cmd_report)


def _cmd_viz(args: argparse.Namespace) -> int:
    from suite.outputs.viz import VizOptions, format_viz, run_viz
    from suite.tracking import make_tracker

    opts = VizOptions(
        n_images=args.images,
        layers=args.layers,
        channels=args.channels,
        n_maps=args.maps,
        device=args.device,
    )
    res = run_viz(make_tracker(args.tracking_uri), args.run_ids, opts, out=args.out)
    print(format_viz(res))
    return 0


def _viz_parser(sub: Any) -> None:
    vz = sub.add_parser("viz", help="feature maps and t-SNE of trained runs (TNT beside ViT)")
    vz.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run IDs of trainings")
    vz.add_argument("--images", type=int, default=64, help="validation images used (default 64)")
    vz.add_argument("--layers", help="layers, e.g. 1,6,12 (0: embeddings; default first/mid/last)")
    vz.add_argument("--channels", type=int, default=4, help="channels shown per map (default 4)")
    vz.add_argument("--maps", type=int, default=4, help="images given feature-map PNGs (default 4)")
    vz.add_argument("--out", help="folder for the PNGs (default reports/viz/<run ids>)")
    vz.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_tracking_uri(vz)
    vz.set_defaults(func=_cmd_viz)


def _cmd_ui(args: argparse.Namespace) -> int:
    from suite.tracking import serve_ui

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in 0..65535 (0: a free port)")
    return serve_ui(args.tracking_uri, args.port, jobs=args.jobs)


def _ui_parser(sub: Any) -> None:
    ui = sub.add_parser(
        "ui",
        help="serve the MLflow UI on the store (loopback)",
        description="Serve the MLflow UI (mlflow server, loopback) on a tracking store until "
        "Ctrl-C or SIGTERM. The store: --tracking-uri, else $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db in this folder (the one train, matrix and search write by default).",
    )
    _add_tracking_uri(ui)
    ui.add_argument("--port", type=int, default=0, help="default: a free port")
    ui.add_argument(
        "--jobs",
        action="store_true",
        help="run MLflow's job execution in the server (off by default: its job runner and "
        "workers take 8 more processes and ~1.8 GB, and slow the first search)",
    )
    ui.set_defaults(func=_cmd_ui)


def _cmd_demo(args: argparse.Namespace) -> int:
    from suite.demo import TINY_SEARCH_SETS, TINY_SETS, run_demo

    if args.tiny:
        return run_demo(args.out, TINY_SETS, TINY_SEARCH_SETS)
    return run_demo(args.out)


def _demo_parser(sub: Any) -> None:
    dm = sub.add_parser("demo", help="the built-in end-to-end job: smoke matrix into a fresh store")
    dm.add_argument("--out", default=None, help="folder for the store (default: ./tntbench-demo)")
    # every stage on the smallest settings, for tests (hidden)
    dm.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    dm.set_defaults(func=_cmd_demo)


def _cmd_profile(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from suite.profile import (
        ProfileOptions,
        format_table,
        log_profile_row,
        profile_models,
        uncounted_ops_lines,
    )

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    opts = ProfileOptions(
        img_size=args.img_size,
        batch_size=args.batch_size,
        mode=args.mode,
        dtype=args.dtype,
        compile=args.compile,
        warmup=args.warmup,
        steps=args.steps,
        repeat=args.repeat,
    )
    rows = profile_models(args.models, opts, device=args.device)
    print(format_table(rows))
    print("\n".join(uncounted_ops_lines(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
        print(f"wrote {args.json}")
    if args.log:
        from suite.tracking import make_tracker

        tracker = make_tracker(args.tracking_uri)
        for r in rows:
            log_profile_row(tracker, r)
        print(f"logged {len(rows)} run(s) to experiment 'profile' at {redact(tracker.uri)}")
    return 0


def _profile_parser(sub: Any) -> None:
    pr = sub.add_parser("profile", help="params, GMACs (fvcore), throughput, latency, memory, MFU")
    pr.add_argument("models", nargs="+", metavar="MODEL", help="registered model names")
    pr.add_argument("--img-size", type=int, help="input size (default: the model's)")
    pr.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 16 (224 px) or 64 on CPU")
    pr.add_argument(
        "--mode",
        choices=["infer", "train"],
        default="infer",
        help="infer: forward under inference_mode; train: forward, backward, SGD step",
    )
    pr.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="fp32, or autocast to bf16/fp16 (fp16: CUDA only)",
    )
    pr.add_argument(
        "--compile",
        nargs="?",
        const="true",
        default="false",
        metavar="MODE",
        choices=["auto", "true", "false", "regional"],
        help="torch.compile as train.compile does: bare --compile = whole model; auto = whole "
        "model on CUDA, eager on CPU; regional = each block (default: false, eager)",
    )
    pr.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present"
    )
    pr.add_argument("--warmup", type=int, help="warm-up steps (default: 10 GPU, 3 CPU)")
    pr.add_argument(
        "--steps",
        type=int,
        help="timed steps, at least: more until the window lasts 1 s (default: 40 GPU, 10 CPU)",
    )
    pr.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="time N independent windows: img/s is their median, min-max their spread",
    )
    pr.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    pr.add_argument("--log", action="store_true", help="record each row as an MLflow run")
    _add_tracking_uri(pr)
    pr.set_defaults(func=_cmd_profile)


# ---------------------------------------------------------------------------------------------
# The parser


DESCRIPTION = """\
TNT Bench: benchmark Transformer iN Transformer (TNT) against ViT and DeiT, reproducibly.
Train and profile the paper's models, run benchmark matrices and Optuna searches, compare the
runs in MLflow and write report tables.

examples:
  tntbench demo                                   the built-in end-to-end job
  tntbench models                                 the registry, with the paper's figures
  tntbench train experiments/train_nano.toml --set train.epochs=5
  tntbench matrix experiments/smoke.toml          run (or resume) a benchmark matrix
  tntbench search experiments/search_inner_heads.toml --workers 2
  tntbench report --out reports/smoke             tables and plots from the store
  tntbench profile tnt_s_patch16_224 deit_small_patch16_224 --mode train --dtype bf16
  tntbench ui                                     the MLflow UI on the store
"""
TRACKING_HELP = (
    "MLflow store: a URI (sqlite:///x.db, http://host:5000, postgresql://...); default: "
    "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tntbench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tntbench {suite.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _models_parser,
        _train_parser,
        _matrix_parser,
        _search_parser,
        _report_parser,
        _viz_parser,
        _ui_parser,
        _demo_parser,
        _profile_parser,
    ):
        add_command(sub)
    return p


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 --set model.inner_heads=2",
    )


def _add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():  # ui installs its own, to stop its server's group
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"tntbench {args.command}: error: {redact(_one_line(e))}", file=sys.stderr)
        return 2
    except Terminated:
        print("tntbench: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tntbench: interrupted", file=sys.stderr)
        return 130


def _one_line(e: UserError) -> str:
    """The error's message; a DataLoader worker's error arrives as torch's multi-line report
    ("Caught UserError in DataLoader worker process 0. ... suite.errors.UserError: <msg>")."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith(f"Caught {type(e).__name__} in DataLoader"):
        return lines[-1].partition(f"{type(e).__name__}: ")[2] or lines[-1]
    return first_line(e)


if __name__ == "__main__":
    sys.exit(main())
