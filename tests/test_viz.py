"""Feature visualisation: maps laid out right, PNGs written and not blank, spread logged."""

import pytest
import torch
from conftest import tiny_sets
from PIL import Image

from suite.cli import main
from suite.config import load_config
from suite.models import create_model
from suite.outputs.report import build_report
from suite.outputs.viz import extract, parse_layers, pixel_map, spread
from suite.tracking import make_tracker
from suite.training.fit import fit

TINY = tiny_sets({"data.train_size": 192, "train.epochs": 2, "model.depth": 2, "train.lr": 2e-3})


def test_pixel_map_layout_at_first_block_input():
    """A model whose embedding copies the image (delta kernels, no position tables): the
    laid-out layer-0 map must be the image sampled at the token positions, patch by patch."""
    img = torch.zeros(1, 3, 32, 32)
    # patches (8x8) differ by a known pattern: value = patch index, plus a ramp inside
    for r in range(4):
        for s in range(4):
            img[0, 0, r * 8 : r * 8 + 8, s * 8 : s * 8 + 8] = 10 * (r * 4 + s)
    img[0, 0] += torch.arange(32.0).view(1, 32) / 100  # column ramp: order inside patches
    tnt = create_model("tnt_nano", depth=1, pixel_pos_embed=False, patch_pos_embed=False).eval()
    with torch.no_grad():
        w = tnt.pixel_embed.proj.weight  # (c, 3, 7, 7); stride = pixel size 2
        w.zero_()
        w[0, 0, 3, 3] = 1.0  # channel 0 = the image's channel 0 at each pixel token's center
        tnt.pixel_embed.proj.bias.zero_()
    fmap, feats = extract(tnt, img, [0])[0]
    assert fmap.shape == (1, tnt.inner_dim, 16, 16)  # 4x4 patches x 4x4 pixels
    torch.testing.assert_close(fmap[0, 0], img[0, 0, ::2, ::2])
    # the patch features are the patch tokens without the class token
    assert feats.shape == (1, 16, tnt.embed_dim)

    vit = create_model("deit_nano_distilled", depth=1, pos_embed=False).eval()
    with torch.no_grad():
        w = vit.patch_embed.proj.weight  # (D, 3, 8, 8)
        w.zero_()
        w[0, 0, 0, 0] = 1.0
        vit.patch_embed.proj.bias.zero_()
    fmap, feats = extract(vit, img, [0])[0]
    assert fmap.shape == (1, vit.embed_dim, 4, 4) and feats.shape == (1, 16, vit.embed_dim)
    torch.testing.assert_close(fmap[0, 0], img[0, 0, ::8, ::8])  # cls and dist tokens dropped


def test_pixel_map_is_the_inverse_of_pixel_embed_order():
    B, g, pg, c = 2, 3, 2, 5
    maps = torch.randn(B, c, g * pg, g * pg)
    # the order PixelEmbed produces: patches row-major, pixels row-major inside a patch
    tokens = maps.reshape(B, c, g, pg, g, pg).permute(0, 2, 4, 3, 5, 1).reshape(B * g * g, -1, c)
    torch.testing.assert_close(pixel_map(tokens, B, g), maps)


def test_spread_is_scale_free_and_zero_for_identical_points():
    f = torch.randn(200, 16)
    a, b = spread(f), spread(f * 37.0)
    assert a["mean_pdist"] == pytest.approx(b["mean_pdist"], rel=1e-9)
    # isotropic Gaussian: distance between two points ~ sqrt(2) times a typical norm
    assert a["mean_pdist"] == pytest.approx(2**0.5, rel=0.1)
    assert a["dim_std"] == pytest.approx(1.0, rel=0.1)
    same = spread(torch.ones(50, 8))
    assert same["mean_pdist"] == pytest.approx(0.0, abs=1e-6) and same["dim_std"] < 1e-6


def test_parse_layers():
    assert parse_layers(None, 12) == [1, 6, 12]
    assert parse_layers("12, 1,6", 12) == [1, 6, 12]
    assert parse_layers("0", 2) == [0]
    from suite.errors import UserError

    for bad in ("13", "a,b", "-1"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viz")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracker = make_tracker(uri)
    ids = []
    for model in ("tnt_nano", "vit_nano"):
        cfg = load_config(
            None,
            [f"model.name={model}", f"train.out_dir={tmp}/runs", "tracking.experiment=viz", *TINY],
        )
        ids.append(fit(cfg, tracker, progress=False).run_id)
    return tmp, uri, ids


@pytest.mark.slow
def test_viz_writes_figures_and_logs_spread(trained, capsys):
    tmp, uri, ids = trained
    out = tmp / "figs"
    rc = main(
        [
            "viz",
            *ids,
            "--images",
            "24",
            "--layers",
            "0,1,2",
            "--maps",
            "2",
            "--out",
            str(out),
            "--tracking-uri",
            uri,
        ]
    )
    assert rc == 0
    text, err = capsys.readouterr()
    stages = [f"viz: loading {ids[0]} ...", f"viz: loading {ids[1]} ...", "viz: features of 24 "]
    stages += [f"viz: t-SNE layer {L} ..." for L in (0, 1, 2)] + ["viz: writing metrics"]
    at = [err.find(s) for s in stages]  # every stage on stderr, in order; none on stdout
    assert -1 not in at and at == sorted(at), err
    assert "viz:" not in text
    assert "mean_pdist" in text and "tnt_nano" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "feature_maps_00.png",
        "feature_maps_01.png",
        "tsne_layer00.png",
        "tsne_layer01.png",
        "tsne_layer02.png",
    ]
    for name in pngs:
        im = Image.open(out / name).convert("L")
        w, h = im.size
        assert w >= 400 and h >= 150  # 3 layers x (1 + 2 runs x 4 channels) panels, or 2 t-SNEs
        lo, hi = im.getextrema()
        assert hi - lo > 100  # not blank
    fm = Image.open(out / "feature_maps_00.png")
    assert fm.size == (round(1.6 * 9 * 100), round(1.7 * 3 * 100))  # 9 columns, 3 layer rows
    # spread metrics on both runs, equal to what viz printed; figures are the runs' artifacts
    tracker = make_tracker(uri)
    for rid in ids:
        m = tracker.get_run(rid).data.metrics
        for layer in (0, 1, 2):
            assert 0 < m[f"viz_layer{layer}_mean_pdist"] < 3
            assert m[f"viz_layer{layer}_dim_std"] > 0
            assert f"{m[f'viz_layer{layer}_mean_pdist']:.4f}" in text
        arts = tracker.list_artifacts(rid, "viz")
        assert sum(a.endswith(".png") for a in arts) == 5
    tnt_m = tracker.get_run(ids[0]).data.metrics
    vit_m = tracker.get_run(ids[1]).data.metrics
    assert tnt_m["viz_layer2_mean_pdist"] != vit_m["viz_layer2_mean_pdist"]

    # the report picks the figures and the spread table up
    rep = build_report(tracker, ["viz"], out=tmp / "report")
    assert "feature_spread" in rep.tables
    sp = rep.tables["feature_spread"]
    assert set(sp["layer"]) == {0, 1, 2} and len(sp) == 6
    assert any(k.startswith("viz_") and "tsne_layer02" in k for k in rep.plots)
    assert "tsne_layer02" in (tmp / "report" / "report.md").read_text()


@pytest.mark.slow
def test_viz_errors_are_one_line(trained, capsys):
    tmp, uri, ids = trained
    assert main(["viz", "0" * 32, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err  # the stage it reached, then one error line
    assert err == f"viz: loading {'0' * 32} ...\n" + err.splitlines()[1] + "\n"
    assert err.splitlines()[1].startswith("tntbench viz: error: run 0000")
    assert main(["viz", ids[0], "--layers", "9", "--tracking-uri", uri]) == 2
    assert "--layers '9'" in capsys.readouterr().err
    assert main(["viz", ids[0], "--device", "tpu", "--tracking-uri", uri]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err
    assert main(["viz", ids[0], "--images", "1", "--tracking-uri", uri]) == 2
    assert "--images 1" in capsys.readouterr().err
