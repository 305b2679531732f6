"""The uint8 input pipeline (issue 23): the same augmentation distribution as today's float
pipeline on a fixed seed, batch-level normalisation/erasing/mixing equal to torchvision's,
corrupt JPEGs named in one line, and data-bound epochs marked."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from suite.config import DataConfig
from suite.errors import UserError
from suite.outputs.report_format import DATA_BOUND_NOTE, present
from suite.training.data import build_datasets, build_mixup
from suite.training.engine import (
    DATA_BOUND_FRAC,
    Criterion,
    StepOptions,
    build_optimizer,
    build_scheduler,
    data_bound,
    train_one_epoch,
)
from suite.training.pipeline import (
    BatchMix,
    BatchPrep,
    PilRandAugment,
    batch_preps,
    dct_reduction,
    decode_rgb,
    erase_params,
    jpeg_header,
    open_image,
    rrc_box,
)
from suite.training.randaugment import _DIV13_MUL, _DIV13_SHIFT, FAST_OPS

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo() -> Image.Image:
    """A real photo (scikit-learn's china.jpg, 640 x 427, shipped with it): texture, edges
    and colour that a flat test image lacks, so that crops and flips change the pixels."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


def _jpeg_folder(root, n_per_class=6, classes=("a", "b")):
    """root/{train,val}/<class>/*.jpg: crops of the photo at ImageNet-like sizes."""
    photo = _photo()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n_per_class):
                w = int(rng.integers(300, 640))
                h = int(rng.integers(250, 427))
                x0, y0 = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
                photo.crop((x0, y0, x0 + w, y0 + h)).save(d / f"{k}.jpg", quality=90)
    return root


def _cfg(root, **kw) -> DataConfig:
    base = dict(random_resized_crop=False, hflip=False, eval_crop_pct=0.875)
    return DataConfig(name="imagefolder", root=str(root), **{**base, **kw})


def _epoch_items(ds, seed, n=None):
    torch.manual_seed(seed)
    return torch.stack([ds[i % len(ds)][0] for i in range(n or len(ds))])


# ---------------------------------------------------------------------------------------------
# The random draws are today's


def test_rrc_box_draws_torchvisions_boxes():
    rrc = v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True)
    for w, h in [(500, 375), (333, 500), (640, 480), (120, 900), (900, 100)]:
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        torch.manual_seed(w)
        ours = [rrc_box(w, h, (0.08, 1.0)) for _ in range(50)]
        torch.manual_seed(w)
        theirs = []
        for _ in range(50):
            p = rrc.make_params([img])
            theirs.append((p["top"], p["left"], p["height"], p["width"]))
        assert ours == theirs, (w, h)
    # the distribution (another seed than torchvision's sample): area fraction and aspect
    torch.manual_seed(0)
    ours = torch.tensor([rrc_box(500, 375, (0.08, 1.0)) for _ in range(4000)], dtype=torch.float)
    img = torch.zeros(3, 375, 500, dtype=torch.uint8)
    torch.manual_seed(1)
    ps = [rrc.make_params([img]) for _ in range(4000)]
    ref = torch.tensor([(p["top"], p["left"], p["height"], p["width"]) for p in ps]).float()
    for b in (ours, ref):
        assert b[:, 2].min() >= 1 and (b[:, 0] + b[:, 2]).max() <= 375
    frac, ref_frac = (b[:, 2] * b[:, 3] / (500 * 375) for b in (ours, ref))
    aspect, ref_aspect = ((b[:, 3] / b[:, 2]).log() for b in (ours, ref))
    assert frac.min() >= 0.075 and abs(frac.mean() - ref_frac.mean()) < 0.015  # both ~0.43
    assert abs(frac.std() - ref_frac.std()) < 0.015
    assert aspect.abs().max() <= math.log(4 / 3) + 0.02
    assert abs(aspect.mean() - ref_aspect.mean()) < 0.02
    assert abs(aspect.std() - ref_aspect.std()) < 0.02


def _record_randaugment(monkeypatch) -> list[tuple[str, float]]:
    """Every RandAugment op applied, with its magnitude, in order."""
    seen: list[tuple[str, float]] = []
    orig = v2.RandAugment._apply_image_or_video_transform

    def spy(self, image, transform_id, magnitude, interpolation, fill):
        seen.append((transform_id, round(float(magnitude), 5)))
        return orig(self, image, transform_id, magnitude, interpolation, fill)

    monkeypatch.setattr(v2.RandAugment, "_apply_image_or_video_transform", spy)
    for op, kernel in list(FAST_OPS.items()):  # PilRandAugment's own kernels of these ops

        def fast_spy(image, magnitude, op=op, kernel=kernel):
            seen.append((op, round(float(magnitude), 5)))
            return kernel(image, magnitude)

        monkeypatch.setitem(FAST_OPS, op, fast_spy)
    return seen


def test_same_crops_flips_and_randaugment_ops_as_today(tmp_path, monkeypatch):
    """On one seed the new pipeline draws today's boxes, flips and RandAugment ops, one by
    one; its images then agree with today's to within the decoders' rounding."""
    root = _jpeg_folder(tmp_path)
    cfg = _cfg(root, random_resized_crop=True, hflip=True, randaugment=True)
    today, _, info = build_datasets(cfg, 64)
    new, _, _ = build_datasets(cfg, 64, uint8=True)
    seen = _record_randaugment(monkeypatch)
    x_today = _epoch_items(today, seed=3, n=48)
    ops_today = list(seen)
    seen.clear()
    x_new = _epoch_items(new, seed=3, n=48)
    assert x_new.dtype == torch.uint8 and x_new.shape == (48, 3, 64, 64)
    assert seen == ops_today and len(seen) == 2 * 48  # num_ops = 2 per image
    assert len({op for op, _ in seen}) >= 8  # the draws cover RandAugment's ops
    # normalised through BatchPrep, the outputs' statistics match today's
    x_new_f, _ = BatchPrep(info.mean, info.std)(x_new, torch.zeros(48, dtype=torch.long))
    for dims in [(0, 2, 3)]:
        torch.testing.assert_close(x_new_f.mean(dims), x_today.mean(dims), atol=0.06, rtol=0)
        torch.testing.assert_close(x_new_f.std(dims), x_today.std(dims), atol=0.06, rtol=0)


def _randaugment_images() -> list[Image.Image]:
    """RGB images for the RandAugment kernels: random ones of odd sizes (down to 3 x 3),
    some with a few levels only (AutoContrast's and Equalize's corner cases), a flat one,
    and crops and resizes of scikit-learn's two photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images = []
    for k in range(12):
        h, w = (int(v) for v in rng.integers(3, 160, 2))
        if k % 3 == 0:  # one to eight levels around a random one
            lo = int(rng.integers(0, 256))
            x = rng.integers(lo, min(256, lo + int(rng.integers(1, 9))), (h, w, 3))
        else:
            x = rng.integers(0, 256, (h, w, 3))
        images.append(Image.fromarray(x.astype(np.uint8)))
    images.append(Image.fromarray(rng.integers(0, 256, (3, 3, 3)).astype(np.uint8)))
    images.append(Image.new("RGB", (64, 48), (7, 200, 30)))
    for photo in load_sample_images().images:
        im = Image.fromarray(photo)
        images += [im.resize((224, 224)), im.crop((100, 50, 324, 274)), im.reduce(3)]
    return images


@pytest.mark.parametrize("op", sorted(FAST_OPS))
def test_fast_randaugment_ops_equal_torchvisions_pil_kernels(op):
    """Each fast colour op gives torchvision's PIL kernel's bytes exactly, on every magnitude
    bin tried (m 0..30), both signs of a signed op, random images and photos."""
    ra = v2.RandAugment()
    magnitudes_fn, signed = ra._AUGMENTATION_SPACE[op]
    images = _randaugment_images()
    for m in (0, 1, 5, 9, 15, 22, 30):
        mags = magnitudes_fn(31, 224, 224)
        magnitude = float(mags[m]) if mags is not None else 0.0
        for sign in (1, -1) if signed else (1,):
            for im in images:
                want = ra._apply_image_or_video_transform(
                    im, op, sign * magnitude, interpolation=ra.interpolation, fill=ra._fill
                )
                got = FAST_OPS[op](im, sign * magnitude)
                assert got.mode == want.mode and got.size == want.size
                assert np.array_equal(np.asarray(got), np.asarray(want)), (op, m, sign, im.size)


def test_smooth_division_by_13_is_exact():
    n = np.arange(13 * 255 + 7, dtype=np.uint32)  # every rounded SMOOTH sum
    assert np.array_equal((n * _DIV13_MUL) >> _DIV13_SHIFT, n // 13)


@pytest.mark.parametrize("magnitude", [9, 20])
def test_pil_randaugment_gives_torchvisions_images_on_a_seed(magnitude, monkeypatch):
    """PilRandAugment with the fast ops, on a fixed seed: the same images as v2.RandAugment
    on PIL and as PilRandAugment with torchvision's kernels only (the draws unchanged)."""
    images = [im for im in _randaugment_images() if min(im.size) >= 8]
    fast, ref = PilRandAugment(magnitude=magnitude), v2.RandAugment(magnitude=magnitude)

    def run(t):
        torch.manual_seed(5)
        return [np.asarray(t(im)) for _ in range(12) for im in images]

    got, want = run(fast), run(ref)
    monkeypatch.setattr("suite.training.pipeline.FAST_OPS", {})
    before = run(PilRandAugment(magnitude=magnitude))
    assert len(got) == len(want) == len(before)
    for a, b, c in zip(got, want, before, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_crop_and_flip_images_equal_todays_without_draft(tmp_path):
    """RandAugment off: same boxes, same flips, same resize kernel; the decoders (PIL's and
    torchvision's libjpeg-turbo) round alike, so the pixels agree to about a level, and
    every flip is where today's is (a flipped crop would differ by tens of levels)."""
    root = _jpeg_folder(tmp_path)
    cfg = _cfg(root, random_resized_crop=True, hflip=True)
    today, _, info = build_datasets(cfg, 48)
    new, _, _ = build_datasets(cfg, 48, uint8=True)
    new.transform.draft = False
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    a = (_epoch_items(today, seed=1, n=40) * std + mean) * 255  # back to pixel levels
    b = _epoch_items(new, seed=1, n=40).float()
    per_image = (a - b).abs().mean((1, 2, 3))
    assert per_image.max() < 2.0, per_image
    # flip rate: each image against its mirror decides whether it was flipped
    torch.manual_seed(1)
    plain, _, _ = build_datasets(_cfg(root, random_resized_crop=True), 48, uint8=True)
    plain.transform.draft = False
    c = _epoch_items(plain, seed=1, n=40).float()  # same draws minus the flip's
    flipped = ((b - c.flip(-1)).abs().mean((1, 2, 3)) < (b - c).abs().mean((1, 2, 3))).float()
    assert 0.25 < flipped.mean() < 0.75


def test_draft_decodes_at_reduced_scale_only_when_the_crop_keeps_the_pixels(tmp_path):
    big = _photo().resize((1280, 854))
    big.save(tmp_path / "big.jpg", quality=90)
    src = open_image(str(tmp_path / "big.jpg"), fallback=lambda p: Image.open(p))
    assert src.size == (1280, 854) and src.mode == "RGB"
    # the whole image to 224: a 1/2 scale decode (640 x 427) still spans 224 both ways
    assert dct_reduction(1280, 854, (224 * 1280 // 854 + 1, 224)) == 2
    x = decode_rgb(src, (336, 224))
    assert x.shape == (3, 427, 640) and x.dtype == torch.uint8
    # a small box: full size (a reduced decode would make the resize upsample)
    assert decode_rgb(src, (1280, 854)).shape == (3, 854, 1280)
    # the draft keeps the picture: against the full decode resized alike, a few levels at most
    full = torch.nn.functional.interpolate(
        decode_rgb(src, None)[None].float(), size=(427, 640), mode="bilinear", antialias=True
    )[0]
    assert (full - x.float()).abs().mean() < 4
    # and the pipeline's statistics with draft on agree with it off
    root = _jpeg_folder(tmp_path / "f")
    cfg = _cfg(root, random_resized_crop=True)
    on, _, _ = build_datasets(cfg, 32, uint8=True)
    off, _, _ = build_datasets(cfg, 32, uint8=True)
    off.transform.draft = False
    a, b = _epoch_items(on, seed=0).float(), _epoch_items(off, seed=0).float()
    # at 32 px most crops decode at 1/4 or 1/8 scale: the box lands on the reduced grid (a
    # shift under half a reduced pixel, under 1/64 of the box) and libjpeg's DCT scaling
    # filters differently: pixels move a little, the statistics not
    torch.testing.assert_close(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=2.0, rtol=0)
    torch.testing.assert_close(a.std((0, 2, 3)), b.std((0, 2, 3)), atol=2.0, rtol=0)
    assert (a - b).abs().mean() < 8


def test_eval_path_uint8_matches_todays(tmp_path):
    root = _jpeg_folder(tmp_path)
    _, va_today, info = build_datasets(_cfg(root), 64)
    _, va_new, _ = build_datasets(_cfg(root), 64, uint8=True)
    x_new = _epoch_items(va_new, 0)
    assert x_new.dtype == torch.uint8
    x_new_f, _ = batch_preps(_cfg(root), info.mean, info.std, 2)[1](x_new, torch.zeros(1))
    x_today = _epoch_items(va_today, 0)
    # resize + crop in one box here, two steps today: within a few levels (std ~ 0.02)
    assert (x_new_f - x_today).abs().mean() < 0.06
    torch.testing.assert_close(x_new_f.mean((0, 2, 3)), x_today.mean((0, 2, 3)), atol=0.02, rtol=0)


def test_jpeg_over_the_decompression_bomb_limit_goes_to_the_rgb_loader(tmp_path, monkeypatch):
    Image.new("RGB", (60, 50)).save(tmp_path / "big.jpg")
    seen = []

    def loader(path):
        seen.append(path)
        raise Image.DecompressionBombError("too many pixels")

    assert open_image(str(tmp_path / "big.jpg"), loader).size == (60, 50)  # under the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        open_image(str(tmp_path / "big.jpg"), loader)
    assert seen == [str(tmp_path / "big.jpg")]


def test_jpeg_header_agrees_with_pil(tmp_path):
    for mode, kw in [("RGB", {}), ("L", {"progressive": True}), ("CMYK", {})]:
        Image.new(mode, (37, 21)).save(tmp_path / f"{mode}.jpg", **kw)
        data = (tmp_path / f"{mode}.jpg").read_bytes()
        assert jpeg_header(data) == ((37, 21), mode)
    assert jpeg_header(b"\x89PNG\r\n") is None and jpeg_header(b"\xff\xd8\xff") is None


# ---------------------------------------------------------------------------------------------
# Batch level: normalisation, erasing, mixing


def test_batch_prep_normalises_with_datainfo_mean_std():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out, y = BatchPrep(MEAN, STD)(x, torch.arange(4))
    want = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert torch.equal(y, torch.arange(4)) and out.dtype == torch.float32
    # a float batch (another loader) passes unchanged
    assert BatchPrep(MEAN, STD)(want, y)[0] is want


def test_synthetic_uint8_items_through_batch_prep_equal_float_items():
    cfg = DataConfig(train_size=20, val_size=8, random_resized_crop=False, hflip=False)
    tr_f, va_f, info = build_datasets(cfg, 32)
    tr_u, va_u, _ = build_datasets(cfg, 32, uint8=True)
    prep = BatchPrep(info.mean, info.std)
    for f, u in ((tr_f, tr_u), (va_f, va_u)):
        xu = torch.stack([u[i][0] for i in range(len(u))])
        assert xu.dtype == torch.uint8
        xf = torch.stack([f[i][0] for i in range(len(f))])
        torch.testing.assert_close(prep(xu, torch.zeros(1))[0], xf, atol=1e-5, rtol=0)


def test_erase_params_follow_random_erasing():
    torch.manual_seed(0)
    n, H, W, p = 6000, 224, 224, 0.25
    boxes = erase_params(n, H, W, p)
    top, left, h, w = boxes.unbind(1)
    erased = h > 0
    # torchvision's, per image
    re = v2.RandomErasing(p=1.0)
    img = torch.zeros(3, H, W)
    ref = torch.tensor([[d["h"], d["w"]] for d in (re.make_params([img]) for _ in range(3000))])
    assert abs(erased.float().mean() - p) < 0.02
    assert ((top + h <= H) & (left + w <= W) & (top >= 0) & (left >= 0)).all()
    frac = (h * w)[erased].float() / (H * W)
    ref_frac = (ref[:, 0] * ref[:, 1]).float() / (H * W)
    assert abs(frac.mean() - ref_frac.mean()) < 0.015  # ~0.16: uniform(0.02, 0.33) less misses
    assert abs((h[erased].float() / w[erased]).log().mean()) < 0.08
    # the boxes are filled with 0 (the mean colour after normalisation), nothing else
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(1)
    out, _ = BatchPrep(MEAN, STD, random_erasing=1.0)(x, torch.zeros(64))
    zeros = (out == 0).all(1)  # (B, H, W)
    assert 0.02 * 64 * 256 < zeros.sum() < 0.4 * 64 * 256
    ref_out, _ = BatchPrep(MEAN, STD)(x, torch.zeros(64))
    torch.testing.assert_close(
        out[~zeros[:, None].expand_as(out)], ref_out[~zeros[:, None].expand_as(out)]
    )


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_batch_mix_equals_torchvision_mixup_cutmix(mixup, cutmix):
    cfg = DataConfig(mixup=mixup, cutmix=cutmix)
    theirs = build_mixup(cfg, 10)
    ours = BatchMix(mixup, cutmix, 10)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    for seed in range(6):
        torch.manual_seed(seed)
        want_x, want_y = theirs(x, y)
        torch.manual_seed(seed)
        got_x, got_y = ours(x.clone(), y)
        torch.testing.assert_close(got_x, want_x)
        torch.testing.assert_close(got_y, want_y)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_batch_prep_with_mix_equals_erase_then_torchvision_mix(mixup, cutmix):
    """uint8 in: BatchPrep's fused mixing (no float roll; erased boxes taken out after) gives
    today's order exactly: normalise, erase, then v2.MixUp / v2.CutMix."""
    fused = BatchPrep(MEAN, STD, 0.5, BatchMix(mixup, cutmix, 10))
    plain = BatchPrep(MEAN, STD, 0.5)
    theirs = build_mixup(DataConfig(mixup=mixup, cutmix=cutmix), 10)
    x = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    y = torch.arange(8) % 10
    for seed in range(8):
        torch.manual_seed(seed)
        got_x, got_y = fused(x, y)
        torch.manual_seed(seed)
        want_x, want_y = theirs(*plain(x, y))
        torch.testing.assert_close(got_x, want_x, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_y, want_y)


# ---------------------------------------------------------------------------------------------
# Bad files


def _corrupt(root):
    bad = root / "train" / "a" / "bad.jpg"
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # a JPEG cut short: header fine, data truncated
    return bad


def test_corrupt_jpeg_is_one_line_naming_the_file(tmp_path):
    root = _jpeg_folder(tmp_path, n_per_class=2)
    bad = _corrupt(root)
    tr, _, _ = build_datasets(_cfg(root, random_resized_crop=True), 32, uint8=True)
    i = next(k for k, (p, _) in enumerate(tr.samples) if p == str(bad))
    with pytest.raises(UserError) as e:
        tr[i]
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "data.skip_bad_images" in msg


def test_corrupt_jpeg_skipped_and_counted(tmp_path, capsys):
    root = _jpeg_folder(tmp_path, n_per_class=2)
    bad = _corrupt(root)
    cfg = _cfg(root, random_resized_crop=True, skip_bad_images=True)
    tr, _, _ = build_datasets(cfg, 32, uint8=True)
    xs = [tr[k][0] for k in range(len(tr))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.uint8 for x in xs)
    assert tr.skipped == {str(bad)}
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A data-bound epoch is marked


class SlowDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, delay_s: float) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(self.delay_s)
        return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), i % 10


def _epoch(delay_s: float) -> dict[str, float]:
    from suite.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10, depth=1)
    loader = DataLoader(SlowDataset(32, delay_s), batch_size=8)
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=1, lr=1e-3, min_lr=1e-5)
    prep = BatchPrep((0.5,) * 3, (0.5,) * 3, 0.25, BatchMix(0.8, 1.0, 10))
    opts = StepOptions(prep=prep)
    return train_one_epoch(model, loader, opt, sched, Criterion(), torch.device("cpu"), opts)


def test_data_bound_epoch_is_marked():
    slow = _epoch(delay_s=0.03)  # ~1 s of stalls in a short epoch
    assert slow["data_wait_frac"] == pytest.approx(slow["data_wait_s"] / slow["epoch_s"])
    assert slow["data_wait_frac"] > 0.5
    reason = data_bound(slow)
    assert reason.startswith("waited for data") and "%" in reason
    assert data_bound({**slow, "data_wait_frac": DATA_BOUND_FRAC / 2}) == ""
    assert data_bound({}) == ""  # metrics of runs logged before the mark existed


def test_report_marks_data_bound_rows():
    df = pd.DataFrame(
        {
            "model": ["a", "b"],
            "train img/s": [100.0, 200.0],
            "timing_noisy": ["", ""],
            "data_bound": ["epoch 1: waited for data 40% of the wall time", ""],
        }
    )
    shown = present(df)
    col = list(shown.cells["train img/s"])
    assert col[0].endswith("†") and not col[1].endswith("†")
    assert DATA_BOUND_NOTE in shown.notes


def test_batch_prep_reusing_its_output_gives_the_same_batches():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(6)
    for mix in (None, BatchMix(0.8, 1.0, 6)):
        fresh = BatchPrep(MEAN, STD, 0.5, mix)
        reuse = BatchPrep(MEAN, STD, 0.5, mix, reuse_output=True)
        outs = []
        for seed in range(4):
            torch.manual_seed(seed)
            want = fresh(x, y)
            torch.manual_seed(seed)
            got = reuse(x, y)
            torch.testing.assert_close(got, want)
            outs.append(got[0])
        # one buffer (two with MixUp's partner): the next batch overwrites the last
        assert len({o.data_ptr() for o in outs}) == 1


def test_training_data_is_uint8_normalised_per_batch_with_datainfo_stats():
    """fit's loaders carry uint8; their BatchPrep uses the dataset's DataInfo mean/std and the
    config's erasing and mixing; eval's only normalises."""
    from suite.config import load_config
    from suite.training.fit import build_data

    sets = ["data.train_size=16", "data.val_size=8", "data.random_erasing=0.25"]
    sets += ["data.mixup=0.8", "data.cutmix=1.0", "train.batch_size=8", "model.name='vit_nano'"]
    data = build_data(load_config(None, sets), torch.device("cpu"))
    x, y = next(iter(data.train))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    assert (data.prep.mean, data.prep.std) == (data.info.mean, data.info.std)
    assert data.prep.random_erasing == 0.25 and data.prep.mix is not None
    assert data.eval_prep.random_erasing == 0 and data.eval_prep.mix is None
    xf, soft = data.prep(x, y)
    assert xf.dtype == torch.float32 and soft.shape == (8, 10)
