"""The measurements behind ``suite.noise``'s thresholds: timed windows and their conditions.

Times windows of tnt_nano and vit_nano (infer and train, a few batch sizes) for ``--seconds``,
records each window's p90/p10, the cores other processes used and the median against the best
median of that model/mode/batch, and prints them grouped by how busy the other processes were.
Each case is timed twice in a row, ``RETRY_PAUSE_S`` apart as a re-timing is, and the second
window's median is compared with the first's (``SLOWDOWN_LIMIT``). Windows last at least
``--min-window-s`` as ``time_model``'s do (0: just the steps, as the first calibration had).
Run it on an idle machine (and once beside ``python -c "while True: pass"`` processes): a quiet
window must stay under ``SPREAD_LIMIT``, the load limit and the slowdown limit, a disturbed one
should not.

    python benchmarks/timing_noise_calibration.py [--seconds 300] [--min-window-s 1]
        [--jsonl windows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from suite import noise
from suite.models import create_model, model_img_size
from suite.timing import _step, _window

CASES = [(64, 10), (16, 6), (4, 5)]  # (batch, timed steps)
BUCKETS = [(0.0, 0.2), (0.2, 0.5), (0.5, 0.9), (0.9, 99.0)]  # cores used by others


def windows(seconds: float, min_s: float) -> list[dict]:
    """One row per timed window until ``seconds`` have passed."""
    dev = torch.device("cpu")
    rows = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        for name in ("tnt_nano", "vit_nano"):
            for mode in ("infer", "train"):
                for bs, steps in CASES:
                    rows.extend(window_pair(name, mode, bs, steps, dev, min_s))
    return rows


def window_pair(
    name: str, mode: str, bs: int, steps: int, dev: torch.device, min_s: float
) -> list[dict]:
    """Two windows of one case, ``RETRY_PAUSE_S`` apart: the second has ``vs_previous``, its
    median over the first's."""
    model = create_model(name)
    size = model_img_size(name, {})
    x = torch.randn(bs, 3, size, size)
    y = torch.randint(0, model.num_classes, (bs,))
    step = _step(model, x, y, mode, "fp32", dev)
    for _ in range(2):
        step(model)
    rows: list[dict] = []
    for i in range(2):
        if i:
            time.sleep(noise.RETRY_PAUSE_S)
        with noise.watch(dev) as cond:
            times = _window(step, model, steps, dev, min_s)()
        w = noise.judge(times, cond[0], noise.need_cores(dev))
        c = cond[0]
        rows.append(
            dict(
                key=f"{name}/{mode}/{bs}",
                median_ms=w.median_s * 1e3,
                spread=w.p90_s / w.p10_s,
                steps=len(times),
                other_cpu=c.other_cpu,
                window_s=c.window_s,
                load_avg_1m=c.load_avg_1m_before,
                reason=w.reason,
            )
        )
    rows[1]["vs_previous"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    return rows


def report(rows: list[dict]) -> None:
    best: dict[str, float] = {}
    for r in rows:
        best[r["key"]] = min(best.get(r["key"], float("inf")), r["median_ms"])
    print(f"{len(rows)} windows; limits: p90/p10 {noise.SPREAD_LIMIT}, others' share")
    print(f"{noise.OTHER_CPU_SHARE} of the cores needed, re-timing {noise.SLOWDOWN_LIMIT}x")
    for lo, hi in BUCKETS:
        b = [r for r in rows if lo <= r["other_cpu"] < hi]
        if not b:
            continue
        spread = [r["spread"] for r in b]
        slow = [r["median_ms"] / best[r["key"]] for r in b]
        marked = sum(bool(r["reason"]) for r in b)
        print(
            f"others {lo:.1f}-{hi:.1f} cores: {len(b)} windows, p90/p10 {min(spread):.2f}-"
            f"{max(spread):.2f} (median {statistics.median(spread):.2f}), median "
            f"{statistics.median(slow):.2f}x the best (max {max(slow):.2f}x), marked {marked}"
        )
        again = [r["vs_previous"] for r in b if "vs_previous" in r]
        if again:
            over = sum(v > noise.SLOWDOWN_LIMIT for v in again)
            print(
                f"  second window's median {min(again):.2f}-{max(again):.2f}x the first's, "
                f"{over} of {len(again)} over {noise.SLOWDOWN_LIMIT}x"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--min-window-s", type=float, default=noise.MIN_WINDOW_S)
    ap.add_argument("--jsonl", help="also write every window as a JSON line")
    args = ap.parse_args()
    rows = windows(args.seconds, args.min_window_s)
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    report(rows)


if __name__ == "__main__":
    main()
