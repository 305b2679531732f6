"""Profiler: fvcore GMACs against the papers and timm, PyTorch cross-check, timing sanity."""

import functools
import json

import pytest
import torch

from suite.cli import main
from suite.models import Attention, create_model, get_entry, list_models
from suite.profile import MAC_OPS, ProfileOptions, count_flops, profile_model


@functools.cache
def flops(name):
    return count_flops(create_model(name), get_entry(name).img_size)


# fvcore GMACs: the paper's FLOPs column (to its 0.1G rounding) and timm's published GMACs
PAPER = {
    "tnt_ti_patch16_224": (1.4, None),
    "tnt_s_patch16_224": (5.2, 5.25),
    "tnt_b_patch16_224": (14.1, 14.10),
    "deit_tiny_patch16_224": (1.3, 1.26),
    "deit_small_patch16_224": (4.6, 4.61),
    "deit_base_patch16_224": (17.6, 17.58),
    "vit_base_patch16_224": (17.6, 17.58),
    "vit_base_patch16_384": (55.5, None),
}


@pytest.mark.parametrize("name", PAPER)
def test_gmacs_match_paper_and_timm(name):
    g = flops(name).gmacs_fvcore
    paper, timm_gmacs = PAPER[name]
    assert get_entry(name).paper.gflops == paper
    assert abs(g - paper) / paper < 0.01 or round(g, 1) == paper, g
    if timm_gmacs is not None:
        assert abs(g - timm_gmacs) / timm_gmacs < 0.01, g


@pytest.mark.parametrize("name", list_models())
def test_fvcore_and_torch_agree_and_nothing_with_macs_is_missed(name):
    f = flops(name)
    assert f.gmacs_fvcore > 0
    assert abs(f.gmacs_fvcore - f.gmacs_torch) / f.gmacs_torch < 0.01
    assert not set(f.unsupported) & MAC_OPS, f.unsupported


def test_sdpa_handle_counts_both_attention_products():
    attn = Attention(dim=48, num_heads=4)
    attn.fused = True

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x[:, 0, 0].reshape(1, 10, 48))

    f = count_flops(Wrap(), img_size=480, in_chans=1)
    linear = 10 * 48 * 48 * 3 + 10 * 48 * 48
    attention = 10 * 10 * 48 * 2  # q k^T and attn v over all heads
    assert f.gmacs_fvcore * 1e9 == pytest.approx(linear + attention)
    assert f.gmacs_torch * 1e9 == pytest.approx(linear + attention)


def _vit_params(img_size, num_classes, patch_size, embed_dim, depth, num_heads):
    """A ViT's parameter count from its shape: patch embedding, class token and positions,
    ``depth`` blocks (2 LayerNorms, qkv and proj, a 4x MLP), the final norm and the head."""
    d, tokens = embed_dim, (img_size // patch_size) ** 2 + 1
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    embed = 3 * patch_size**2 * d + d + d + tokens * d
    return embed + depth * block + 2 * d + d * num_classes + num_classes


def _agrees_with_its_window(img_per_s, batch, conditions):
    """img/s (the batch over the median step) against the window's wall clock: at least half
    the steps take the median or longer, so the window's rate is at most twice img/s; stalls
    lower it, but not tenfold over a window of a second. A unit or batch slip breaks either."""
    rate = batch * conditions["timing_steps"] / conditions["timing_window_s"]
    return rate / 2 <= img_per_s < rate * 10


def test_profile_row_is_consistent():
    opts = ProfileOptions(batch_size=4, mode="train", warmup=1, steps=3)
    row = profile_model("vit_nano", opts, device="cpu")
    assert row.conditions["timing_steps"] >= 3
    assert _agrees_with_its_window(row.img_per_s, 4, row.conditions), (row, row.conditions)
    assert 0 < row.p10_ms <= row.step_ms <= row.p90_ms
    assert row.peak_mb > 0 and 0 < row.mfu < 1.5
    # MFU counts training as 3 x forward = 6 x MACs per image, over the measured peak
    achieved = 6 * row.gmacs_fvcore * 1e9 * row.img_per_s / 1e12
    assert row.mfu == pytest.approx(achieved / row.peak_tflops_measured)
    # every parameter, tokens and positions included, as vit_nano's shape gives them
    assert row.params_m * 1e6 == pytest.approx(_vit_params(**get_entry("vit_nano").kwargs))
    assert row.trainable_params_m == row.params_m


@pytest.mark.slow
def test_profile_cli_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["profile", "tnt_nano", "vit_nano", "--mode", "train", "--json", str(out)]
    assert main(argv + ["--steps", "3", "--warmup", "1", "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "GMACs fvcore" in text and "tnt_nano" in text
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["tnt_nano", "vit_nano"]
    for r in rows:
        for key in ("params_m", "gmacs_fvcore", "gmacs_torch", "img_per_s", "step_ms", "peak_mb"):
            assert r[key] > 0, key
        assert r["mfu"] > 0
        assert _agrees_with_its_window(r["img_per_s"], r["batch_size"], r["conditions"]), r
        assert r["p10_ms"] <= r["step_ms"] <= r["p90_ms"]
        assert abs(r["gmacs_fvcore"] - r["gmacs_torch"]) / r["gmacs_torch"] < 0.01


@pytest.mark.parametrize(
    "argv, words",
    [
        (["profile", "tnt_nano", "--dtype", "fp16", "--device", "cpu"], ["fp16", "CUDA"]),
        (["profile", "nope"], ["unknown model 'nope'"]),
        (["profile", "tnt_nano", "--batch-size", "0"], ["--batch-size"]),
        (["profile", "tnt_nano", "--img-size", "30"], ["img_size=30", "patch_size=8"]),
    ],
)
def test_profile_cli_bad_input_is_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err


@pytest.mark.slow
def test_profile_log_to_mlflow(tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["profile", "vit_nano", "--mode", "infer", "--log", "--tracking-uri", uri]
    assert main(argv + ["--steps", "2", "--warmup", "1", "--batch-size", "4"]) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["profile"])
    assert len(runs) == 1
    r = runs.iloc[0]
    assert r["params.model"] == "vit_nano" and r["status"] == "FINISHED"
    assert r["metrics.gmacs_fvcore"] > 0 and r["metrics.img_per_s"] > 0
