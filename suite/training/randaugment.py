"""RandAugment's colour ops on a PIL RGB image, uint8, bit-exact with torchvision's PIL kernels
(``torchvision.transforms.v2.functional`` on a PIL image: PIL's ImageOps / ImageEnhance /
Image.blend) and faster (issue 23; ``PilRandAugment`` in pipeline.py calls them).

Most of those kernels are a per-channel lookup table of the pixel value, which PIL builds in
Python loops per call (``ImageOps.autocontrast``, ``equalize``, ``posterize``, ``solarize``;
``ImageStat`` sums the histogram in Python for Contrast's mean). Here the table comes from
``im.histogram()`` (C) with numpy, or from a cache when it depends on the magnitude only, and
is applied with ``im.point`` (C), the call PIL's own kernels end with:

- Brightness, Contrast: ``Image.blend(degenerate, im, factor)`` with a constant degenerate
  image (black; the grey ``int(mean of the L image + 0.5)``) maps each byte v through
  ``blend(c, v)``. The table is Pillow's own blend run on the 256 values (a 256 x 1 ramp), so
  it is exact by construction, whatever float arithmetic Pillow's C code does (measured:
  ``point`` with the table 0.13 ms, ``Image.new`` + ``Image.blend`` on the image 0.43 ms);
- Posterize, Solarize: ImageOps' tables, cached per bits / threshold;
- AutoContrast, Equalize: ImageOps' arithmetic (Python floats / ints), vectorised;
- Sharpness: PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, borders copied)
  sums in float32 with a +0.5 rounding offset and truncates: floor(S / 13 + 0.5) for the
  integer weighted sum S, which is never within 0.5 / 13 of a rounding boundary, far beyond
  float32's error, so integer arithmetic gives the same bytes: (S + 6) // 13, in numpy
  uint16/uint32 (2-4x faster than PIL's unvectorised filter); then PIL's own ``Image.blend``.

Color and the geometric ops stay on torchvision's PIL kernels (``FAST_OPS`` has no entry).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image

_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))  # the 256 byte values, one row
_LEVELS = np.arange(256)
# (n * _DIV13_MUL) >> _DIV13_SHIFT == n // 13 for 0 <= n < 20164 (checked in the tests);
# SMOOTH's rounded sums are at most 13 * 255 + 6 = 3321
_DIV13_MUL, _DIV13_SHIFT = 80660, 20


def _point(im: Image.Image, lut: list[int]) -> Image.Image:
    """``im`` (RGB) through ``lut`` (256 entries for every band, or 768: one per band), as
    ImageOps' ``_lut`` applies its tables (``Image.point``), minus point's Python pass that
    rounds the 768 entries (they are ints already): ~0.05 ms of its ~0.15 here."""
    im.load()
    return im._new(im.im.point(lut * 3 if len(lut) == 256 else lut, None))


@lru_cache(maxsize=1024)
def blend_lut(grey: int, factor: float) -> list[int]:
    """lut[v]: the byte ``Image.blend`` makes of a degenerate byte ``grey`` and an image byte v
    at ``factor``: Pillow's blend itself, run on the 256 values."""
    return list(Image.blend(Image.new("L", (256, 1), grey), _RAMP, factor).tobytes())


@lru_cache(maxsize=64)
def _posterize_lut(bits: int) -> list[int]:
    mask = ~(2 ** (8 - bits) - 1)  # ImageOps.posterize
    return [i & mask for i in range(256)]


@lru_cache(maxsize=64)
def _solarize_lut(threshold: float) -> list[int]:
    return [i if i < threshold else 255 - i for i in range(256)]  # ImageOps.solarize


def brightness(im: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Brightness(im).enhance(factor)``: blend with black."""
    return _point(im, blend_lut(0, factor))


def contrast_grey(im: Image.Image) -> int:
    """ImageEnhance.Contrast's degenerate grey: int(mean of the L image + 0.5), the mean as
    ImageStat computes it (integer sums, one true division)."""
    h = np.asarray(im.convert("L").histogram(), dtype=np.int64)
    total, count = int(h @ _LEVELS), int(h.sum())
    mean = total / count if count else 0
    return int(mean + 0.5)


def contrast(im: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Contrast(im).enhance(factor)``: blend with the mean grey."""
    return _point(im, blend_lut(contrast_grey(im), factor))


def posterize(im: Image.Image, bits: int) -> Image.Image:
    """``ImageOps.posterize(im, bits)``."""
    if not 1 <= bits <= 8:
        raise ValueError("bits must be between or equal to 1 and 8")  # ImageOps' error
    return _point(im, _posterize_lut(bits))


def solarize(im: Image.Image, threshold: float) -> Image.Image:
    """``ImageOps.solarize(im, threshold)``."""
    return _point(im, _solarize_lut(threshold))


def autocontrast_lut(hist: list[int]) -> list[int]:
    """ImageOps.autocontrast's table (no cutoff, no ignore) from ``im.histogram()``: per band,
    v -> int(v * scale + offset) clipped to 0..255, scale = 255.0 / (hi - lo), offset =
    -lo * scale, lo / hi the darkest / lightest level present; the identity when hi <= lo."""
    h = np.asarray(hist, dtype=np.int64).reshape(-1, 256)  # (bands, 256)
    present = h > 0
    lo = present.argmax(axis=1)  # (bands,) first level present
    hi = 255 - present[:, ::-1].argmax(axis=1)  # last level present
    stretch = present.any(axis=1) & (hi > lo)
    scale = 255.0 / np.where(stretch, hi - lo, 1)  # float64 ops, as ImageOps' Python floats
    offset = -lo * scale
    v = np.trunc(_LEVELS * scale[:, None] + offset[:, None])  # int() truncates
    lut = np.where(stretch[:, None], np.clip(v, 0, 255), _LEVELS)
    return lut.astype(np.int64).ravel().tolist()


def autocontrast(im: Image.Image) -> Image.Image:
    """``ImageOps.autocontrast(im)``."""
    return _point(im, autocontrast_lut(im.histogram()))


def equalize_lut(hist: list[int]) -> list[int]:
    """ImageOps.equalize's table from ``im.histogram()``: per band, step = (pixels - count
    of the last level present) // 255, v -> (step // 2 + pixels below v) // step; the
    identity when one level or fewer is present or step is 0 (values above 255 are left for
    ``point`` to clip, as ImageOps leaves them)."""
    h = np.asarray(hist, dtype=np.int64).reshape(-1, 256)  # (bands, 256)
    present = h > 0
    last = 255 - present[:, ::-1].argmax(axis=1)  # (bands,) last level present
    bands = np.arange(h.shape[0])
    step = (h.sum(axis=1) - h[bands, last]) // 255
    spread = (present.sum(axis=1) > 1) & (step > 0)
    below = np.cumsum(h, axis=1) - h  # pixels below each level
    lut = np.where(
        spread[:, None], (step[:, None] // 2 + below) // np.maximum(step, 1)[:, None], _LEVELS
    )
    return lut.ravel().tolist()


def equalize(im: Image.Image) -> Image.Image:
    """``ImageOps.equalize(im)``."""
    return _point(im, equalize_lut(im.histogram()))


def smooth(x: np.ndarray) -> np.ndarray:
    """PIL's ``ImageFilter.SMOOTH`` of an (H, W, C) uint8 array, H, W >= 3: the interior
    (S + 6) // 13, S = the 3x3 sum + 4 x the centre; the first and last rows and columns
    copied."""
    b = x.astype(np.uint16)
    rows = b[:-2] + b[1:-1]  # (H - 2, W, C) vertical 3-sums
    rows += b[2:]
    s = rows[:, :-2] + rows[:, 1:-1]  # (H - 2, W - 2, C) 3x3 sums
    s += rows[:, 2:]
    s += b[1:-1, 1:-1] << 2  # the centre's weight 5
    s += 6
    q = s.astype(np.uint32)
    q *= _DIV13_MUL  # // 13 as a multiply and shift (numpy's integer division is slow)
    q >>= _DIV13_SHIFT
    out = x.copy()
    out[1:-1, 1:-1] = q
    return out


def sharpness(im: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Sharpness(im).enhance(factor)``: blend with the SMOOTH image."""
    if min(im.size) < 3:  # PIL's filter on a sliver: leave it to PIL
        from PIL import ImageEnhance

        return ImageEnhance.Sharpness(im).enhance(factor)
    degenerate = Image.fromarray(smooth(np.asarray(im)))
    return Image.blend(degenerate, im, factor)


# op name -> fast kernel (image, magnitude), taking torchvision's RandAugment magnitude as
# v2.RandAugment._apply_image_or_video_transform turns it into the kernel's argument
FAST_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "Brightness": lambda im, m: brightness(im, 1.0 + m),
    "Contrast": lambda im, m: contrast(im, 1.0 + m),
    "Sharpness": lambda im, m: sharpness(im, 1.0 + m),
    "Posterize": lambda im, m: posterize(im, int(m)),
    "Solarize": lambda im, m: solarize(im, 255.0 * m),
    "AutoContrast": lambda im, m: autocontrast(im),
    "Equalize": lambda im, m: equalize(im),
}
