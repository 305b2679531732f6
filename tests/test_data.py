"""Data: the synthetic generator, CIFAR and ImageFolder loaders on tiny files, transforms, mixup."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from suite.config import DataConfig
from suite.errors import UserError
from suite.training.data import (
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_datasets,
    build_mixup,
    class_grid,
    make_synthetic,
    pair_class,
    synthetic_classes,
)

# every random transform off: items are the stored images, only scaled and normalised
PLAIN = dict(random_resized_crop=False, hflip=False)


def _small(**kw) -> DataConfig:
    return DataConfig(**{"train_size": 60, "val_size": 20, **kw})


def _items(ds, n=None):
    n = len(ds) if n is None else n
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_per_seed():
    tr_a, va_a, info_a = build_datasets(_small(**PLAIN), 32)
    tr_b, va_b, info_b = build_datasets(_small(**PLAIN), 32)
    tr_c, _, info_c = build_datasets(_small(seed=1, **PLAIN), 32)
    assert info_a == info_b and len(info_a.digest) == 16
    int(info_a.digest, 16)  # hex
    assert torch.equal(_items(tr_a)[0], _items(tr_b)[0])
    assert torch.equal(_items(va_a)[0], _items(va_b)[0])
    assert info_c.digest != info_a.digest
    assert not torch.equal(_items(tr_c)[0], _items(tr_a)[0])
    assert info_a.source == "synthetic(seed=0,train=60,val=20,img=32,classes=10)"
    assert (info_a.train_size, info_a.val_size, info_a.num_classes) == (60, 20, 10)
    assert info_a.mean == info_a.std == (0.5, 0.5, 0.5)


def test_synthetic_items_are_normalised_stored_images():
    tr, va, _ = build_datasets(_small(**PLAIN), 32)
    for ds in (tr, va):
        names = [type(t).__name__ for t in ds.transform.transforms]
        assert "Resize" not in names and "CenterCrop" not in names  # native 32 == model 32
        x, y = ds[3]
        assert x.dtype == torch.float32 and type(x) is torch.Tensor and isinstance(y, int)
        torch.testing.assert_close(x, ds.images[3].float() / 255 * 2 - 1)


@pytest.mark.parametrize("k", [2, 3, 7, 10])
def test_synthetic_labels_balanced_and_in_range(k):
    x, y = make_synthetic(10 * k + 3, 16, k, seed=0, split=0)
    assert x.shape == (10 * k + 3, 3, 16, 16) and x.dtype == torch.uint8
    counts = torch.bincount(y, minlength=k)
    assert y.min() >= 0 and y.max() < k and counts.max() - counts.min() <= 1
    assert len(synthetic_classes(k)) == k
    # every class mixes textures and layouts: neither one alone names it
    n_tex, n_lay = class_grid(k)
    assert n_tex >= 2 and n_lay >= 2 and set(pair_class(k).flatten().tolist()) == set(range(k))
    for t in range(n_tex):
        assert len(set(pair_class(k)[t].tolist())) == n_lay  # a texture spans n_lay classes
    for l in range(n_lay):
        assert len(set(pair_class(k)[:, l].tolist())) == min(k, n_tex)


def test_synthetic_train_and_val_differ():
    x_tr, _ = make_synthetic(50, 32, 10, seed=0, split=0)
    x_va, _ = make_synthetic(50, 32, 10, seed=0, split=1)
    assert not (x_tr[:, None] == x_va[None]).flatten(2).all(-1).any()  # no shared image
    # same distribution: the mean colour agrees to a few levels
    assert abs(x_tr.float().mean() - x_va.float().mean()) < 8


def _texture_and_layout_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: anisotropy log(|d/dy| / |d/dx|) of the grey image (fine texture inside the
    patches), and the share of that edge energy in the central half of the columns (layout)."""
    g = x.float().mean(1)  # (n, S, S)
    dy, dx = (g[:, 1:] - g[:, :-1]).abs(), (g[:, :, 1:] - g[:, :, :-1]).abs()
    aniso = dy.mean((1, 2)).log() - dx.mean((1, 2)).log()
    energy = F.pad(dy, (0, 0, 0, 1)) + F.pad(dx, (0, 1))  # (n, S, S)
    s = g.shape[-1]
    centre = energy[:, :, s // 4 : 3 * s // 4].sum((1, 2)) / energy.sum((1, 2))
    return aniso, centre


def test_synthetic_classes_carry_texture_and_layout_signal():
    names = synthetic_classes(10)
    assert names[0] == "hstripe4/mid-centre" and names[1] == "vstripe4/mid-centre"
    assert names[5] == "hstripe4/mid-pair"
    x, y = make_synthetic(300, 32, 10, seed=0, split=0)
    aniso, centre = _texture_and_layout_features(x)
    a = [aniso[y == c].mean().item() for c in range(10)]
    m = [centre[y == c].mean().item() for c in range(10)]
    # same layout, other texture (horizontal vs vertical stripes): texture feature flips sign,
    # layout feature unchanged
    assert a[0] > 1 and a[1] < -1 and abs(m[0] - m[1]) < 0.1
    # same texture, other layout (centred block vs left/right pair): the reverse
    assert m[0] > 0.7 and m[5] < 0.45 and a[5] > 1
    # the texture lives at the 2-4 px scale: a 4x4 box blur removes most of its contrast
    blurred = F.avg_pool2d(x.float(), 4)
    assert blurred.std((2, 3)).mean() < 0.75 * x.float().std((2, 3)).mean()


def test_build_datasets_resizes_to_model_input():
    for kw in (PLAIN, {}, dict(randaugment=True, random_erasing=0.5)):
        tr, va, info = build_datasets(_small(img_size=48, **kw), 32)
        assert tr.images.shape[-1] == 48 and "img=48" in info.source
        assert tr[0][0].shape == (3, 32, 32) and va[0][0].shape == (3, 32, 32)


def test_random_transforms_follow_torch_seed_and_pickle():
    cfg = _small(randaugment=True, random_erasing=0.5, crop_scale_min=0.3)
    tr, _, _ = build_datasets(cfg, 32)
    torch.manual_seed(5)
    a = tr[7][0]
    clone = pickle.loads(pickle.dumps(tr))
    torch.manual_seed(5)
    torch.testing.assert_close(clone[7][0], a, rtol=0, atol=0)
    # DataLoader workers (pickled or forked) are seeded from the main RNG: same batches again
    batches = []
    for _ in range(2):
        torch.manual_seed(3)
        dl = DataLoader(tr, batch_size=16, shuffle=True, num_workers=1)
        batches.append(next(iter(dl)))
    assert batches[0][0].shape == (16, 3, 32, 32) and batches[0][1].dtype == torch.int64
    torch.testing.assert_close(batches[0][0], batches[1][0], rtol=0, atol=0)
    assert torch.equal(batches[0][1], batches[1][1])


# ---------------------------------------------------------------------------------------------
# CIFAR: tiny files in torchvision's pickle format


def _write_batch(path, n, label_key, num_classes, rng):
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows are CHW flattened
    labels = [i % num_classes for i in range(n)]
    entry = {"data": data, label_key: labels, "batch_label": path.name}
    if label_key == "fine_labels":
        entry["coarse_labels"] = [lab // 5 for lab in labels]
    path.write_bytes(pickle.dumps(entry, protocol=2))
    return data, labels


def _write_cifar10(root, per_batch=4):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", per_batch, "labels", 10, rng)
    test = _write_batch(folder / "test_batch", 10, "labels", 10, rng)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return names, test


def test_cifar10_loads_torchvision_format(tmp_path):
    names, (test_data, test_labels) = _write_cifar10(tmp_path)
    tr, va, info = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    assert (info.name, info.num_classes, info.classes) == ("cifar10", 10, tuple(names))
    assert (len(tr), len(va), info.train_size, info.val_size) == (20, 10, 20, 10)
    assert info.mean == CIFAR10_MEAN and info.source == str(tmp_path) and len(info.digest) == 16
    x, y = tr[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert va[0][0].shape == (3, 32, 32)  # eval: resize 36, centre crop 32
    # exact pixels with resize/crop/flip off; labels in file order
    cfg = DataConfig(name="cifar10", root=str(tmp_path), eval_crop_pct=1.0, **PLAIN)
    _, va, info2 = build_datasets(cfg, 32)
    assert info2.digest == info.digest
    xs, ys = _items(va)
    assert ys.tolist() == test_labels
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    raw = torch.from_numpy(test_data).view(-1, 3, 32, 32).float() / 255
    torch.testing.assert_close(xs * std + mean, raw, atol=1e-5, rtol=0)


def test_cifar100_loads_torchvision_format(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _, train_labels = _write_batch(folder / "train", 200, "fine_labels", 100, rng)
    _write_batch(folder / "test", 100, "fine_labels", 100, rng)
    names = [f"class{i:02d}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    tr, va, info = build_datasets(DataConfig(name="cifar100", root=str(tmp_path), **PLAIN), 32)
    assert (info.num_classes, info.classes, len(tr), len(va)) == (100, tuple(names), 200, 100)
    xs, ys = _items(tr, 10)
    assert xs.shape == (10, 3, 32, 32) and ys.tolist() == train_labels[:10]


def test_cifar_malformed_file_is_a_user_error(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), 32)
    assert "data.root" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _write_folder(root, classes, sizes=((40, 30), (24, 36))):
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for j, (w, h) in enumerate(sizes):
                colour = (40 * ci + 20 * j, 200 - 30 * ci, 90)
                Image.new("RGB", (w, h), colour).save(d / f"{j}.png")
    # a grayscale image among the RGB ones
    Image.new("L", (33, 33), 128).save(root / "train" / classes[0] / "gray.png")


def test_imagefolder_loads_rgb_and_grayscale(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"])
    tr, va, info = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)), 32)
    assert (info.classes, info.num_classes, len(tr), len(va)) == (("cat", "dog"), 2, 5, 4)
    assert info.mean == IMAGENET_MEAN and len(info.digest) == 16
    for ds in (tr, va):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and y in (0, 1)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), **PLAIN)
    tr, _, _ = build_datasets(cfg, 32)
    gray = [i for i, (p, _) in enumerate(tr.samples) if p.endswith("gray.png")][0]
    x, y = tr[gray]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(
        x * std + mean, torch.full((3, 32, 32), 128 / 255), atol=1e-4, rtol=0
    )
    assert y == 0
    # the digest follows the file list
    (tmp_path / "val" / "dog" / "extra.png").write_bytes((tmp_path / "val/dog/0.png").read_bytes())
    assert build_datasets(cfg, 32)[2].digest != info.digest


def test_imagefolder_class_lists_must_match(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"])
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(UserError) as e:
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)), 32)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "train") in msg and str(tmp_path / "val") in msg
    assert "dog" in msg and "wolf" in msg


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder"])
def test_missing_root_is_a_one_line_user_error(tmp_path, name):
    for root in (tmp_path / "nowhere", tmp_path):  # absent; present but empty
        with pytest.raises(UserError) as e:
            build_datasets(DataConfig(name=name, root=str(root)), 32)
        msg = str(e.value)
        assert msg.startswith("data.root") and "\n" not in msg and "expected" in msg
    with pytest.raises(UserError, match="data.root"):
        build_datasets(DataConfig(name=name, root=""), 32)


def test_imagefolder_missing_val_is_a_user_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no val/ folder"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)), 32)


# ---------------------------------------------------------------------------------------------
# MixUp / CutMix


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    mix = build_mixup(DataConfig(mixup=mixup, cutmix=cutmix), num_classes=10)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    for _ in range(3):  # RandomChoice: either op
        out, soft = mix(images, labels)
        assert out.shape == images.shape and soft.shape == (8, 10)
        assert soft.min() >= 0 and ((soft > 0).sum(1) <= 2).all()  # own label + one partner
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert (soft[torch.arange(8), labels] > 0).all()


def test_mixup_off_is_none():
    assert build_mixup(DataConfig(), 10) is None
