"""Datasets for training and evaluation: a procedural synthetic set, CIFAR-10/100, ImageFolder.

``build_datasets`` returns (train, val, DataInfo); every item is (float tensor (3, S, S)
normalised, int label) with S the model's input size. ``build_mixup`` returns the batch-level
MixUp/CutMix callable the training loop applies to (images, labels).

The synthetic set is the default: made in memory in well under a second, yet its classes need
both the detail inside each 8x8 patch and the layout across patches. Each class is a (texture,
layout) pair. The texture is a square-wave pattern of period 2-4 px (stripes, checkers, diagonal
checkers) that lives inside the patches and averages out over any 4x4 block; the layout is
where the textured blocks sit (which band, one centred block or a left/right pair). Colours,
contrast, phase, block position and size, background gradient and pixel noise are random
nuisances. Textures and layouts are symmetric under a horizontal flip, so ``hflip`` keeps every
label valid; ``random_resized_crop`` does not (it rescales the texture and moves the blocks),
and the synthetic val set is always evaluated on the whole image (``eval_crop_pct`` is for
photographs: a crop would cut blocks at the border and rescale the texture).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import stat
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2

from suite.config import DATASETS, DataConfig
from suite.errors import UserError, first_line
from suite.training.cifar import load_cifar
from suite.training.pipeline import open_image, pil_transforms

SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.5, 0.5, 0.5)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataInfo:
    name: str  # "synthetic", "cifar10", "cifar100", "imagefolder"
    num_classes: int
    classes: tuple[str, ...]
    train_size: int
    val_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str  # sha256 of the content, first 16 hex chars
    source: str  # root path, or the synthetic generator's parameters


# ---------------------------------------------------------------------------------------------
# Synthetic: class = (texture, layout)

_KINDS = ("hstripe", "vstripe", "check", "dcheck")
_PERIODS = (4, 2, 3, 5, 6, 7, 8)  # px; 4 and 2 first: the fine scale inside an 8x8 patch


def texture_specs(n: int) -> list[tuple[str, int]]:
    """The first ``n`` textures as (kind, period in px)."""
    # a diagonal checker of period 2 collapses into 1-px stripes at integer pixels: skipped
    specs = [(k, p) for p in _PERIODS for k in _KINDS if (k, p) != ("dcheck", 2)]
    if n > len(specs):  # more than 27 textures: longer periods, coarser but still distinct
        specs += [(k, p) for p in range(9, 9 + n) for k in _KINDS][: n - len(specs)]
    return specs[:n]


def class_grid(num_classes: int) -> tuple[int, int]:
    """(textures T, layouts L), both >= 2 and T * L >= num_classes.

    Few layouts, more textures: a from-scratch transformer learns positions more slowly than
    textures, and with L ~ sqrt(K) / 2 both are learnt within a few epochs.
    """
    n_lay = max(2, round(math.sqrt(num_classes) / 2))
    return max(2, math.ceil(num_classes / n_lay)), n_lay


def pair_class(num_classes: int) -> Tensor:
    """(T, L) int64 table: the class of texture t in layout l.

    Row-major numbering, wrapped modulo K; where K divides T (K = 2) each layout shifts the
    textures by one instead, so that no class is told by its texture or its layout alone.
    """
    n_tex, n_lay = class_grid(num_classes)
    t = torch.arange(n_tex).view(-1, 1)
    l = torch.arange(n_lay).view(1, -1)
    step = n_tex + 1 if n_tex % num_classes == 0 else n_tex
    return (t + l * step) % num_classes


def layout_name(l: int, n_layouts: int) -> str:
    rows = math.ceil(n_layouts / 2)
    row = {1: ["mid"], 2: ["top", "bottom"], 3: ["top", "mid", "bottom"]}.get(rows)
    where = row[l // 2] if row else f"row{l // 2}"
    return f"{where}-{'pair' if l % 2 else 'centre'}"


def synthetic_classes(num_classes: int) -> tuple[str, ...]:
    """Class names: texture/layout, pairs joined by '|' where a class has several."""
    n_tex, n_lay = class_grid(num_classes)
    tex = texture_specs(n_tex)
    table = pair_class(num_classes)
    names: list[list[str]] = [[] for _ in range(num_classes)]
    for l in range(n_lay):
        for t in range(n_tex):
            names[int(table[t, l])].append(f"{tex[t][0]}{tex[t][1]}/{layout_name(l, n_lay)}")
    return tuple("|".join(n) for n in names)


def _square_wave(x: Tensor) -> Tensor:
    """+-1 by the sign of cos(x): a hard-edged grating of full contrast at any phase."""
    return torch.where(torch.cos(x) >= 0, 1.0, -1.0)


def _uniform(g: torch.Generator) -> Callable[..., Tensor]:
    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:  # uniform in [lo, hi)
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    return u


def _textures(tex_id: Tensor, n_tex: int, size: int, u: Callable[..., Tensor]) -> Tensor:
    """(n, S, S) in {-1, +1}: each image's texture kind and period, random phases."""
    n = tex_id.shape[0]
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1)  # (1, S, 1) row index
    xs = torch.arange(size, dtype=torch.float32).view(1, 1, size)  # (1, 1, S) column index
    specs = texture_specs(n_tex)
    kind = torch.tensor([_KINDS.index(specs[t][0]) for t in range(n_tex)])[tex_id]
    period = torch.tensor([float(specs[t][1]) for t in range(n_tex)])[tex_id].view(n, 1, 1)
    ph1, ph2 = u(n, 1, 1, hi=2 * math.pi), u(n, 1, 1, hi=2 * math.pi)
    wy, wx = 2 * math.pi * ys / period, 2 * math.pi * xs / period  # (n, S, 1), (n, 1, S)
    patterns = torch.stack(
        [
            _square_wave(wy + ph1).expand(n, size, size),
            _square_wave(wx + ph1).expand(n, size, size),
            _square_wave(wx + ph1) * _square_wave(wy + ph2),
            # diamonds: u = x + y and w = x - y share parity at integer pixels, so a diagonal
            # checker needs twice the period along u and w not to collapse into stripes
            _square_wave((wx + wy) / 2 + ph1) * _square_wave((wx - wy) / 2 + ph2),
        ]
    )  # (4, n, S, S)
    return patterns.gather(0, kind.view(1, n, 1, 1).expand(1, n, size, size))[0]


def _layout_mask(lay_id: Tensor, n_lay: int, size: int, u: Callable[..., Tensor]) -> Tensor:
    """(n, 1, S, S) in {0, 1}: the band (row) and arrangement (one centred block, or a
    mirrored pair) of each image's blocks, their positions jittered."""
    n, S = lay_id.shape[0], float(size)
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    band = S / math.ceil(n_lay / 2)
    row, is_pair = (lay_id // 2).float(), (lay_id % 2).bool()
    jit = S / 16  # position jitter, px: blocks never sit on the patch grid the same way twice
    cy = (row + 0.5) * band + u(n, lo=-jit, hi=jit)
    hh = 0.34 * band * u(n, lo=0.8, hi=1.2)  # half height
    hw = torch.where(is_pair, S / 8, S / 4) * u(n, lo=0.8, hi=1.2)  # half width
    cx1 = torch.where(is_pair, 0.2 * S, 0.5 * S) + u(n, lo=-jit, hi=jit)
    cx2 = torch.where(is_pair, 0.8 * S, 0.5 * S) + u(n, lo=-jit, hi=jit)

    def v(t: Tensor) -> Tensor:  # (n,) -> (n, 1, 1) for broadcasting against (S, S)
        return t.view(n, 1, 1)

    in_rows = (ys - v(cy)).abs() <= v(hh)  # (n, S, 1)
    in_cols = ((xs - v(cx1)).abs() <= v(hw)) | ((xs - v(cx2)).abs() <= v(hw))  # (n, 1, S)
    return (in_rows & in_cols).unsqueeze(1).float()


def make_synthetic(
    n: int, size: int, num_classes: int, seed: int, split: int
) -> tuple[Tensor, Tensor]:
    """``n`` images (n, 3, size, size) uint8 and balanced labels (n,) int64.

    ``split`` (0 train, 1 val) picks an independent random stream: same distribution, other
    samples, and the train set does not change when only the val size does.
    """
    g = torch.Generator().manual_seed(2 * seed + split)
    n_tex, n_lay = class_grid(num_classes)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    # each image: one of its class's (texture, layout) pairs, uniformly
    pairs = pair_class(num_classes).flatten()  # (T*L,) class of pair p = t * L + l
    per_class = [torch.nonzero(pairs == c).flatten() for c in range(num_classes)]
    counts = torch.tensor([len(p) for p in per_class])
    table = torch.nn.utils.rnn.pad_sequence(per_class, batch_first=True)  # (K, max count)
    pick = (torch.rand(n, generator=g) * counts[labels]).long()
    pair = table[labels, pick]  # (n,)
    tex_id, lay_id = pair // n_lay, pair % n_lay

    u = _uniform(g)
    texture = _textures(tex_id, n_tex, size, u)  # (n, S, S) in {-1, +1}
    mask = _layout_mask(lay_id, n_lay, size, u)  # (n, 1, S, S) in {0, 1}
    S = float(size)
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1)  # (1, S, 1) row index
    xs = torch.arange(size, dtype=torch.float32).view(1, 1, size)  # (1, 1, S) column index

    # colours: a tinted mid-grey background with a random linear gradient; the texture
    # alternates between m + d and m - d around its own mean m (close to, but not the
    # background's), d mostly grey (luminance contrast) with a random tint. Calibrated so that
    # tnt_nano reaches ~50-70% on 10 classes in 5 epochs (2000 images, AdamW 1e-3) while a copy
    # box-blurred over 4x4 blocks (no texture left) stays at 10-20%.
    bg = 0.5 + 0.15 * u(n, 3, 1, 1, lo=-1, hi=1)  # (n, 3, 1, 1)
    theta = u(n, 1, 1, 1, hi=2 * math.pi)
    ramp = (torch.cos(theta) * xs.unsqueeze(1) + torch.sin(theta) * ys.unsqueeze(1)) / S - 0.5
    bg = bg + 0.1 * u(n, 3, 1, 1, lo=-1, hi=1) * ramp  # (n, 3, S, S)
    m = 0.5 + 0.1 * u(n, 3, 1, 1, lo=-1, hi=1)
    tint = torch.randn(n, 3, 1, 1, generator=g)
    d = 0.3 * tint / tint.norm(dim=1, keepdim=True) + 0.7 / math.sqrt(3)  # norm >= 0.4
    d = d / d.norm(dim=1, keepdim=True) * math.sqrt(3) * u(n, 1, 1, 1, lo=0.25, hi=0.4)
    img = bg + mask * (m + d * texture.unsqueeze(1) - bg)  # (n, 3, S, S) in ~[0, 1]
    img = img + u(n, 1, 1, 1, hi=0.02) * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


# ---------------------------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2, on uint8 (3, H, W) images)


def train_transform(
    cfg: DataConfig,
    img_size: int,
    native: int | None,
    mean: tuple,
    std: tuple,
    uint8: bool = False,
) -> v2.Compose:
    """Crop/resize, flip, RandAugment (uint8), to float, normalise, RandomErasing (float).

    ``native`` is the dataset's square image size when every image has it (None otherwise):
    with random_resized_crop off and native == img_size the resize is skipped. ``uint8``:
    stop before the float part (items stay uint8 (3, S, S)); the training loop normalises and
    erases per batch on the device (``suite.training.pipeline.BatchPrep``).
    """
    ops: list[v2.Transform] = []
    if cfg.random_resized_crop:
        ops.append(v2.RandomResizedCrop(img_size, scale=(cfg.crop_scale_min, 1.0), antialias=True))
    elif native != img_size:
        ops += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(v2.RandAugment(magnitude=cfg.randaugment_magnitude))
    if uint8:
        return v2.Compose([*ops, v2.ToPureTensor()])
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if cfg.random_erasing > 0:
        ops.append(v2.RandomErasing(p=cfg.random_erasing))
    return v2.Compose([*ops, v2.ToPureTensor()])


def eval_transform(
    img_size: int,
    native: int | None,
    mean: tuple,
    std: tuple,
    crop_pct: float,
    uint8: bool = False,
) -> v2.Compose:
    """Resize to img_size / crop_pct, centre crop img_size, normalise; no-ops are left out.
    ``uint8``: no normalisation (done per batch, ``BatchPrep``), items stay uint8."""
    ops: list[v2.Transform] = []
    resize = int(img_size / crop_pct)
    if native != img_size or resize != img_size:
        ops += [v2.Resize(resize, antialias=True), v2.CenterCrop(img_size)]
    if uint8:
        return v2.Compose([*ops, v2.ToPureTensor()])
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose([*ops, v2.ToPureTensor()])


# ---------------------------------------------------------------------------------------------
# Datasets


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) and int labels (N,) held in memory, transformed per item."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable, classes: tuple):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        # tv_tensors.Image: the v2 transforms then treat it as an image, never as a mask
        return self.transform(tv_tensors.Image(self.images[i])), int(self.labels[i])


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def _build_synthetic(
    cfg: DataConfig, img_size: int, uint8: bool = False
) -> tuple[Dataset, Dataset, DataInfo]:
    native = cfg.img_size or img_size
    x_tr, y_tr = make_synthetic(cfg.train_size, native, cfg.num_classes, cfg.seed, split=0)
    x_va, y_va = make_synthetic(cfg.val_size, native, cfg.num_classes, cfg.seed, split=1)
    h = hashlib.sha256()
    for t in (x_tr, y_tr, x_va, y_va):
        h.update(t.numpy().tobytes())
    mean, std = SYNTHETIC_MEAN, SYNTHETIC_STD
    classes = synthetic_classes(cfg.num_classes)
    t_train = train_transform(cfg, img_size, native, mean, std, uint8)
    train = TensorImages(x_tr, y_tr, t_train, classes)
    # eval sees the whole image: blocks reach the border, and eval_crop_pct's zoom would also
    # rescale the texture periods away from the training geometry
    val = TensorImages(x_va, y_va, eval_transform(img_size, native, mean, std, 1.0, uint8), classes)
    source = (
        f"synthetic(seed={cfg.seed},train={cfg.train_size},val={cfg.val_size},"
        f"img={native},classes={cfg.num_classes})"
    )
    info = DataInfo(
        name="synthetic",
        num_classes=cfg.num_classes,
        classes=classes,
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        mean=mean,
        std=std,
        digest=h.hexdigest()[:16],
        source=source,
    )
    return train, val, info


def _build_cifar(
    cfg: DataConfig, img_size: int, uint8: bool = False
) -> tuple[Dataset, Dataset, DataInfo]:
    # the batches are read by suite.training.cifar's restricted unpickler: never pickle.load
    mean, std = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}[
        cfg.name
    ]
    arrays = load_cifar(cfg.name, cfg.root)
    t_train = train_transform(cfg, img_size, 32, mean, std, uint8)
    t_val = eval_transform(img_size, 32, mean, std, cfg.eval_crop_pct, uint8)
    train = TensorImages(arrays.x_train, arrays.y_train, t_train, arrays.classes)
    val = TensorImages(arrays.x_val, arrays.y_val, t_val, arrays.classes)
    info = DataInfo(
        name=cfg.name,
        num_classes=len(arrays.classes),
        classes=arrays.classes,
        train_size=len(train),
        val_size=len(val),
        mean=mean,
        std=std,
        digest=_sha256_files(list(arrays.files)),  # the batches, not the meta
        source=str(Path(cfg.root).expanduser()),
    )
    return train, val, info


def shown(path: str | bytes | os.PathLike) -> str:
    """A file name fit for any message, log line or MLflow tag: a name that is not UTF-8
    (Python keeps its bytes as lone surrogates, which no encoder accepts: printing it or
    storing it in a tag would raise UnicodeEncodeError) has those bytes as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# modes of 16-bit (and 32-bit integer) greyscale: PIL's convert("RGB") clips them at 255, so a
# 16-bit PNG of grey 30000/65535 would load as white
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# modes with an alpha channel; a palette or an RGB/L image may also carry a transparency key
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: 16-bit greyscale scaled (65535 -> 255, not clipped), transparent
    pixels composited onto white (their hidden colour, e.g. a palette entry, is arbitrary;
    white is what a viewer shows behind them), everything else by PIL's convert."""
    if img.mode in _WIDE_GREY:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def rgb_loader(path: str) -> Image.Image:
    """Any image file as RGB (grayscale 'L' and 16-bit, palette, RGBA, CMYK all become 3
    channels, see ``to_rgb``). An image past PIL's decompression-bomb limit is an error here
    (PIL only warns below twice the limit, then decodes it: gigabytes for one sample)."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return to_rgb(Image.open(f))


# what PIL raises for a file that is not a readable image (a bomb: DecompressionBomb*)
BAD_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images (corrupt, truncated, not images, decompression
    bombs) either stop the run with one line naming the file, or, with ``skip_bad``, are
    replaced by the next readable image of the folder and counted, with a warning line for
    each. Its file list (``make_dataset``) follows directory links but never a loop, and
    leaves out what is not a regular file (a FIFO would block the loader forever)."""

    def __init__(self, root: str, transform: Callable, skip_bad: bool) -> None:
        self.not_regular: list[str] = []  # filled by make_dataset, during __init__
        self.loops: list[str] = []
        super().__init__(root, transform, loader=rgb_loader)
        self.skip_bad = skip_bad
        self.skipped: set[str] = set()
        for what, found in (
            (
                "entries that are not regular files (FIFOs, sockets, devices, broken links)",
                self.not_regular,
            ),
            ("directory links back into folders already listed (a loop)", self.loops),
        ):
            if found:
                print(
                    f"warning: data: {shown(root)}: skipped {len(found)} {what}, e.g. "
                    f"{shown(found[0])}",
                    file=sys.stderr,
                )

    def make_dataset(  # type: ignore[override]
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """torchvision's listing, made safe: ``os.walk(followlinks=True)`` goes round a link
        loop until the path is too long (6 images became 246 samples), so each folder is
        listed once by its real path; non-regular files are counted in ``not_regular``."""
        from torchvision.datasets.folder import has_file_allowed_extension

        def valid(path: str) -> bool:
            if is_valid_file is not None:
                return is_valid_file(path)
            return has_file_allowed_extension(path, extensions or ())

        samples = []
        for cls in sorted(class_to_idx):
            seen: set[str] = set()
            for folder, dirs, files in os.walk(os.path.join(directory, cls), followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:
                    self.loops.append(folder)
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    if not valid(path):
                        continue
                    try:
                        regular = stat.S_ISREG(os.stat(path).st_mode)
                    except OSError:  # a broken link, or gone since the listing
                        regular = False
                    if regular:
                        samples.append((path, class_to_idx[cls]))
                    else:
                        self.not_regular.append(path)
        found = {target for _, target in samples}
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            names = ", ".join(shown(c) for c in empty)
            raise FileNotFoundError(f"Found no valid image file for the classes {names}")
        return samples

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        for j in range(len(self)):
            path = self.samples[(i + j) % len(self)][0]
            try:
                return super().__getitem__((i + j) % len(self))
            except BAD_IMAGE_ERRORS as e:  # PIL's errors for bad files
                reason = shown(first_line(e))
                if not self.skip_bad:
                    raise UserError(
                        f"data.root: cannot read image {shown(path)} ({reason}); remove it "
                        "or set data.skip_bad_images = true"
                    ) from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    print(
                        f"warning: data: skipped unreadable image {shown(path)} ({reason}); "
                        f"{len(self.skipped)} skipped so far",
                        file=sys.stderr,
                    )
        raise UserError(f"data.root: no readable image in {shown(self.root)}")


def _build_imagefolder(
    cfg: DataConfig, img_size: int, uint8: bool = False
) -> tuple[Dataset, Dataset, DataInfo]:
    root = Path(cfg.root).expanduser()
    expected = f"expected {root}/train/<class>/* and {root}/val/<class>/*"
    if not root.is_dir():
        raise UserError(f"data.root: {cfg.root} is not a directory ({expected})")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data.root: {cfg.root} has no {split}/ folder ({expected})")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    # ImageFolder images come in any size: the train resize is never skipped (native None)
    if uint8:  # uint8 crop/resize, PIL RandAugment, JPEGs decoded at reduced scale (pipeline.py)
        t_train, t_val = pil_transforms(cfg, img_size)
    else:
        t_train = v2.Compose([v2.ToImage(), train_transform(cfg, img_size, None, mean, std)])
        t_val = v2.Compose(
            [v2.ToImage(), eval_transform(img_size, None, mean, std, cfg.eval_crop_pct)]
        )
    try:
        train = CheckedImageFolder(str(root / "train"), t_train, cfg.skip_bad_images)
        val = CheckedImageFolder(str(root / "val"), t_val, cfg.skip_bad_images)
    except (FileNotFoundError, OSError) as e:  # a class folder without images, unreadable dirs
        why = shown(first_line(e))
        raise UserError(f"data.root: {cfg.root}: {why} ({expected})") from None
    if uint8:  # JPEGs opened undecoded (the transform picks the DCT scale), others as before
        train.loader = val.loader = functools.partial(open_image, fallback=rgb_loader)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise UserError(
            f"data.root: class folders differ between {root / 'train'} and {root / 'val'} "
            f"(only in train: {', '.join(map(shown, only_t)) or '-'}; "
            f"only in val: {', '.join(map(shown, only_v)) or '-'})"
        )
    info = DataInfo(
        name="imagefolder",
        num_classes=len(train.classes),
        classes=tuple(train.classes),
        train_size=len(train),
        val_size=len(val),
        mean=mean,
        std=std,
        digest=_listing_digest(root, [p for p, _ in train.samples + val.samples]),
        source=str(root),
    )
    return train, val, info


def _listing_digest(root: Path, paths: list[str]) -> str:
    """A dataset folder's digest: the hash of its sorted (path relative to ``root``, size)
    list; reading every image would be too slow."""
    files = sorted((os.path.relpath(p, root), os.path.getsize(p)) for p in paths)
    # the names as bytes: a name that is not UTF-8 cannot be str.encode()d
    h = hashlib.sha256(b"\n".join(os.fsencode(p) + b"\t%d" % s for p, s in files))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Public API


def build_datasets(
    cfg: DataConfig, img_size: int, uint8: bool = False
) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, val, info) for ``cfg.name``; items are (float (3, img_size, img_size), int).

    ``img_size`` is the model's input size; every transform ends there. ``uint8``: items are
    uint8 (3, img_size, img_size) instead, not normalised nor erased: the training loop does
    that per batch on the device with ``pipeline.BatchPrep(info.mean, info.std, ...)``.
    Raises ``UserError`` for a missing or malformed ``data.root``.
    """
    if cfg.name not in BUILDERS:
        raise UserError(f"data.name = {cfg.name!r}: must be one of {', '.join(BUILDERS)}")
    if cfg.name != "synthetic" and not cfg.root:
        raise UserError(f"data.root = '': required for {cfg.name}")
    return BUILDERS[cfg.name](cfg, img_size, uint8)


# one builder per name of config.DATASETS, the list the validator reads
BUILDERS = {
    "synthetic": _build_synthetic,
    "cifar10": _build_cifar,
    "cifar100": _build_cifar,
    "imagefolder": _build_imagefolder,
}
assert tuple(BUILDERS) == DATASETS, "config.DATASETS and the builders must name the same sets"


def build_mixup(
    cfg: DataConfig, num_classes: int
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """Batch-level MixUp / CutMix: (images (B, 3, H, W), labels (B,) int64) -> (images, soft
    targets (B, num_classes)). One of the enabled two is picked per batch; None if both off."""
    ops: list[v2.Transform] = []
    if cfg.mixup > 0:
        ops.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        ops.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
