"""Model registry: each entry reads like a row of the paper's table.

Reference values are copied from their sources: the TNT paper (Han et al. 2021, arXiv
2103.00112) Table 3, the DeiT paper (arXiv 2012.12877) Table 1, and timm's published result CSVs
(pytorch-image-models ``results/``). "gflops" follows the papers' and fvcore's unit: one multiply-add = one flop (GMACs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from .configs import ModelConfig, TNTConfig, ViTConfig
from .tnt import TNT
from .vit import VisionTransformer


@dataclass(frozen=True)
class PaperRef:
    params_m: float | None = None
    gflops: float | None = None
    top1: float | None = None
    top5: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One row of the table: the model's config and the published figures it is checked
    against."""

    name: str
    config: ModelConfig
    paper: PaperRef = field(default_factory=PaperRef)
    # timm's published figures for the same architecture (params M, GMACs), where it has one
    timm_name: str | None = None
    timm_params_m: float | None = None
    timm_gmacs: float | None = None

    @property
    def arch(self) -> type[nn.Module]:
        return TNT if isinstance(self.config, TNTConfig) else VisionTransformer

    @property
    def family(self) -> str:
        if isinstance(self.config, TNTConfig):
            return "tnt"
        return "deit" if self.name.startswith("deit") else "vit"

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def kwargs(self) -> dict[str, Any]:
        """The knobs this entry sets apart from its config class's defaults."""
        default = type(self.config)()
        return {
            f.name: getattr(self.config, f.name)
            for f in fields(self.config)
            if getattr(self.config, f.name) != getattr(default, f.name)
        }


_TNT = "TNT paper (arXiv 2103.00112) Table 3"
_DEIT = "DeiT paper (arXiv 2012.12877) Table 1; TNT paper Table 3"
_DEIT_DIST = "DeiT paper Table 1 (distilled, 300 epochs); params from timm"
_TIMM = "timm results CSV (no paper ImageNet-1k row at 224)"
_VIT384 = "TNT paper Table 3, ViT-B/16 row (ImageNet-1k only, 384px) [recalled]"
_VITB = "ViT-B/16 at 224 is DeiT-B's architecture: 17.6 GFLOPs (DeiT paper Table 1)"

_REGISTRY: dict[str, ModelEntry] = {}


def _add(name, config, paper=PaperRef(), timm=None, timm_params=None, timm_gmacs=None):
    _REGISTRY[name] = ModelEntry(name, config, paper, timm, timm_params, timm_gmacs)


# The paper's columns: depth 12 throughout; TNT's outer and inner widths (D, c) and heads.
TNT_TI = TNTConfig(embed_dim=192, inner_dim=12, num_heads=3, inner_heads=2)
TNT_S = TNTConfig(embed_dim=384, inner_dim=24, num_heads=6, inner_heads=4)
TNT_B = TNTConfig(embed_dim=640, inner_dim=40, num_heads=10, inner_heads=4)
VIT_TI = ViTConfig(embed_dim=192, num_heads=3)
VIT_S = ViTConfig(embed_dim=384, num_heads=6)
VIT_B = ViTConfig(embed_dim=768, num_heads=12)
# Small configs for two CPU cores: 32x32 input, 4x4 patch grid of 8x8 patches; TNT splits each
# patch into 16 pixels of 2x2, the same 16 pixels per patch as the 224 models.
_NANO = dict(img_size=32, num_classes=10, patch_size=8, embed_dim=96, depth=6, num_heads=3)
TNT_NANO = TNTConfig(**_NANO, pixel_size=2, inner_dim=12, inner_heads=2)
VIT_NANO = ViTConfig(**_NANO)

# fmt: off
#    name                                config                          paper ref: params M, GFLOPs, top-1, top-5            timm: name, params M, GMACs
_add("tnt_ti_patch16_224",               TNT_TI,                          PaperRef(6.1, 1.4, 73.9, 91.9, _TNT))
_add("tnt_s_patch16_224",                TNT_S,                           PaperRef(23.8, 5.2, 81.5, 95.7, _TNT),   "tnt_s_patch16_224", 23.77, 5.25)
_add("tnt_b_patch16_224",                TNT_B,                           PaperRef(65.6, 14.1, 82.9, 96.3, _TNT),  "tnt_b_patch16_224", 65.43, 14.10)
_add("vit_tiny_patch16_224",             VIT_TI,                          PaperRef(source=_TIMM),                  "vit_tiny_patch16_224", 5.72, 1.26)
_add("vit_small_patch16_224",            VIT_S,                           PaperRef(source=_TIMM),                  "vit_small_patch16_224", 22.05, 4.61)
_add("vit_base_patch16_224",             VIT_B,                           PaperRef(None, 17.6, None, None, _VITB), "vit_base_patch16_224", 86.57, 17.58)
_add("vit_base_patch16_384",             replace(VIT_B, img_size=384),    PaperRef(86.4, 55.5, 77.9, None, _VIT384), "vit_base_patch16_384")
_add("deit_tiny_patch16_224",            VIT_TI,                          PaperRef(5.7, 1.3, 72.2, None, _DEIT),   "deit_tiny_patch16_224", 5.72, 1.26)
_add("deit_small_patch16_224",           VIT_S,                           PaperRef(22.0, 4.6, 79.8, None, _DEIT),  "deit_small_patch16_224", 22.05, 4.61)
_add("deit_base_patch16_224",            VIT_B,                           PaperRef(86.0, 17.6, 81.8, None, _DEIT), "deit_base_patch16_224", 86.57, 17.58)
_add("deit_tiny_distilled_patch16_224",  replace(VIT_TI, distilled=True), PaperRef(None, 1.3, 74.5, None, _DEIT_DIST),  "deit_tiny_distilled_patch16_224")
_add("deit_small_distilled_patch16_224", replace(VIT_S, distilled=True),  PaperRef(None, 4.6, 81.2, None, _DEIT_DIST),  "deit_small_distilled_patch16_224", 22.44, 4.63)
_add("deit_base_distilled_patch16_224",  replace(VIT_B, distilled=True),  PaperRef(None, 17.6, 83.4, None, _DEIT_DIST), "deit_base_distilled_patch16_224")
_add("tnt_nano",                         TNT_NANO)
_add("vit_nano",                         VIT_NANO)
_add("deit_nano",                        VIT_NANO)
_add("deit_nano_distilled",              replace(VIT_NANO, distilled=True))
# fmt: on


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(_REGISTRY)}") from None


def model_img_size(name: str, overrides: dict[str, Any] | None = None) -> int:
    """The input size of a registered model, after its overrides."""
    return (overrides or {}).get("img_size", get_entry(name).img_size)


def model_knobs(name: str) -> list[str]:
    """The knobs (config fields) a run config may override for this model."""
    return [f.name for f in fields(get_entry(name).config)]


def _check_knob(name: str, key: str, value: Any, default: Any) -> None:
    """A ValueError naming ``key`` and ``value`` where the value has not the type of the knob's
    ``default`` or is out of its range."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(
            f"{key}={value!r} for model {name} must be {expected.__name__}, "
            f"not {type(value).__name__}"
        )
    if expected is float and not math.isfinite(value):  # nan passes every comparison below
        raise ValueError(f"{key}={value!r} for model {name} must be a finite number")
    most = MAX_KNOB.get(key, _MAX_FLOAT_KNOB.get(key))
    if most is not None and value > most:
        most = f"{most:g}" if isinstance(most, float) else most
        raise ValueError(f"{key}={value!r} for model {name} is out of range (at most {most})")
    if expected in (int, float) and not isinstance(value, bool):
        low = 0 if key in _MAY_BE_ZERO else 1e-12
        if value < low or (key.endswith("drop_rate") or key == "drop_path_rate") and value >= 1:
            raise ValueError(f"{key}={value!r} for model {name} is out of range")


# the structural knobs' maxima, far beyond any model of the papers (TNT-B: depth 12, dim 640;
# ViT-H: dim 1280): checked before anything is built, since even a meta-device build of
# depth 100000000 runs for hours (and a number past int64 fails in torch with a traceback)
MAX_KNOB = {
    "depth": 1024,
    "embed_dim": 65536,
    "inner_dim": 65536,
    "num_heads": 4096,
    "inner_heads": 4096,
    "img_size": 8192,
    "patch_size": 8192,
    "pixel_size": 8192,
    "in_chans": 1024,
    "num_classes": 1_000_000,
}
# an absurd model (each knob in range, together 10^12 weights) is refused from an estimate
MAX_PARAMS = 20e9
_MAX_FLOAT_KNOB = {"mlp_ratio": 64.0, "inner_mlp_ratio": 64.0}


def estimate_params(config: ModelConfig) -> float:
    """Roughly the parameter count of the model ``config`` describes, from the shapes alone
    (the blocks' attention and MLP weights, embeddings, head), without building it."""
    d, depth, patch = float(config.embed_dim), float(config.depth), config.patch_size
    n = (config.img_size // max(patch, 1)) ** 2 + 1
    total = depth * (4 + 2 * float(config.mlp_ratio)) * d * d + n * d + d * config.num_classes
    total += patch * patch * config.in_chans * d
    if isinstance(config, TNTConfig):  # the inner blocks and the pixel -> patch projections
        c, pixels = float(config.inner_dim), (patch // max(config.pixel_size, 1)) ** 2
        total += depth * ((4 + 2 * float(config.inner_mlp_ratio)) * c * c + pixels * c * d)
        total += pixels * c * d
    return total


# knobs where 0 is meaningful: no classifier head, no dropout / stochastic depth
_MAY_BE_ZERO = {"num_classes", "drop_rate", "attn_drop_rate", "drop_path_rate"}


def resolve_config(name: str, **overrides: Any) -> ModelConfig:
    """The entry's config with ``overrides`` applied (``dataclasses.replace``), each checked by
    name, type and range first; a ValueError names the knob and the value."""
    config = get_entry(name).config
    defaults = {f.name: f.default for f in fields(config)}
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"unknown knob '{key}' for model {name}; valid: {', '.join(defaults)}")
        _check_knob(name, key, value, defaults[key])
    config = replace(config, **overrides)
    n = estimate_params(config)
    if n > MAX_PARAMS:
        raise ValueError(
            f"model {name} with {', '.join(f'{k}={v}' for k, v in overrides.items())} would "
            f"have about {n / 1e9:,.0f}B parameters (more than {MAX_PARAMS / 1e9:.0f}B)"
        )
    return config


def check_model_config(name: str, overrides: dict[str, Any]) -> None:
    """A run config's ``[model]``: ``name`` with ``overrides`` built on the meta device, so that
    every shape check runs with no memory and no init; one ``UserError`` (``model: ...``)
    where it cannot be built. The commands call it on every config they build (config.py
    checks values, not models)."""
    import torch

    from suite.errors import UserError

    try:
        with torch.device("meta"):
            create_model(name, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, with any knob of its config overridden (as timm does)."""
    entry = get_entry(name)
    model = entry.arch(resolve_config(name, **overrides))
    model.model_name = name
    return model
