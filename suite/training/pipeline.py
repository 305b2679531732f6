"""The fast input pipeline (issue 23): uint8 images out of the workers, float work per batch.

Per image, in the DataLoader workers, everything stays uint8:

- ``open_image`` reads a file's bytes and its JPEG header only, so that the crop is chosen
  before decoding; ``decode_rgb`` then decodes the JPEG at reduced scale (libjpeg's DCT
  scaling, PIL ``draft``) when the chosen box still spans the output's pixels each way, else
  at full size with torchvision's libjpeg-turbo decoder straight into a tensor;
- ``PilTrainTransform`` draws RandomResizedCrop's box exactly as torchvision does, crops and
  resizes on the uint8 tensor with torch's antialiased kernel (channels-last: its fast path;
  measured faster than PIL's resize here, see benchmarks/bench_data.py), flips, and runs
  RandAugment on a PIL image (uint8 kernels; torchvision's tensor kernels go through float);
- ``PilEvalTransform``: resize and centre crop, uint8 out.

Per batch, on the training device (CPU or GPU), ``BatchPrep`` turns the uint8 batch into the
normalised float batch the model sees (DataInfo's mean/std), applies random erasing (batched,
torchvision's box distribution) and MixUp/CutMix (``BatchMix``: torchvision's draws, without
its full-batch copies). 4x less data crosses the worker queues and the host-to-device copy,
and the float work runs once per batch instead of once per image (as timm's PrefetchLoader).
Synthetic and CIFAR sets (uint8 in memory) go through the same ``BatchPrep``.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from suite.config import DataConfig
from suite.training.randaugment import FAST_OPS

# torchvision's RandomResizedCrop / RandomErasing defaults, which today's pipeline uses
RRC_RATIO = (3 / 4, 4 / 3)
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


# ---------------------------------------------------------------------------------------------
# Loading: JPEGs read, not decoded, until the transform knows the crop


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes and header, not decoded yet (``decode_box`` decodes it)."""

    path: str
    data: bytearray  # writable: torch.frombuffer shares it without a warning
    size: tuple[int, int]  # (width, height) from the header
    mode: str  # PIL's mode of the JPEG: "RGB", "L", "CMYK"


# start-of-frame markers (baseline, extended, progressive, lossless...): all but DHT (C4),
# JPG (C8) and DAC (CC) in C0-CF; and the markers that stand alone, without a length
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def jpeg_header(data: bytes | bytearray) -> tuple[tuple[int, int], str] | None:
    """((width, height), mode) from a JPEG's start-of-frame segment, or None when ``data`` is
    not a JPEG this simple walk understands (then PIL's parser decides). Walking the segment
    lengths to the SOF costs microseconds; PIL's Image.open parses every marker (~0.1 ms)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n:
                return None
            h = (data[pos + 5] << 8) | data[pos + 6]
            w = (data[pos + 7] << 8) | data[pos + 8]
            mode = _JPEG_MODES.get(data[pos + 9])
            return ((w, h), mode) if mode and w > 0 and h > 0 else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        pos += 2 + length
    return None


def open_image(path: str, fallback: Callable[[str], Image.Image]) -> EncodedJpeg | Image.Image:
    """A JPEG as its bytes and header (the transform decodes it, perhaps at reduced scale);
    any other file through ``fallback`` (the dataset's RGB loader, which knows odd formats),
    and so is a JPEG over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), whose
    policy is the loader's. A file PIL cannot identify raises PIL's OSError, as the RGB
    loader would."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    header = jpeg_header(data)
    limit = Image.MAX_IMAGE_PIXELS
    if header is not None and limit is not None and header[0][0] * header[0][1] > limit:
        return fallback(path)
    if header is not None:
        return EncodedJpeg(path, data, *header)
    with Image.open(io.BytesIO(data)) as im:  # PIL's parser: other formats, odd JPEGs
        if im.format == "JPEG":
            return EncodedJpeg(path, data, im.size, im.mode)
    return fallback(path)


def dct_reduction(width: int, height: int, want: tuple[int, int]) -> int:
    """The JPEG DCT scaling PIL's ``draft`` picks for ``want`` (w, h): the largest of 8, 4,
    2, 1 that divides neither side below ``want``."""
    scale = min(width // max(1, want[0]), height // max(1, want[1]))
    return next((r for r in (8, 4, 2) if scale >= r), 1)


def decode_rgb(src: EncodedJpeg | Image.Image, want: tuple[int, int] | None) -> Tensor:
    """``src`` decoded to a uint8 (3, H, W) tensor (channels-last strides: the HWC buffer the
    decoder wrote, not copied; torch's uint8 antialiased resize has its fast path on it).

    ``want`` (w, h): the smallest decoded size the caller can use. A JPEG that can be decoded
    at 1/2, 1/4 or 1/8 scale and still give that size is decoded so by libjpeg's DCT scaling
    (PIL ``draft``); otherwise at full size by torchvision's libjpeg-turbo decoder, straight
    into a tensor (no PIL image to copy out). Decoding errors are OSErrors naming the reason.
    """
    if isinstance(src, Image.Image):  # already decoded by the fallback loader (RGB)
        return pil_to_tensor(src.convert("RGB"))
    w0, h0 = src.size
    r = dct_reduction(w0, h0, want) if want is not None else 1
    if r == 1 and src.mode in ("RGB", "L"):
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders for TorchCodec's (not installed
                # here); the warning would repeat for every image
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(
                    torch.frombuffer(src.data, dtype=torch.uint8), mode=ImageReadMode.RGB
                )  # (3, H, W), strides (1, 3W, 3)
        except RuntimeError as e:  # torchvision's message: "decode_jpeg, <file:line>, <why>"
            raise OSError(str(e).rsplit(", ", 1)[-1]) from None
    with Image.open(io.BytesIO(src.data)) as im:
        if want is not None:
            im.draft("RGB", want)  # DCT scaling 1/r: the decoder does 1/r^2 of the work
        rgb = im.convert("RGB")  # decodes; CMYK and grayscale JPEGs become RGB
    return pil_to_tensor(rgb)


def pil_to_tensor(im: Image.Image) -> Tensor:
    """PIL RGB (H, W) -> uint8 (3, H, W), a channels-last view of one copy of the pixels (the
    array is read-only: nothing writes to it, collate copies it into the batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the array is not writable"
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1)


def resized_crop(x: Tensor, box: tuple[float, float, float, float], size: int) -> Tensor:
    """The box (left, top, right, bottom) of x (3, H, W) uint8, resized to (3, size, size) by
    antialiased bilinear interpolation, as torchvision's resized_crop on uint8 does (same
    kernel; measured faster than PIL's resize on this path, benchmarks/bench_data.py)."""
    left, top = int(round(box[0])), int(round(box[1]))
    right = max(left + 1, min(x.shape[2], int(round(box[2]))))
    bottom = max(top + 1, min(x.shape[1], int(round(box[3]))))
    # (1, 3, h, w), copied channels-last-contiguous: torch's uint8 antialiased kernel takes
    # its fast path on it (measured 1.6x faster than on the strided view) and its output is
    # channels-last too, so the (S, S, 3) view PIL needs next is contiguous (3x cheaper)
    crop = x[None, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(
        crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0]  # (3, size, size) uint8


def scaled_box(box: tuple[float, ...], x: Tensor, size: tuple[int, int]) -> tuple[float, ...]:
    """``box`` on an image of ``size`` (w, h), in the coordinates of the decoded ``x``."""
    sx, sy = x.shape[2] / size[0], x.shape[1] / size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def src_size(src: EncodedJpeg | Image.Image) -> tuple[int, int]:
    return src.size


# ---------------------------------------------------------------------------------------------
# Random parameters, drawn as torchvision draws them (same RNG calls, same distribution)


def rrc_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float] = RRC_RATIO
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) on a (height, width) image: torchvision's
    algorithm (10 tries of a uniform area fraction and a log-uniform aspect, then a centre
    crop at the nearest allowed aspect), from the global torch RNG (seeded per worker)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,)).item())
            j = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_size(width: int, height: int, box_w: float, box_h: float, out: int) -> tuple[int, int]:
    """The smallest decoded (w, h) of a (width, height) image in which a box_w x box_h box
    still spans ``out`` px each way: the draft never makes the resize upsample."""
    return (math.ceil(width * out / box_w), math.ceil(height * out / box_h))


class PilRandAugment(v2.RandAugment):
    """``v2.RandAugment`` for one PIL image, without its per-call input flattening and
    magnitude tables: the same draws in the same order (op index, then the sign of a signed
    op's magnitude), the magnitude tables made once per image size. The op kernels are
    torchvision's (``_apply_image_or_video_transform``) but on an RGB image for the colour
    ops of ``randaugment.FAST_OPS`` (Brightness, Contrast, Sharpness, Posterize, Solarize,
    AutoContrast, Equalize): the same bytes as torchvision's PIL kernels, 1.3-3x faster
    (lookup tables from the C histogram, SMOOTH in integer numpy; see randaugment.py)."""

    def forward(self, *inputs: object) -> object:
        if len(inputs) != 1 or not isinstance(inputs[0], Image.Image):
            return super().forward(*inputs)
        im = inputs[0]
        width, height = im.size
        table = self._tables(height, width)
        for _ in range(self.num_ops):
            k = int(torch.randint(len(table), ()))  # v2's _get_random_item draw
            op, magnitude, signed = table[k]
            if signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            fast = FAST_OPS.get(op) if im.mode == "RGB" else None
            if fast is not None:
                im = fast(im, magnitude)
            else:
                im = self._apply_image_or_video_transform(
                    im, op, magnitude, interpolation=self.interpolation, fill=self._fill
                )
        return im

    def _tables(self, height: int, width: int) -> list[tuple[str, float, bool]]:
        cache = self.__dict__.setdefault("_table_cache", {})
        if (height, width) not in cache:
            rows = []
            for op, (magnitudes_fn, signed) in self._AUGMENTATION_SPACE.items():
                mags = magnitudes_fn(self.num_magnitude_bins, height, width)
                rows.append((op, float(mags[self.magnitude]) if mags is not None else 0.0, signed))
            cache[(height, width)] = rows
        return cache[(height, width)]


# ---------------------------------------------------------------------------------------------
# Per-image transforms (workers): encoded JPEG or PIL in, uint8 tensor (3, S, S) out


class PilTrainTransform:
    """RandomResizedCrop (or resize + centre crop), flip, RandAugment: uint8 throughout.

    Takes what ``open_image`` returns; returns a uint8 tensor (3, size, size). The random draws
    are torchvision's, in today's order (``rrc_box``, the flip's ``torch.rand(1) < 0.5``,
    ``v2.RandAugment`` itself), so the augmentation distribution is today's. Crop and resize
    run on the decoded tensor (``resized_crop``); RandAugment on a PIL image, whose kernels are
    uint8 (torchvision's tensor kernels go through float for sharpness and the affine ops).
    Normalisation and random erasing happen per batch (``BatchPrep``). ``draft``: decode a
    JPEG at reduced scale when the crop allows (``decode_rgb``); ``pil_resize``: crop and
    resize with PIL instead (the benchmark's comparison).
    """

    def __init__(
        self,
        size: int,
        *,
        random_resized_crop: bool,
        scale: tuple[float, float],
        hflip: bool,
        randaugment: bool,
        magnitude: int,
        draft: bool = True,
        pil_resize: bool = False,
    ) -> None:
        self.size, self.rrc, self.scale, self.hflip = size, random_resized_crop, scale, hflip
        self.draft, self.pil_resize = draft, pil_resize
        self.randaugment = PilRandAugment(magnitude=magnitude) if randaugment else None

    def __call__(self, src: EncodedJpeg | Image.Image) -> Tensor:
        S = self.size
        w0, h0 = src_size(src)
        if not self.rrc:  # today's Resize(S) + CenterCrop(S)
            rw, rh = resized_size(w0, h0, S)
            x = decode_rgb(src, (rw, rh) if self.draft else None)
            out = resize_centre_crop(x, (rw, rh), S)
        else:
            i, j, h, w = rrc_box(w0, h0, self.scale)
            box = (float(j), float(i), float(j + w), float(i + h))  # (left, top, right, bottom)
            want = draft_size(w0, h0, w, h, S) if self.draft else None
            x = decode_rgb(src, want)  # (3, H, W) uint8, H, W the decoded (maybe reduced) size
            box = scaled_box(box, x, (w0, h0))
            if self.pil_resize:
                im = Image.fromarray(x.permute(1, 2, 0).numpy())
                out = pil_to_tensor(im.resize((S, S), Image.Resampling.BILINEAR, box=box))
            else:
                out = resized_crop(x, box, S)  # (3, S, S)
        flip = self.hflip and torch.rand(1).item() < 0.5  # v2.RandomHorizontalFlip's draw
        if self.randaugment is None:
            return out.flip(-1) if flip else out
        # (S, S, 3) HWC view (contiguous: out is channels-last) -> PIL (one 150 KB copy),
        # flipped there, PIL's uint8 RandAugment kernels, back as a (3, S, S) view
        im = Image.fromarray(out.permute(1, 2, 0).numpy())
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(self.randaugment(im))


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(w, h) after torchvision's Resize(resize): the shorter side ``resize``, the longer one
    scaled and truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def resize_centre_crop(x: Tensor, size: tuple[int, int], crop: int) -> Tensor:
    """x (3, h, w) uint8 resized to ``size`` (w, h) then centre-cropped to (3, crop, crop):
    today's Resize + CenterCrop, two steps as there (one box resize would land the crop on
    sub-pixel offsets that differ from today's by up to half a pixel)."""
    rw, rh = size
    x = x[None].contiguous(memory_format=torch.channels_last)  # (1, 3, h, w): fast kernel
    x = torch.nn.functional.interpolate(
        x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
    return x[0, :, top : top + crop, left : left + crop]  # (3, crop, crop) view


class PilEvalTransform:
    """Resize to size / crop_pct (shorter side), centre crop size, uint8 (3, size, size) out;
    a JPEG decoded at reduced scale when the resize stays a downscale."""

    def __init__(self, size: int, crop_pct: float, draft: bool = True) -> None:
        self.size, self.resize, self.draft = size, int(size / crop_pct), draft

    def __call__(self, src: EncodedJpeg | Image.Image) -> Tensor:
        w0, h0 = src_size(src)
        rw, rh = resized_size(w0, h0, self.resize)
        x = decode_rgb(src, (rw, rh) if self.draft else None)
        return resize_centre_crop(x, (rw, rh), self.size)


def pil_transforms(cfg: DataConfig, img_size: int) -> tuple[PilTrainTransform, PilEvalTransform]:
    """The ImageFolder's (train, eval) transforms of the uint8 pipeline, from ``cfg``."""
    train = PilTrainTransform(
        img_size,
        random_resized_crop=cfg.random_resized_crop,
        scale=(cfg.crop_scale_min, 1.0),
        hflip=cfg.hflip,
        randaugment=cfg.randaugment,
        magnitude=cfg.randaugment_magnitude,
    )
    return train, PilEvalTransform(img_size, cfg.eval_crop_pct)


def batch_preps(
    cfg: DataConfig,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    reuse_output: bool = False,
) -> tuple[BatchPrep, BatchPrep]:
    """(train, eval) ``BatchPrep`` of a uint8 pipeline: train normalises, erases and mixes
    as ``cfg`` says; eval normalises only. mean/std: the dataset's (``DataInfo``).
    ``reuse_output``: see ``BatchPrep`` (the training loop on CPU)."""
    mix = BatchMix(cfg.mixup, cfg.cutmix, num_classes) if cfg.mixup or cfg.cutmix else None
    train = BatchPrep(mean, std, cfg.random_erasing, mix, reuse_output)
    return train, BatchPrep(mean, std, reuse_output=reuse_output)


# ---------------------------------------------------------------------------------------------
# Per-batch work (training loop, on the device)


def erase_params(
    n: int,
    height: int,
    width: int,
    p: float,
    scale: Sequence[float] = ERASE_SCALE,
    ratio: Sequence[float] = ERASE_RATIO,
    tries: int = 10,
) -> Tensor:
    """(n, 4) int64 boxes (top, left, h, w) for a batch, h = w = 0 where nothing is erased.

    torchvision's RandomErasing, vectorised: erase with probability p; up to ``tries`` draws of
    a uniform area fraction and a log-uniform aspect, the first box that fits inside the image
    (h < height and w < width) is kept, else none; its corner uniform over the valid places.
    Drawn on the CPU from the global torch RNG (a few hundred numbers a batch).
    """
    apply = torch.rand(n) < p  # (n,)
    area = height * width
    frac = torch.empty(n, tries).uniform_(scale[0], scale[1])  # (n, tries)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    h = torch.round(torch.sqrt(area * frac * aspect)).long()  # round half to even, as round()
    w = torch.round(torch.sqrt(area * frac / aspect)).long()
    fits = (h < height) & (w < width)  # (n, tries)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]  # (n,)
    keep = apply & fits.any(dim=1)
    h, w = torch.where(keep, h, 0), torch.where(keep, w, 0)
    # corner: uniform integer in [0, height - h] and [0, width - w]
    top = (torch.rand(n) * (height - h + 1)).long().clamp_max(height - h)
    left = (torch.rand(n) * (width - w + 1)).long().clamp_max(width - w)
    return torch.stack([top, left, h, w], dim=1)


def erase_(x: Tensor, boxes: Tensor, value: float = 0.0) -> Tensor:
    """Fill each image's box with ``value`` in place. x: (B, C, H, W); boxes: (B, 4) as from
    ``erase_params`` (on any device: the mask is built where x lives, no host sync)."""
    B, _, H, W = x.shape
    if x.device.type == "cpu":  # touch the erased boxes only (a mask would cover every pixel)
        for k in torch.nonzero(boxes[:, 2] > 0).flatten().tolist():
            top, left, h, w = boxes[k].tolist()
            x[k, :, top : top + h, left : left + w] = value
        return x
    # elsewhere one kernel: a mask built where x lives from the boxes (no host sync)
    b = boxes.to(x.device, non_blocking=True)
    rows = torch.arange(H, device=x.device).view(1, H, 1)  # (1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)  # (1, 1, W)
    top, left, h, w = (b[:, k].view(B, 1, 1) for k in range(4))  # each (B, 1, 1)
    mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    return x.masked_fill_(mask.unsqueeze(1), value)  # (B, 1, H, W) broadcast over channels


class BatchMix:
    """MixUp / CutMix on a normalised float batch, in place: torchvision's ``v2.MixUp`` /
    ``v2.CutMix`` (picked per batch with equal chance by ``v2.RandomChoice`` when both are on)
    with the same random draws, minus their full-batch copies (CutMix copies only its box).

    x: (B, C, H, W) float, y: (B,) int64 -> (x, soft targets (B, num_classes) float32): each
    image mixed with the one before it in the batch (``roll(1, 0)``), as torchvision pairs them.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        self.num_classes = num_classes
        self.ops: list[tuple[str, torch.distributions.Beta]] = [
            (kind, torch.distributions.Beta(torch.tensor([a]), torch.tensor([a])))
            for kind, a in (("mixup", mixup), ("cutmix", cutmix))
            if a > 0
        ]
        if not self.ops:
            raise ValueError("BatchMix needs mixup > 0 or cutmix > 0")

    def draw(self, H: int, W: int) -> tuple[str, float, tuple[int, int, int, int]]:
        """(kind, lam, CutMix box (x1, y1, x2, y2)): torchvision's draws, in its order; for
        CutMix lam is already the box's adjusted one."""
        if len(self.ops) > 1:  # v2.RandomChoice's draw, p = (0.5, 0.5)
            kind, beta = self.ops[int(torch.multinomial(torch.tensor([0.5, 0.5]), 1))]
        else:
            kind, beta = self.ops[0]
        lam = float(beta.sample(()))
        if kind == "mixup":
            return kind, lam, (0, 0, 0, 0)
        r_x, r_y = int(torch.randint(W, size=(1,))), int(torch.randint(H, size=(1,)))
        r = 0.5 * math.sqrt(1.0 - lam)
        r_w_half, r_h_half = int(r * W), int(r * H)
        x1, y1 = max(r_x - r_w_half, 0), max(r_y - r_h_half, 0)
        x2, y2 = min(r_x + r_w_half, W), min(r_y + r_h_half, H)
        return kind, 1.0 - (x2 - x1) * (y2 - y1) / (W * H), (x1, y1, x2, y2)

    def targets(self, y: Tensor, lam: float) -> Tensor:
        """(B,) labels -> (B, K) soft targets: lam of its own, 1 - lam of the one before."""
        target = torch.nn.functional.one_hot(y, self.num_classes).float()  # (B, K)
        return target.roll(1, 0).mul_(1.0 - lam).add_(target.mul(lam))

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        kind, lam, (x1, y1, x2, y2) = self.draw(*x.shape[-2:])
        if kind == "mixup":
            partner = x.roll(1, 0)  # (B, C, H, W): the one full copy
            x.mul_(lam).add_(partner, alpha=1.0 - lam)
        else:
            x[..., y1:y2, x1:x2] = x[..., y1:y2, x1:x2].roll(1, 0)  # copies the box only
        return x, self.targets(y, lam)


class BatchPrep:
    """uint8 batch (B, 3, H, W) on the device -> normalised float32 batch, random erasing,
    then MixUp/CutMix: today's per-image float tail and batch mix, once per batch.

    Normalisation is today's ``ToDtype(scale=True)`` + ``Normalize(mean, std)`` folded into
    one multiply-add, (x - 255 mean) / (255 std); erased boxes are filled with 0 after it, as
    ``v2.RandomErasing()`` (value 0) did per image; ``mix`` (a ``BatchMix``) comes last, as
    the loop applied ``build_mixup``'s ops. Called as prep(x, y) -> (x, y or soft targets). A
    float batch (a loader of another pipeline) is only mixed.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        random_erasing: float = 0.0,
        mix: BatchMix | None = None,
        reuse_output: bool = False,
    ) -> None:
        self.mean, self.std, self.random_erasing = tuple(mean), tuple(std), random_erasing
        self.mix = mix
        # reuse_output: write each batch into the same float buffers (per shape and device)
        # instead of new ones. Only for a caller done with a batch before it asks for the next
        # (the training loop on CPU): there a fresh 19 MB tensor per batch of 32 costs page
        # faults, measured 15 ms against 1.8 ms on this project's busy box. CUDA's caching
        # allocator has no such cost and its queued kernels may still read the last batch.
        self.reuse_output = reuse_output
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._buffers: dict[tuple, Tensor] = {}

    def _float(self, like: Tensor, slot: int) -> Tensor:
        """An uninitialised float32 tensor shaped as ``like``: buffer ``slot`` when reusing."""
        if not self.reuse_output:
            return torch.empty(like.shape, dtype=torch.float32, device=like.device)
        key = (slot, tuple(like.shape), like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return self._buffers[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buffers": {}}  # buffers are not state

    def _scale_shift(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._consts:  # (1, 3, 1, 1) each, made once per device
            std = torch.tensor(self.std, dtype=torch.float32) * 255
            scale = (1 / std).view(1, -1, 1, 1).to(device)
            shift = (-torch.tensor(self.mean, dtype=torch.float32) * 255 / std).view(1, -1, 1, 1)
            self._consts[device] = (scale, shift.to(device))
        return self._consts[device]

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.dtype != torch.uint8:
            return self.mix(x, y) if self.mix is not None else (x, y)
        B, _, H, W = x.shape
        boxes = erase_params(B, H, W, self.random_erasing) if self.random_erasing > 0 else None
        draw = self.mix.draw(H, W) if self.mix is not None else None  # after erasing's draws
        scale, shift = self._scale_shift(x.device)
        if draw is not None and draw[0] == "mixup":
            out = self._mixup(x, draw[1], boxes, scale, shift)
            return out, self.mix.targets(y, draw[1])
        # (B, 3, H, W) float32 = x * scale + shift, in place on the converted copy:
        # measured 10x faster on CPU than torch.addcmul's broadcasting path
        out = self._float(x, 0).copy_(x).mul_(scale).add_(shift)
        if boxes is not None:
            out = erase_(out, boxes)
        if draw is None:
            return out, y
        _, lam, (x1, y1, x2, y2) = draw  # CutMix: the box from the image before, a box copy
        out[..., y1:y2, x1:x2] = out[..., y1:y2, x1:x2].roll(1, 0)
        return out, self.mix.targets(y, lam)

    def _mixup(
        self, x: Tensor, lam: float, boxes: Tensor | None, scale: Tensor, shift: Tensor
    ) -> Tensor:
        """lam n(e(x_k)) + (1 - lam) n(e(x_k-1)), n the normalisation, e the erasing (0 in
        its box after n): n(lam x_k + (1 - lam) x_k-1) (n is affine, the weights sum to 1),
        mixed from the uint8 batch before normalising, so that no normalised copy is rolled;
        then each erased box taken out of the two images it went into (exact: all linear)."""
        out = self._float(x, 0).copy_(x)  # (B, 3, H, W) x_k, pixel units
        partner = self._float(x, 1)  # x_k-1: the uint8 batch rolled by one, cast as copied
        partner[1:].copy_(x[:-1])
        partner[0].copy_(x[-1])
        out.mul_(lam).add_(partner, alpha=1.0 - lam).mul_(scale).add_(shift)
        if boxes is None:
            return out
        B = x.shape[0]
        for j in torch.nonzero(boxes[:, 2] > 0).flatten().tolist():
            top, left, h, w = boxes[j].tolist()
            rows, cols = slice(top, top + h), slice(left, left + w)
            # image j's box, normalised: (3, h, w); it reached out_j (weight lam) and, as
            # the partner of image j + 1, out_j+1 (weight 1 - lam); erased, it gives 0 to both
            patch = x[j, :, rows, cols].to(torch.float32).mul_(scale[0]).add_(shift[0])
            out[j, :, rows, cols].sub_(patch, alpha=lam)
            out[(j + 1) % B, :, rows, cols].sub_(patch, alpha=1.0 - lam)
        return out

    def __repr__(self) -> str:
        return (
            f"BatchPrep(mean={self.mean}, std={self.std}, "
            f"random_erasing={self.random_erasing}, mix={self.mix is not None})"
        )
