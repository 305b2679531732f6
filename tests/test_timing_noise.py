"""Timing that notices noise: the decision rule, re-timing, repeats, data-loading stalls, and a
profile run beside two CPU burners (the figure is right or it says it is not)."""

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import pandas as pd
import pytest
import torch

from suite import noise
from suite.cli import main
from suite.profile import ProfileRow, format_table, log_profile_row
from suite.studies.matrix import format_summary, summary_metrics
from suite.training.engine import Criterion, build_optimizer, build_scheduler, train_one_epoch

MS = 1e-3


# ---------------------------------------------------------------------------------------------
# The rule, on synthetic figures


def test_quiet_figures_are_not_noisy():
    # the least disturbed windows measured here: p90/p10 up to 1.73, others up to 0.19 core
    assert noise.noise_reason(48 * MS, 57 * MS, 10, 0.08, cores=2, need_cores=2) == ""
    assert noise.noise_reason(30 * MS, 52 * MS, 10, 0.19, 2, 2, window_s=0.5) == ""
    assert noise.noise_reason(48 * MS, 48 * MS, 10, 0.0, cores=2, need_cores=2) == ""


def test_spread_names_its_ratio_and_limit():
    r = noise.noise_reason(10 * MS, 34 * MS, 10, 0.0, cores=2, need_cores=2)
    assert r == "p90/p10 = 3.4 (limit 2.0)"


def test_other_processes_name_their_cores():
    r = noise.noise_reason(10 * MS, 11 * MS, 10, 1.7, cores=2, need_cores=2)
    assert r == "other processes used 1.7 of 2 cores (limit 0.20)"
    both = noise.noise_reason(10 * MS, 34 * MS, 10, 1.7, cores=2, need_cores=2)
    assert both == "p90/p10 = 3.4 (limit 2.0); other processes used 1.7 of 2 cores (limit 0.20)"
    # a steady load barely spreads the steps (p90/p10 1.02 at 13x slow was seen): load decides
    assert noise.noise_reason(10 * MS, 10.2 * MS, 10, 0.3, cores=2, need_cores=2) != ""


def test_others_on_spare_cores_do_not_disturb():
    # a GPU timing keeps one core busy: 10 of 16 cores used by others leaves it alone
    assert noise.noise_reason(1 * MS, 1.05 * MS, 40, 10.0, cores=16, need_cores=1) == ""
    assert noise.noise_reason(1 * MS, 1.05 * MS, 40, 15.5, cores=16, need_cores=1) != ""
    # 2 threads on 8 cores: others may use the 6 spare cores and a tenth of the 2 needed
    assert noise.noise_reason(1 * MS, 1 * MS, 10, 6.1, cores=8, need_cores=2) == ""
    assert noise.noise_reason(1 * MS, 1 * MS, 10, 6.3, cores=8, need_cores=2) != ""


def test_few_steps_and_short_windows_are_not_judged_on_what_they_cannot_show():
    # 3 steps: p10 and p90 are the min and max
    assert noise.noise_reason(10 * MS, 40 * MS, 3, 0.0, cores=2, need_cores=2) == ""
    # 10 ms ticks: over 50 ms, 1.3 cores of others is within what the counters cannot resolve
    assert noise.noise_reason(10 * MS, 10 * MS, 10, 1.3, 2, 2, window_s=0.05) == ""
    assert noise.noise_reason(10 * MS, 10 * MS, 10, 1.3, 2, 2, window_s=0.5) == (
        "other processes used 1.3 of 2 cores (limit 0.32)"
    )


def test_a_window_lasts_its_steps_and_the_minimum_duration_within_the_step_cap():
    done = noise.window_done
    assert not done(4, 5.0, steps=5)  # the steps asked for come first
    assert not done(5, 0.13, steps=5)  # the re-timing once accepted beside two burners
    assert done(5, 1.0, steps=5) and done(80, 1.01, steps=5)
    assert done(10, 3.0, steps=10)  # slow steps: the steps asked for already last long enough
    # sub-millisecond steps stop at the cap, short of the minimum duration
    assert not done(999, 0.3, steps=5) and done(noise.MAX_WINDOW_STEPS, 0.3, steps=5)
    assert not done(1500, 0.3, steps=2000)  # never fewer than the steps asked for
    assert done(3, 0.0, steps=3, min_s=0)  # min_s = 0: the steps asked for, as before


def test_a_re_timing_much_slower_than_an_earlier_attempt_names_the_ratio():
    # adjacent quiet windows here read up to 1.88x apart (the host's doing): not evidence alone
    assert noise.slowdown_reason(19 * MS, 10 * MS) == ""
    assert noise.slowdown_reason(10 * MS, 12 * MS) == ""  # faster is never disturbed
    r = noise.slowdown_reason(21 * MS, 10 * MS)
    assert r == "median 2.1x the fastest attempt's (limit 2.0)"


def test_percentile_is_nearest_rank():
    v = [float(i) for i in range(1, 11)]
    assert noise.percentile(v, 10) == 1.0 and noise.percentile(v, 90) == 9.0
    assert noise.percentile([3.0], 90) == 3.0


def test_metrics_reason_applies_the_rule_to_logged_metrics():
    w = noise.Window([10 * MS] * 9 + [50 * MS], noise.Conditions(1.0, 1.5, 2, 0.1, 0.2))
    m = noise.window_metrics(w)
    assert m["timing_p10_ms"] == pytest.approx(10) and m["timing_other_cpu"] == 1.5
    assert noise.metrics_reason(m, need=2) == "other processes used 1.5 of 2 cores (limit 0.26)"
    assert noise.metrics_reason({"train_loss": 1.0}, need=2) == ""


def test_metrics_reason_judges_an_epoch_without_step_times_by_its_cpu_alone():
    """A CUDA epoch keeps no per-step spread (its steps run asynchronously): only the
    conditions are logged, and the rule must judge them (a KeyError here failed
    test_fit_then_resume_on_cuda on an H200)."""
    cuda_epoch = {
        "timing_other_cpu": 1.5,
        "timing_steps": 0.0,
        "timing_window_s": 10.0,
        "timing_cores": 16.0,
    }
    assert noise.metrics_reason(cuda_epoch, need=1) == ""  # 1.5 of 16 cores: 15 are spare
    busy = {**cuda_epoch, "timing_other_cpu": 15.9}
    assert noise.metrics_reason(busy, need=1).startswith("other processes used 15.9 of 16 cores")


# ---------------------------------------------------------------------------------------------
# Re-timing and repeats (synthetic step times: a window of no work is too short for the load
# rule, so only the spread decides and the outcome is deterministic)


def _windows(*windows):
    """A time_steps callable: per call, 10 step times of (median ms, spread of the last two)."""
    calls = iter(windows)

    def time_steps():
        ms, spread = next(calls)
        return [ms * MS] * 8 + [ms * MS * spread] * 2

    return time_steps


def test_a_disturbed_window_is_timed_again_and_a_clean_one_kept():
    m = noise.measure(_windows((10, 3.0), (10, 1.0)), torch.device("cpu"), pause_s=0)
    assert not m.noisy and len(m.attempts) == 2
    assert m.attempts[0].reason.startswith("p90/p10 = 3.0")


def test_still_disturbed_after_the_retries_is_noisy_with_the_reason():
    w = _windows((12, 3.0), (10, 2.5), (11, 4.0), (10, 1.0))
    m = noise.measure(w, torch.device("cpu"), retries=2, pause_s=0)
    assert m.noisy and len(m.attempts) == 3  # bounded: the clean 4th window is never timed
    assert m.kept is m.attempts[1]  # the fastest: disturbance only slows
    assert m.reason == "p90/p10 = 2.5 (limit 2.0) (still after 2 re-timings)"


def test_a_slow_re_timing_is_not_kept_as_clean():
    # the CI failure's shape: a disturbed first window, then a steady-load re-timing 2.1x
    # slower whose own spread and CPU figures looked clean; the third is as fast as the first
    m = noise.measure(_windows((10, 3.0), (21, 1.0), (11, 1.0)), torch.device("cpu"), pause_s=0)
    assert not m.noisy and m.kept is m.attempts[2]
    assert m.attempts[1].reason == "median 2.1x the fastest attempt's (limit 2.0)"
    # slow throughout after the first: marked, and the figure kept is the fast first window's
    m = noise.measure(_windows((10, 3.0), (21, 1.0), (25, 1.0)), torch.device("cpu"), pause_s=0)
    assert m.noisy and m.kept is m.attempts[0]
    assert m.reason == "p90/p10 = 3.0 (limit 2.0) (still after 2 re-timings)"
    assert m.attempts[2].reason == "median 2.5x the fastest attempt's (limit 2.0)"
    # both rules name their reason; a clean window after them is kept
    m = noise.measure(_windows((10, 3.0), (25, 4.0), (9, 1.0)), torch.device("cpu"), pause_s=0)
    both = "p90/p10 = 4.0 (limit 2.0); median 2.5x the fastest attempt's (limit 2.0)"
    assert m.attempts[1].reason == both and m.kept is m.attempts[2] and not m.noisy


def test_a_busy_child_of_this_process_disturbs_a_timed_window():
    # the acceptance test's burners are pytest's children: they compete for the cores as much
    # as anyone's processes (a sleeping window: the burner has a core to itself)
    def asleep():
        time.sleep(0.3)
        return [0.3]

    (burner,) = _burners(1)
    try:
        time.sleep(0.1)
        m = noise.measure(asleep, torch.device("cpu"), retries=0)
    finally:
        burner.kill()
        burner.wait()
    assert m.kept.conditions.other_cpu >= 0.8, m.kept.conditions
    assert "other processes used" in m.reason


def test_a_clean_first_window_is_kept_whatever_its_speed():
    # the rule compares re-timings only: a quiet run has no earlier attempt and is never marked
    m = noise.measure(_windows((50, 1.0), (10, 1.0)), torch.device("cpu"), pause_s=0)
    assert not m.noisy and len(m.attempts) == 1


def test_repeats_give_the_median_of_their_medians_and_notice_disagreement():
    def fixed(step_ms):
        return noise.measure(lambda: [step_ms * MS] * 10, torch.device("cpu"), pause_s=0)

    c = noise.combine([fixed(10), fixed(12), fixed(11)])
    assert c.step_s == pytest.approx(11 * MS) and c.reason == ""
    assert [r["step_ms"] for r in c.repeats] == pytest.approx([10, 12, 11])
    c = noise.combine([fixed(10), fixed(30), fixed(11)])
    assert c.reason == "repeats' medians max/min = 3.0 (limit 2.0)"


class Sleepy(torch.nn.Module):
    """A model whose step takes ``delay_s`` (a sleep: no cores used, so no load either)."""

    def __init__(self, delay_s):
        super().__init__()
        self.delay_s = delay_s
        self.head = torch.nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.head(x.flatten(1))


def _time_tiny(delay_s, min_window_s):
    from suite.timing import TimingOptions, time_model

    opts = TimingOptions("infer", "fp32", warmup=1, steps=3, retries=0, min_window_s=min_window_s)
    return time_model(Sleepy(delay_s), 4, 2, opts, device=torch.device("cpu"), num_classes=10)


def test_a_window_goes_on_past_its_steps_until_it_lasts_the_minimum():
    t = _time_tiny(0.005, min_window_s=0.2)
    c = t.conditions
    assert c["timing_window_s"] >= 0.2 and c["timing_steps"] > 3  # 5 ms steps: ~35 of them
    # img/s is from the steps timed: the batch over their median step, which sleeps 5 ms
    assert t.step_ms == pytest.approx(c["timing_median_ms"]) and t.step_ms >= 5
    assert 0 < t.img_per_s <= 2 / 0.005  # no step is shorter than its sleep
    # at least half the steps take the median or longer: the window's wall clock gives at
    # most twice the median's rate
    window_rate = 2 * c["timing_steps"] / c["timing_window_s"]
    assert t.img_per_s >= window_rate / 2, (t.img_per_s, c)
    assert t.repeats[0]["img_per_s"] == pytest.approx(t.img_per_s)


def test_a_window_of_tiny_steps_stops_at_the_step_cap():
    t = _time_tiny(0.0, min_window_s=30.0)  # 30 s would never be reached by 1000 tiny steps
    assert t.conditions["timing_steps"] == noise.MAX_WINDOW_STEPS
    assert t.conditions["timing_window_s"] < 30


# ---------------------------------------------------------------------------------------------
# Tables


def test_the_matrix_summary_marks_a_disturbed_figure():
    reason = "infer img/s: other processes used 1.7 of 2 cores"
    summary = pd.DataFrame(
        {
            "model": ["tnt_nano", "vit_nano"],
            "dataset": ["synthetic", "synthetic"],
            "train img/s": [210.6, 900.0],
            "infer img/s": [39.8, 2000.0],
            "timing_noisy": [reason, ""],
        }
    )
    text = format_summary(summary)
    assert "211*" in text and " 40*" in text and "900 " in text and "2000" in text
    assert "* tnt_nano/synthetic: timing disturbed: infer img/s: other processes" in text
    assert "timing_noisy" not in text.splitlines()[0]
    # the reason is no part of a group's name in the parent run's metrics
    summary["top-1 mean"], summary["top-1 std"] = [50.0, 60.0], [1.0, 2.0]
    names = summary_metrics(summary)
    assert "val_top1_mean/vit_nano" in names and "val_top1_std/tnt_nano" in names
    assert not [n for n in names if "processes" in n]


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """One ``tntbench profile --repeat 3 --json`` run: its console text and JSON row."""
    out = tmp_path_factory.mktemp("profile") / "p.json"
    argv = ["profile", "vit_nano", "--repeat", "3", "--steps", "3", "--warmup", "1"]
    text = _run_cli(argv + ["--batch-size", "4", "--device", "cpu", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    return text, row


def _run_cli(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


@pytest.mark.slow
def test_repeat_gives_n_timings_and_their_median(repeated):
    text, row = repeated
    assert "median of 3 repeats" in text and "img/s min-max" in text
    assert row["repeat"] == 3 and len(row["timings"]) == 3
    steps = [t["step_ms"] for t in row["timings"]]
    assert row["step_ms"] == pytest.approx(statistics.median(steps))
    rates = [t["img_per_s"] for t in row["timings"]]
    assert row["img_per_s_min"] == min(rates) and row["img_per_s_max"] == max(rates)
    # the median repeat's rate lies within the repeats' spread, and near the rate of all their
    # windows' wall clock (3 windows of a second: a unit or batch slip is far outside)
    assert min(rates) <= row["img_per_s"] <= max(rates)
    c = row["conditions"]
    window_rate = 4 * c["timing_steps"] / c["timing_window_s"]
    assert window_rate / 4 < row["img_per_s"] < window_rate * 10, (row["img_per_s"], c)
    assert f"{min(rates):.1f}-{max(rates):.1f}" in text
    for key in ("timing_p10_ms", "timing_p90_ms", "timing_other_cpu", "load_avg_1m"):
        assert key in row["conditions"], key
    assert isinstance(row["timing_noisy"], bool)


def test_repeat_must_be_positive(capsys):
    assert main(["profile", "vit_nano", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err


def _noisy(row):
    reason = "p90/p10 = 3.4 (limit 2.0); other processes used 1.7 of 2 cores (limit 0.20)"
    return replace(ProfileRow(**row), timing_noisy=True, timing_noisy_reason=reason)


def _clean(row):  # the measured row may itself be noisy: these cores are shared
    return replace(ProfileRow(**row), timing_noisy=False, timing_noisy_reason="")


@pytest.mark.slow
def test_a_noisy_figure_is_starred_with_a_footnote(repeated):
    _, row = repeated
    text = format_table([_noisy(row), _clean(row)])
    lines = text.splitlines()
    assert f"{row['img_per_s']:.1f}*" in lines[2] and "*" not in lines[3]
    assert lines[-1] == (
        "* vit_nano: timing disturbed, do not trust it: p90/p10 = 3.4 (limit 2.0); "
        "other processes used 1.7 of 2 cores (limit 0.20)"
    )


@pytest.mark.slow
def test_a_logged_noisy_run_carries_the_tag_and_the_conditions(repeated, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from suite.tracking import make_tracker

    _, row = repeated
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = make_tracker(uri)
    log_profile_row(tracker, _noisy(row))
    log_profile_row(tracker, _clean(row))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["profile"], order_by=["start_time ASC"])
    noisy, clean = runs.iloc[0], runs.iloc[1]
    assert noisy["tags.timing_noisy"].startswith("p90/p10 = 3.4 (limit 2.0)")
    assert pd.isna(clean["tags.timing_noisy"])
    for key in ("timing_p10_ms", "timing_p90_ms", "timing_other_cpu", "load_avg_1m"):
        assert clean[f"metrics.{key}"] == pytest.approx(row["conditions"][key]), key
    assert clean["params.repeat"] == "3"


# ---------------------------------------------------------------------------------------------
# Data-loading stalls are apart from training img/s


class SlowDataset(torch.utils.data.Dataset):
    def __init__(self, n, delay_s):
        self.n, self.delay_s = n, delay_s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return torch.randn(3, 32, 32), i % 10


def test_data_wait_is_measured_and_left_out_of_train_img_per_s():
    from suite.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10)
    ds = SlowDataset(32, delay_s=0.015)  # 0.48 s of injected stalls
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=1, lr=1e-3, min_lr=1e-5)
    m = train_one_epoch(model, loader, opt, sched, Criterion(), torch.device("cpu"))
    assert all(isinstance(v, float) for v in m.values())
    assert m["data_wait_s"] > 0.48 * 0.8
    assert m["data_wait_s"] < m["epoch_s"]
    compute = m["epoch_s"] - m["data_wait_s"]
    assert m["train_img_per_s"] == pytest.approx(32 / compute)
    assert m["train_img_per_s_wall"] == pytest.approx(32 / m["epoch_s"])
    assert m["train_img_per_s"] > m["train_img_per_s_wall"]
    assert m["timing_steps"] == 4 and m["timing_p90_ms"] >= m["timing_p10_ms"] > 0


# ---------------------------------------------------------------------------------------------
# End to end: a profile under load is right or marked; a quiet one is marked only for cause


def _time(name, repeat=1, retries=noise.RETRIES):
    """A tnt/vit_nano inference timing on CPU: windows of at least 5 steps of 8 and at least
    ``noise.MIN_WINDOW_S`` (so that the rule can judge them; 5 steps stay bounded when other
    tests load these cores: ~30x slower steps have been seen here)."""
    from suite.models import create_model
    from suite.timing import TimingOptions, time_model

    model = create_model(name)
    opts = TimingOptions("infer", "fp32", warmup=2, steps=5, repeat=repeat, retries=retries)
    return time_model(model, 32, 8, opts, device=torch.device("cpu"))


def _burners(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.slow
def test_a_timing_beside_two_cpu_burners_is_within_1_5x_or_marked():
    quiet = _time("tnt_nano", repeat=2, retries=0)
    reference = 8 / min(r["step_ms"] for r in quiet.repeats) * 1e3  # the least disturbed
    procs = _burners(2)
    try:
        time.sleep(0.3)  # both burning before the timing starts
        assert all(p.poll() is None for p in procs)
        loaded = _time("tnt_nano")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if loaded.noisy_reason:
        assert loaded.conditions["timing_retries"] == noise.RETRIES  # re-timed, then marked
        assert loaded.repeats[0]["noisy_reason"] == loaded.noisy_reason
    else:
        assert loaded.img_per_s >= reference / 1.5, (loaded.img_per_s, reference)


@pytest.mark.slow
def test_a_quiet_timing_is_marked_only_when_others_really_used_the_cores():
    """Other engineers' tests share these cores: a mark is allowed only with evidence. The
    rule's own quiet figures are tested above on synthetic input."""
    t = _time("vit_nano")
    if t.noisy_reason:
        others = [c for r in t.repeats for c in r["other_cpu_attempts"]]
        assert max(others) >= 0.1, (t.noisy_reason, others)
