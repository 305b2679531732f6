"""README.md for benchmarks/gpu_check.sh's results folder: steps, speed ratios, profiles, and the
tracked training run (read back from MLflow into train.json, system metrics included).

    python benchmarks/gpu_report.py OUT --tracking-uri sqlite:///.../mlflow.db --device-name NAME
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_run(uri: str) -> dict | None:
    """The gpu_check training run: params, last metrics, per-epoch history, system metrics."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        return None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gpu_check")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run = runs[0]
    epochs = {}
    for key in ("train_img_per_s", "val_top1", "train_loss", "epoch_s"):
        for m in client.get_metric_history(run.info.run_id, key):
            epochs.setdefault(m.step, {})[key] = m.value
    system = {k: v for k, v in run.data.metrics.items() if k.startswith("system/")}
    return {
        "status": run.info.status,
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "metrics": run.data.metrics,
        "epochs": [{"epoch": s, **v} for s, v in sorted(epochs.items())],
        "system_metrics": system,
    }


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--device-name", default="")
    args = ap.parse_args()
    out = Path(args.out)
    run = train_run(args.tracking_uri)
    if run is not None:
        (out / "train.json").write_text(json.dumps(run, indent=2))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# GPU check: {args.device_name}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or '?'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}. "
        "Written by `bash benchmarks/gpu_check.sh`; logs and JSON beside this file.",
        "",
        "## Steps",
    ]
    with open(out / "steps.tsv") as f:
        steps = list(csv.reader(f, delimiter="\t"))
    status = {"0": "ok", "124": "timed out", "137": "killed (timeout)"}
    lines += table(
        ["step", "result", "seconds", "limit s"],
        [[n, status.get(rc, f"failed (exit {rc})"), s, lim] for n, rc, s, lim in steps],
    )

    bench = read_json(out / "bench_tnt_speed.json")
    if bench:
        lines += [
            "",
            f"## bench_tnt_speed.py (img/s, batch {bench['batch_size']}, "
            f"img {bench.get('img_size', 224)}, depth {bench.get('depth', 12)})",
            "",
        ]
        names = sorted({k for r in bench["img_per_s"].values() for k in r})
        lines += table(
            ["mode dtype", *names],
            [
                [key, *(f"{r[n]:,.0f}" if n in r else "-" for n in names)]
                for key, r in bench["img_per_s"].items()
            ],
        )
        targets = bench.get("targets", {})
        lines += ["", "Ratios (targets from issues 13 and 18 on CUDA, issue 9 on CPU):", ""]
        lines += table(
            ["ratio", "value", "target"],
            [
                [
                    k,
                    f"{v:.2f}",
                    (f">= {targets[k]:.2f} " + ("ok" if v >= targets[k] else "**MISSED**"))
                    if k in targets
                    else "",
                ]
                for k, v in bench["ratios"].items()
            ],
        )
        if bench.get("compile_s"):
            lines += [""] + [
                f"- compile {k}: {v:.1f} s (not in img/s)" for k, v in bench["compile_s"].items()
            ]

    sweep = read_json(out / "inner_sweep.json")
    for shape in (sweep or {}).get("shapes", []):
        lines += [
            "",
            f"## bench_inner_kernel.py: {shape['model']} inner block, {shape['sequences']:,} "
            f"sequences, inner dim {shape['dim']}, {shape['heads']} heads, bf16 (ms)",
            "",
        ]
        lines += table(
            ["seq/program", "warps", "fwd ms", "bwd ms", "fwd rel err", "dx rel err"],
            [
                [str(v["block_s"]), str(v["warps"]), v["error"][:80], "", "", ""]
                if "error" in v
                else [
                    str(v["block_s"]),
                    str(v["warps"]),
                    f"{v['fwd_ms']:.3f}",
                    f"{v['bwd_ms']:.3f}",
                    f"{v['fwd_err']:.4f}",
                    f"{v['dx_err']:.4f}",
                ]
                for v in shape["variants"]
            ],
        )
        pt = shape["torch"]
        lines += [
            "",
            f"PyTorch block (autocast bf16): eager fwd {pt['eager']['fwd_ms']:.3f} ms, "
            f"fwd+bwd {pt['eager']['fwd_bwd_ms']:.3f} ms; compiled fwd "
            f"{pt['compiled']['fwd_ms']:.3f} ms, fwd+bwd {pt['compiled']['fwd_bwd_ms']:.3f} ms.",
        ]
        b = shape.get("best")
        if b:
            lines += [
                f"Best kernel tiles (seq/program, warps): fwd {b['fwd']}, bwd {b['bwd']}: "
                f"fwd+bwd {b['fwd_bwd_ms']:.3f} ms, {b['torch_compiled_over_triton']:.2f}x "
                f"the compiled block's speed, {b['torch_eager_over_triton']:.2f}x eager's."
            ]

    workers = read_json(out / "matrix_workers.json")
    if workers:
        w = workers["wall_s"]
        lines += [
            "",
            f"## bench_matrix_workers.py: 6 nano cells on {workers['cores']} CPU cores",
            "",
            f"1 process {w['1 process']:.1f} s, 2 workers {w['2 workers']:.1f} s: ratio "
            f"{workers['ratio']:.2f} (target <= {workers['target']}).",
        ]

    data = read_json(out / "bench_data.json")
    if data:
        lines += [
            "",
            f"## bench_data.py: input pipeline img/s, today's and the uint8 one ({data['device']})",
            "",
            f"`{data['command']}`; {data['workers']['n']} workers; target: "
            f"{data['target']['key']} >= {data['target']['min']} "
            f"({'met' if data['target']['met'] else 'missed'}).",
            "",
        ]
        lines += table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in data["ratios"].items()])
        gpu = data.get("gpu") or {}
        if gpu:
            lines += ["", *(f"- {k}: {v}" for k, v in gpu.items())]

    for mode in ("train", "infer"):
        rows = read_json(out / f"profile_{mode}.json")
        if not rows:
            continue
        r0 = rows[0]
        lines += [
            "",
            f"## tntbench profile --mode {mode} ({r0['dtype']}, batch {r0['batch_size']})",
            "",
        ]
        lines += table(
            ["model", "params M", "GMACs", "img/s", "step ms", "peak MB", "MFU", "MFU (spec)"],
            [
                [
                    r["model"],
                    f"{r['params_m']:.1f}",
                    f"{r['gmacs_fvcore']:.3f}",
                    f"{r['img_per_s']:,.0f}",
                    f"{r['step_ms']:.1f}",
                    f"{r['peak_mb']:,.0f}",
                    f"{r['mfu']:.1%}",
                    f"{r['mfu_spec']:.1%}" if r.get("mfu_spec") else "-",
                ]
                for r in rows
            ],
        )

    if run is not None:
        m, tags = run["metrics"], run["tags"]
        lines += [
            "",
            f"## tntbench train: TNT-S at 32x32 (4x4 patches), 2 epochs, "
            f"{tags.get('amp', '?')}, compile {tags.get('compile', '?')} ({run['status']})",
            "",
        ]
        lines += table(
            ["epoch", "img/s", "epoch s", "train loss", "val top-1"],
            [
                [
                    str(e["epoch"]),
                    f"{e.get('train_img_per_s', 0):,.0f}",
                    f"{e.get('epoch_s', 0):.1f}",
                    f"{e.get('train_loss', 0):.3f}",
                    f"{e.get('val_top1', 0):.1f}",
                ]
                for e in run["epochs"]
            ],
        )
        if "compile_s" in m:
            lines += ["", f"Compile (first step, apart from img/s): {m['compile_s']:.1f} s."]
        gpu = sorted(k for k in run["system_metrics"] if k.startswith("system/gpu"))
        lines += [
            "",
            "System metrics logged by MLflow: "
            + (", ".join(gpu) if gpu else "no GPU metrics (pynvml missing?)")
            + ".",
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
