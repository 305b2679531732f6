"""Timing that notices noise: the conditions of a timed window, and whether they disturbed it.

A figure measured while other processes use the cores is wrong and looks right (the demo read
tnt_nano at 39.8 infer img/s beside 1,329 measured alone). Each timed window therefore records
its step-time spread (p10, median, p90), the cores other processes used over it, the load
average before and after, and on CUDA the GPU clock and temperature. ``noise_reason`` judges a
window from those figures alone (a pure function, so the rule is tested and reused on logged
metrics); ``measure`` re-times a disturbed window a bounded number of times and keeps the
cleanest attempt, with the reason when none was clean. A window lasts at least
``MIN_WINDOW_S`` (``window_done``), so that its figures can tell a disturbed window from a
clean one, and a re-timing much slower than an attempt before it is disturbed whatever its
own figures say (``slowdown_reason``).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

# Thresholds, from 102 windows of 3-10 timed steps of tnt_nano and vit_nano (infer and train,
# batch 64/16/4, CPU, 2 threads) measured on this project's 2-core box on 2026-11-27 while three
# other engineers ran their tests on it (load average 2-17: a truly idle box was never seen;
# `benchmarks/timing_noise_calibration.py` re-measures). Per window: p90/p10, the cores other
# processes used, and the median against the best median of that model/mode/batch:
#   others < 0.2 core (29 windows):   p90/p10 1.15-1.73, median 1.00-1.6x the best
#   others 0.2-0.5 core (24 windows): p90/p10 1.19-4.0, up to 1.8x slow
#   others >= 0.9 core (32 windows):  p90/p10 1.02-140, median 13x slow (up to 410x)
# Idle daemons here (kdamond, the VM agent) use < 0.02 core.
SPREAD_LIMIT = 2.0  # p90/p10: the least disturbed windows reached 1.73 (a 4 ms-step one 1.59)
# others may take this share of the cores the timing needs before it counts as disturbed: with
# 2 threads on 2 cores 0.2 core, 10x the idle daemons, where windows were already up to 1.8x
# slow; a steady load barely spreads the steps (p90/p10 1.02 at 13x slow), so this rule is the
# one that catches it
OTHER_CPU_SHARE = 0.1
# the spread of fewer steps says little (p10 and p90 are then the min and max)
MIN_SPREAD_STEPS = 5
# /proc/stat and a process's CPU times count in 10 ms ticks: over a short window the measured
# use of others is uncertain by about (cores + 1) x 2 ticks, allowed on top of the limit
TICK_S = 0.01
RETRIES = 2  # re-timings of a disturbed window before it is reported as noisy
RETRY_PAUSE_S = 0.5  # lets a short burst of other work pass before timing again
# A window shorter than this cannot be judged, so each one goes on past its requested steps
# until it has lasted this long. Over the 0.13 s and 5 steps of a tnt_nano window beside two
# CPU burners (2.1x slow, accepted as clean) the tick slack alone was 0.46 core, over twice the
# 0.2-core limit, and a steady load spreads no steps; over 1 s the slack is 0.06 core and the
# spread has dozens of steps behind it. A window of slower steps simply runs its requested
# steps. The first window gets it too, not only re-timings: the same rule judges it, and short
# first windows beside the burners were accepted at 2.2x slow just as well (timing_retries 0).
# It costs at most about a second per window: a `profile` row on CPU (10 steps of batch 64)
# took 0.4-0.9 s already, a matrix cell's inference profile (3 steps) is small beside training
# the cell, and the test suite's 40-odd short windows add about 30 s to it.
MIN_WINDOW_S = 1.0
# ...but no more than this many steps: by then the percentiles are settled and each step is
# under 1 ms (a launch-bound GPU model), a window the tick slack in ``noise_reason`` already
# judges as short. It bounds the work a window adds beyond the steps asked for.
MAX_WINDOW_STEPS = 1000
# A re-timing whose median is more than this many times the fastest attempt's before it is
# disturbed, whatever its own spread and CPU figures say. Disturbance only ever slows a step,
# so the fastest median so far is the best estimate of the undisturbed one, and the attempts
# are the same model and batch timed a second apart: a load that began after the first window
# and that the re-timing's figures missed (a steady load spreads no steps; others' CPU time is
# read in ticks) shows as this slowdown. Not 1.5x: on this box two adjacent 1 s windows with no
# other process on the cores (others < 0.2 core; this process had its 2 cores, no steal time)
# read 0.52-1.88x apart, 17 of 247 pairs over 1.5x and none over 2 (2026-11-27, the
# calibration script's second-window column): the host slows these vCPUs unseen from inside,
# so only a slowdown past that counts as evidence. 2.0 is also the limit on repeats' medians
# (``combine``), the same comparison between windows. Only re-timings are compared, and a
# re-timing happens only after a window was judged disturbed on its own evidence, so a quiet
# first window is never marked by it.
SLOWDOWN_LIMIT = 2.0


@dataclass
class Conditions:
    """What else the machine did over one timed window."""

    window_s: float
    other_cpu: float  # cores used by other processes, averaged over the window
    cores: int
    load_avg_1m_before: float
    load_avg_1m_after: float
    gpu_clock_mhz: float | None = None
    gpu_temp_c: float | None = None


@dataclass
class Window:
    """One timed window: its step times (seconds) and conditions, judged."""

    times: list[float]
    conditions: Conditions
    reason: str = ""  # why the window counts as disturbed ("" = it does not)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def p10_s(self) -> float:
        return percentile(self.times, 10)

    @property
    def p90_s(self) -> float:
        return percentile(self.times, 90)


@dataclass
class Measurement:
    """The window kept (the first clean one, else the fastest) and every attempt's figures."""

    kept: Window
    attempts: list[Window] = field(default_factory=list)

    @property
    def noisy(self) -> bool:
        return bool(self.kept.reason)

    @property
    def reason(self) -> str:
        if not self.kept.reason:
            return ""
        return f"{self.kept.reason} (still after {len(self.attempts) - 1} re-timings)"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (as profile's p90 always was): p10 of 10 values is the smallest."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def noise_reason(
    p10_s: float,
    p90_s: float,
    n_steps: int,
    other_cpu: float,
    cores: int,
    need_cores: float,
    window_s: float = math.inf,
) -> str:
    """Why a window's figure cannot be trusted, or "" when it can.

    Disturbed when the step times spread (p90/p10 above ``SPREAD_LIMIT``, judged from
    ``MIN_SPREAD_STEPS`` steps on) or when other processes took more than ``OTHER_CPU_SHARE``
    of the ``need_cores`` this timing uses, beyond the cores it leaves free (plus what the
    10 ms tick counters cannot tell apart over a ``window_s`` this short).
    """
    reasons = []
    if n_steps >= MIN_SPREAD_STEPS and p10_s > 0 and p90_s / p10_s > SPREAD_LIMIT:
        reasons.append(f"p90/p10 = {p90_s / p10_s:.1f} (limit {SPREAD_LIMIT})")
    spare = max(cores - need_cores, 0.0)
    slack = 2 * TICK_S * (cores + 1) / window_s if window_s > 0 else math.inf
    limit = spare + OTHER_CPU_SHARE * need_cores + slack
    if other_cpu > limit:
        reasons.append(f"other processes used {other_cpu:.1f} of {cores} cores (limit {limit:.2f})")
    return "; ".join(reasons)


def slowdown_reason(median_s: float, fastest_s: float) -> str:
    """Why a re-timing cannot be trusted though its own figures look clean: its median step
    time is more than ``SLOWDOWN_LIMIT`` times ``fastest_s``, the fastest median of the attempts
    before it ("" when it is not)."""
    if fastest_s > 0 and median_s / fastest_s > SLOWDOWN_LIMIT:
        ratio = median_s / fastest_s
        return f"median {ratio:.1f}x the fastest attempt's (limit {SLOWDOWN_LIMIT})"
    return ""


def window_done(
    n_steps: int,
    elapsed_s: float,
    steps: int,
    min_s: float = MIN_WINDOW_S,
    max_steps: int = MAX_WINDOW_STEPS,
) -> bool:
    """Whether a timed window may end after ``n_steps`` steps and ``elapsed_s`` seconds: the
    ``steps`` asked for are timed and the window has lasted ``min_s``, or it has reached
    ``max_steps`` (never fewer than ``steps``)."""
    if n_steps < steps:
        return False
    return elapsed_s >= min_s or n_steps >= max_steps


def need_cores(device: torch.device) -> float:
    """Cores a timing on ``device`` keeps busy: torch's threads on CPU, one launching thread
    on an accelerator."""
    if device.type == "cpu":
        return float(min(torch.get_num_threads(), _cores()))
    return 1.0


def _cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Measuring the conditions


def _busy_s() -> float:
    """CPU seconds all processes spent busy, summed over the cores (guest time is in user)."""
    t = psutil.cpu_times()
    busy = t.user + t.system
    for name in ("nice", "irq", "softirq", "steal"):
        busy += getattr(t, name, 0.0)
    return busy


def _own_s(proc: psutil.Process, children: bool = True) -> float:
    """CPU seconds of this process and, with ``children``, its children (DataLoader workers):
    live ones read directly, finished ones through the children_* counters."""
    t = proc.cpu_times()
    if not children:
        return t.user + t.system
    total = t.user + t.system + t.children_user + t.children_system
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    return total


def _load_1m() -> float:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return math.nan


def gpu_state(device: torch.device) -> tuple[float | None, float | None]:
    """(SM clock MHz, temperature C) through NVML, where torch can reach it; never raises."""
    if device.type != "cuda":
        return None, None
    clock = temp = None
    # torch.cuda.clock_rate/temperature need pynvml (or amdsmi); without it they raise
    with contextlib.suppress(Exception):
        clock = float(torch.cuda.clock_rate(device))
    with contextlib.suppress(Exception):
        temp = float(torch.cuda.temperature(device))
    return clock, temp


@contextlib.contextmanager
def watch(device: torch.device, children: bool = True) -> Iterator[list[Conditions]]:
    """Measure the conditions over the ``with`` block; the list it yields holds them after.

    ``children``: whether this process's children do the watched work with it (a training
    epoch's DataLoader workers), so that their CPU time is its own; else a busy child is one
    more process competing for the cores."""
    out: list[Conditions] = []
    proc = psutil.Process()
    load0 = _load_1m()
    t0, busy0, own0 = time.perf_counter(), _busy_s(), _own_s(proc, children)
    yield out
    t1, busy1, own1 = time.perf_counter(), _busy_s(), _own_s(proc, children)
    window = t1 - t0
    other = max((busy1 - busy0) - (own1 - own0), 0.0) / window if window > 0 else 0.0
    clock, temp = gpu_state(device)
    out.append(Conditions(window, other, _cores(), load0, _load_1m(), clock, temp))


def judge(times: list[float], cond: Conditions, need: float) -> Window:
    w = Window(times, cond)
    if times:
        w.reason = noise_reason(
            w.p10_s, w.p90_s, len(times), cond.other_cpu, cond.cores, need, cond.window_s
        )
    return w


def measure(
    time_steps: Callable[[], list[float]],
    device: torch.device,
    retries: int = RETRIES,
    pause_s: float = RETRY_PAUSE_S,
) -> Measurement:
    """Run ``time_steps`` (one timed window: its step times in seconds) under ``watch``; while
    the window is disturbed, wait ``pause_s`` and time it again, at most ``retries`` times.

    A re-timing is also judged against the attempts before it (``slowdown_reason``), so the
    first clean window kept is never much slower than one already seen; when none is clean the
    fastest is kept (disturbance only ever slows a step), with its reason."""
    need = need_cores(device)
    attempts: list[Window] = []
    for i in range(retries + 1):
        if i:
            time.sleep(pause_s)
        # a timed window runs in this process alone (synthetic input, no loader, compiled
        # before): a child busy meanwhile competes for the cores like any other process. Counted
        # as this process's own, the two CPU burners the acceptance test starts (children of
        # pytest) read as under 0.15 core of others, and tnt_nano 2.2x slow beside them passed
        # clean in 7 of 30 runs; counted as others they read 1.0 core and all 30 were marked.
        with watch(device, children=False) as cond:
            times = time_steps()
        w = judge(times, cond[0], need)
        if attempts and times:
            slow = slowdown_reason(w.median_s, min(a.median_s for a in attempts))
            w.reason = "; ".join(r for r in (w.reason, slow) if r)
        attempts.append(w)
        if not w.reason:
            return Measurement(w, attempts)
    return Measurement(min(attempts, key=lambda w: w.median_s), attempts)


def window_metrics(w: Window, prefix: str = "") -> dict[str, float]:
    """A window's conditions under stable metric names (``prefix`` e.g. "infer_")."""
    c = w.conditions
    m = {
        "timing_p10_ms": w.p10_s * 1e3,
        "timing_median_ms": w.median_s * 1e3,
        "timing_p90_ms": w.p90_s * 1e3,
        "timing_other_cpu": c.other_cpu,
        "load_avg_1m": c.load_avg_1m_after,
        "load_avg_1m_before": c.load_avg_1m_before,
        "timing_steps": float(len(w.times)),
        "timing_window_s": c.window_s,
        "timing_cores": float(c.cores),
    }
    if c.gpu_clock_mhz is not None:
        m["gpu_clock_mhz"] = c.gpu_clock_mhz
    if c.gpu_temp_c is not None:
        m["gpu_temp_c"] = c.gpu_temp_c
    return {prefix + k: v for k, v in m.items()}


def metrics_reason(m: Mapping[str, float], need: float, prefix: str = "") -> str:
    """``noise_reason`` of a window logged by ``window_metrics`` (with ``timing_steps``,
    ``timing_window_s`` and ``timing_cores`` beside it): the rule applied to stored metrics."""
    p = prefix
    if f"{p}timing_other_cpu" not in m:
        return ""
    return noise_reason(  # no p10/p90 where no step spread was kept (CUDA epochs): 0 steps
        m.get(f"{p}timing_p10_ms", 0.0),
        m.get(f"{p}timing_p90_ms", 0.0),
        int(m.get(f"{p}timing_steps", 0)),
        m[f"{p}timing_other_cpu"],
        int(m.get(f"{p}timing_cores", _cores())),
        need,
        m.get(f"{p}timing_window_s", math.inf),
    )


@dataclass
class Combined:
    """Repeated measurements as one figure: the median of the repeats' median step times."""

    step_s: float
    p10_s: float  # over the kept windows' steps pooled
    p90_s: float
    repeats: list[dict[str, Any]]  # per repeat: its figures and conditions
    metrics: dict[str, float]  # the conditions under stable names (``window_metrics``)
    reason: str  # why the figure is disturbed ("" = it is not)


def combine(measurements: list[Measurement]) -> Combined:
    """One figure from ``measurements`` (one per repeat): noisy when a repeat stayed noisy
    after its re-timings, or when the repeats disagree (max/min of their medians above
    ``SPREAD_LIMIT``: the conditions changed between them)."""
    kept = [m.kept for m in measurements]
    pooled = [t for w in kept for t in w.times]
    medians = [w.median_s for w in kept]
    noisy = [(i, m) for i, m in enumerate(measurements) if m.noisy]
    reasons = []
    if len(kept) == 1 and noisy:
        reasons.append(noisy[0][1].reason)
    elif noisy:  # the worst repeat speaks for the others
        i, bad = max(noisy, key=lambda im: im[1].kept.median_s)
        reasons.append(f"{len(noisy)} of {len(kept)} repeats disturbed, e.g. {i + 1}: {bad.reason}")
    if len(medians) > 1 and max(medians) / min(medians) > SPREAD_LIMIT:
        reasons.append(
            f"repeats' medians max/min = {max(medians) / min(medians):.1f} (limit {SPREAD_LIMIT})"
        )
    # the worst conditions any kept window saw
    worst = max(kept, key=lambda w: w.conditions.other_cpu)
    metrics = window_metrics(Window(pooled, worst.conditions))
    metrics["timing_steps"] = float(len(pooled))
    metrics["timing_window_s"] = sum(w.conditions.window_s for w in kept)
    metrics["load_avg_1m"] = max(w.conditions.load_avg_1m_after for w in kept)
    metrics["timing_retries"] = float(sum(len(m.attempts) - 1 for m in measurements))
    repeats = [_repeat_figures(m) for m in measurements]
    return Combined(
        statistics.median(medians),
        percentile(pooled, 10),
        percentile(pooled, 90),
        repeats,
        metrics,
        "; ".join(reasons),
    )


def _repeat_figures(m: Measurement) -> dict[str, Any]:
    w = m.kept
    return {
        "step_ms": w.median_s * 1e3,
        "p10_ms": w.p10_s * 1e3,
        "p90_ms": w.p90_s * 1e3,
        "other_cpu": w.conditions.other_cpu,
        "load_avg_1m": w.conditions.load_avg_1m_after,
        "retries": float(len(m.attempts) - 1),
        "other_cpu_attempts": [a.conditions.other_cpu for a in m.attempts],
        "noisy_reason": m.reason,
    }
