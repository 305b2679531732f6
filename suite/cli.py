"""The ``tntbench`` command: parse arguments and dispatch. Work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from suite.errors import UserError, parse_assignment


def _cmd_models(args: argparse.Namespace) -> int:
    from suite.models.summary import models_table

    overrides = dict(parse_assignment(s, "--set") for s in args.set)
    print(models_table(args.names or None, overrides).to_string(index=False))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from suite.profile import run_profile_cli

    return run_profile_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tntbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("models", help="list the model registry with paper reference values")
    m.add_argument("names", nargs="*", metavar="MODEL", help="models to show (default: all)")
    m.add_argument(
        "--set", action="append", default=[], metavar="KNOB=VALUE",
        help="override a constructor argument, e.g. --set inner_heads=2",
    )  # fmt: skip
    m.set_defaults(func=_cmd_models)

    pr = sub.add_parser("profile", help="params, GMACs (fvcore), throughput, latency, memory, MFU")
    pr.add_argument("models", nargs="+", metavar="MODEL")
    pr.add_argument("--img-size", type=int, default=None)
    pr.add_argument("--batch-size", type=int, default=None)
    pr.add_argument("--mode", choices=["infer", "train"], default="infer")
    pr.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    pr.add_argument("--compile", action="store_true", help="torch.compile the model first")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default: 10 GPU, 3 CPU)"
    )
    pr.add_argument("--steps", type=int, default=None, help="timed steps (default: 40 GPU, 10 CPU)")
    pr.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    pr.add_argument("--log", action="store_true", help="record each row as an MLflow run")
    pr.add_argument("--tracking-uri", default=None)
    pr.set_defaults(func=_cmd_profile)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"tntbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tntbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
