"""Run configuration: frozen dataclasses loaded from TOML, with dotted ``--set`` overrides.

Every key is checked before any work starts: an unknown key, a wrong type or an impossible
value raises ``UserError`` naming the key and the value (the CLI prints it and exits 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from suite.errors import MissingPathError, UserError, parse_assignment

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")
# precisions of train.amp (besides "auto") and profile --dtype; suite.runtime maps them to dtypes
PRECISIONS = ("fp32", "bf16", "fp16")
# train.compile: a bool or one of these words (suite.runtime.resolve_compile reads them)
COMPILE_SETTINGS = ("auto", "true", "false", "regional")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tnt_nano"
    # any constructor argument of the model (inner_heads, pixel_size, drop_path_rate, ...)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    root: str = ""  # cifar10/cifar100: torchvision's folder; imagefolder: root/{train,val}/<class>/
    # synthetic only: sizes, native image size (0 = the model's input size), classes, seed
    train_size: int = 2000
    val_size: int = 500
    img_size: int = 0
    num_classes: int = 10
    seed: int = 0
    workers: int = 0
    # augmentation (torchvision.transforms.v2); each switchable
    random_resized_crop: bool = False  # DeiT recipe: on (the experiments set it for real data)
    crop_scale_min: float = 0.08
    hflip: bool = True
    randaugment: bool = False
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    # imagefolder: an unreadable image stops the run naming the file, or is skipped (counted)
    skip_bad_images: bool = False
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    eval_crop_pct: float = 0.875


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.0  # 0 = DeiT's scaling: base_lr x batch_size / 512
    base_lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    clip_grad: float = 0.0  # max grad norm; 0 = off
    amp: str = "auto"  # auto (bf16 where supported), fp32, bf16, fp16 (CUDA, with a grad scaler)
    ema: bool = False
    ema_decay: float = 0.9998
    # auto: whole-model torch.compile on CUDA, eager on CPU; true/false force it; "regional"
    # compiles each block in place (suite.runtime)
    compile: bool | str = "auto"
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs"  # checkpoints go to out_dir/<run id or name>/
    checkpoint: bool = True
    # what a FINISHED run keeps (suite.training.checkpoint.KEEP_CHECKPOINTS): "best" its
    # weights-only best.pt, "all" last.pt (optimizer state) too, "none" nothing
    keep_checkpoints: str = "best"


@dataclass(frozen=True)
class DistillConfig:
    kind: str = "none"  # none, hard, soft
    teacher: str = (
        ""  # checkpoint path (needs teacher_model) or MLflow model URI (runs:/..., models:/...)
    )
    teacher_model: str = ""  # registry name of the teacher checkpoint's architecture
    alpha: float = 0.5  # weight of the distillation term (DeiT hard: 0.5; soft: 0.1)
    tau: float = 3.0  # soft distillation temperature


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "tntbench"
    run_name: str = ""  # "" = <model>/<dataset>/s<seed>
    log_every: int = 20  # steps between per-step metrics
    system_metrics: bool = True
    log_model: bool = False  # also mlflow.pytorch.log_model the final model


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        d = dataclasses.asdict(self)
        model = d["model"]
        d["model"] = {"name": model["name"], **model["overrides"]}
        return d

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "tracking": TrackingConfig,
}
# sections a config file may have besides these (read by the matrix and search commands)
EXTRA_SECTIONS = ("matrix", "search")


# TOML integers are 64-bit, but Python's parser takes any size: a larger one would reach
# torch or numpy and fail there with a traceback (``OverflowError``)
INT64 = (-(2**63), 2**63 - 1)
# seeds seed numpy too (and Optuna's samplers), whose seeds are 32-bit unsigned
SEED_MAX = 2**32 - 1
SEED_KEYS = ("train.seed", "data.seed", "search.seed")


def check_int_range(key: str, value: Any) -> None:
    """A UserError naming ``key`` for an integer outside int64 (or a seed outside 0..2**32-1)."""
    if type(value) is not int:
        return
    if key.rpartition(": ")[2] in SEED_KEYS:
        if not 0 <= value <= SEED_MAX:
            raise UserError(f"{key} = {value}: seeds must be in 0..{SEED_MAX}")
    elif not INT64[0] <= value <= INT64[1]:
        raise UserError(f"{key} = {value}: out of the 64-bit integer range")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Value coerced to the field's type (int -> float only), or a UserError naming the key."""
    origin = typing.get_origin(hint)
    check_int_range(key, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} = {value!r}: must be a finite number")
    ok = (
        isinstance(value, dict)
        if origin is dict
        else isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
        if isinstance(hint, type)
        else True
    )
    if not ok:
        want = getattr(hint, "__name__", str(hint))
        raise UserError(f"{key} = {value!r} must be {want}, not {type(value).__name__}")
    return value


def _build_section(name: str, values: dict[str, Any], source: str) -> Any:
    cls = _CLASSES[name]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    if name == "model":
        values = dict(values)
        model_name = values.pop("name", ModelConfig.name)
        if not isinstance(model_name, str):
            raise UserError(f"{source}: model.name = {model_name!r} must be a string")
        return ModelConfig(model_name, values)
    for key, value in values.items():
        if key not in hints:
            valid = ", ".join(hints)
            raise UserError(f"{source}: unknown key '{name}.{key}' (valid: {valid})")
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def with_values(raw: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of the nested config ``raw`` with dotted keys set (``{"model.depth": 6}``): the
    one setter behind ``--set``, matrix cells and search trials, checked as ``--set`` is."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in values.items():
        _merge(out, key, value, source)
    return out


def _merge(base: dict[str, Any], key: str, value: Any, source: str) -> None:
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise UserError(f"{source}: '{key}' must be SECTION.KEY, e.g. train.epochs")
    if section not in SECTIONS and section not in EXTRA_SECTIONS:
        raise UserError(f"{source}: unknown section '{section}' in '{key}'")
    target = base.setdefault(section, {})
    if section in _CLASSES and section != "model":  # typos are named here, as --set's
        fields = [f.name for f in dataclasses.fields(_CLASSES[section])]
        if name not in fields:
            raise UserError(f"{source} {key}: unknown key '{key}' (valid: {', '.join(fields)})")
    if section in EXTRA_SECTIONS:  # nested tables such as search.space.<key>
        *parents, leaf = name.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    else:
        target[name] = value


def from_dict(raw: dict[str, Any], source: str = "config", check_paths: bool = True) -> Config:
    """A validated Config from a nested dict (a parsed TOML file plus overrides). Its model
    knobs are the model's to check: ``suite.models.check_model_config``, which every command
    calls on the configs it builds."""
    sections = {}
    for name, values in raw.items():
        if name in EXTRA_SECTIONS:
            continue
        if name not in SECTIONS:
            valid = ", ".join(list(SECTIONS) + list(EXTRA_SECTIONS))
            raise UserError(f"{source}: unknown section [{name}] (valid: {valid})")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{name}] must be a table")
        sections[name] = _build_section(name, values, source)
    cfg = Config(**sections)
    validate(cfg, check_paths)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from None


def apply_sets(raw: dict[str, Any], sets: list[str] | None, source: str = "--set") -> dict:
    """``raw`` with each ``--set KEY=VALUE`` applied."""
    return with_values(raw, dict(parse_assignment(s, "--set") for s in sets or []), source)


def load_config(path: str | Path | None = None, sets: list[str] | None = None) -> Config:
    raw = read_toml(path) if path else {}
    return from_dict(apply_sets(raw, sets), str(path or "config"))


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Impossible values, named with the key; with ``check_paths``, data roots and teacher
    files must exist. (The model's knobs: ``suite.models.check_model_config``.)"""
    _validate_data(cfg.data, check_paths)
    _validate_train(cfg.train)
    _validate_distill(cfg.distill, check_paths)
    tr = cfg.tracking
    _need(tr.log_every >= 1, "tracking.log_every", tr.log_every, "must be >= 1")
    if not 0 < len(tr.experiment) <= 500:  # MLflow's limit on experiment names
        raise UserError(
            f"tracking.experiment: {len(tr.experiment)} characters; MLflow takes 1 to 500"
        )


def _need(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise UserError(f"{key} = {value!r}: {why}")


def _validate_data(d: DataConfig, check_paths: bool) -> None:
    need = _need
    need(d.name in DATASETS, "data.name", d.name, f"must be one of {', '.join(DATASETS)}")
    need(d.name == "synthetic" or bool(d.root), "data.root", d.root, f"required for {d.name}")
    if check_paths and d.name != "synthetic" and not Path(d.root).is_dir():
        raise MissingPathError(f"data.root = {d.root!r}: no such directory (data.name = {d.name})")
    for key in ("train_size", "val_size", "num_classes"):
        need(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "must be >= 1")
    need(d.num_classes >= 2, "data.num_classes", d.num_classes, "must be >= 2")
    need(d.img_size >= 0, "data.img_size", d.img_size, "must be >= 0 (0 = model input size)")
    need(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    need(0 < d.crop_scale_min <= 1, "data.crop_scale_min", d.crop_scale_min, "must be in (0, 1]")
    need(0 <= d.random_erasing < 1, "data.random_erasing", d.random_erasing, "must be in [0, 1)")
    need(d.mixup >= 0, "data.mixup", d.mixup, "must be >= 0")
    need(d.cutmix >= 0, "data.cutmix", d.cutmix, "must be >= 0")
    need(0 < d.eval_crop_pct <= 1, "data.eval_crop_pct", d.eval_crop_pct, "must be in (0, 1]")


def _validate_train(t: TrainConfig) -> None:
    need = _need
    need(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    need(t.lr >= 0, "train.lr", t.lr, "must be >= 0 (0 = scaled base_lr)")
    need(t.base_lr > 0, "train.base_lr", t.base_lr, "must be > 0")
    need(t.min_lr >= 0, "train.min_lr", t.min_lr, "must be >= 0")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    need(
        0 <= t.warmup_epochs <= t.epochs,
        "train.warmup_epochs",
        t.warmup_epochs,
        f"must be in [0, epochs={t.epochs}]",
    )
    need(
        0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)"
    )
    need(t.clip_grad >= 0, "train.clip_grad", t.clip_grad, "must be >= 0 (0 = off)")
    check_compile_setting(t.compile)
    amps = ("auto", *PRECISIONS)
    need(t.amp in amps, "train.amp", t.amp, f"must be one of {', '.join(amps)}")
    need(0 < t.ema_decay < 1, "train.ema_decay", t.ema_decay, "must be in (0, 1)")
    keeps = ("best", "all", "none")  # suite.training.checkpoint.KEEP_CHECKPOINTS
    need(
        t.keep_checkpoints in keeps,
        "train.keep_checkpoints",
        t.keep_checkpoints,
        f"must be one of {', '.join(keeps)}",
    )
    devs = ("auto", "cpu", "cuda")
    need(
        t.device in devs or t.device.startswith("cuda:"),
        "train.device",
        t.device,
        f"must be one of {', '.join(devs)}",
    )


def _validate_distill(k: DistillConfig, check_paths: bool) -> None:
    need = _need
    kinds = ("none", "hard", "soft")
    need(k.kind in kinds, "distill.kind", k.kind, f"must be one of {', '.join(kinds)}")
    if k.kind != "none":
        need(bool(k.teacher), "distill.teacher", k.teacher, "required when distill.kind is set")
        need(0 <= k.alpha <= 1, "distill.alpha", k.alpha, "must be in [0, 1]")
        need(k.tau > 0, "distill.tau", k.tau, "must be > 0")
        is_uri = k.teacher.startswith(("runs:/", "models:/"))
        need(
            is_uri or bool(k.teacher_model),
            "distill.teacher_model",
            k.teacher_model,
            "needed for a checkpoint teacher: the registry name of its model",
        )
        if check_paths and not is_uri and not Path(k.teacher).is_file():
            raise MissingPathError(f"distill.teacher = {k.teacher!r}: file not found")


def safe_name(text: str) -> str:
    """``text`` as one file or folder name: anything but letters, digits, ``_`` and ``-``
    becomes ``_`` (so no ``/``, no ``..``), never empty."""
    return re.sub(r"[^\w-]+", "_", text).strip("_") or "_"


def check_compile_setting(value: Any, key: str = "train.compile") -> None:
    """A UserError naming ``key`` unless ``value`` is a bool or one of COMPILE_SETTINGS."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value in COMPILE_SETTINGS)):
        raise UserError(f'{key} = {value!r}: must be true, false, "auto" or "regional"')


def to_toml(d: dict[str, dict[str, Any]]) -> str:
    """The resolved config as TOML, one ``[section]`` per table, keys in their order; tomli-w
    escapes every string (newlines, quotes, backslashes, unicode), so ``tomllib`` reads back
    exactly ``d``."""
    return tomli_w.dumps(d)


# ---------------------------------------------------------------------------------------------
# Study sections: [matrix] (a benchmark matrix) and [search] (an Optuna study), typed and
# checked like the run sections; suite.studies runs them.

MATRIX_AXES = ("name", "models", "datasets", "seeds")  # the [matrix] keys that are not dotted
MATRIX_SETTINGS = ("max_retry",)  # nor these: settings of the matrix, not axes
# a cell or trial whose worker dies is queued again this many times in a row at most
# ([matrix] and [search] max_retry): then it is given up (it kills every worker that runs it)
MAX_RETRY = 2


@dataclass(frozen=True)
class MatrixConfig:
    """A benchmark matrix: axes of choices ({dotted key: value}); the cells are their product."""

    name: str
    axes: tuple[tuple[dict[str, Any], ...], ...]
    max_retry: int = MAX_RETRY


def parse_matrix(raw: dict[str, Any], source: str) -> MatrixConfig:
    m = raw.get("matrix")
    if not isinstance(m, dict):
        raise UserError(f"{source}: no [matrix] table")
    name = m.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: matrix.name = {name!r} must be a non-empty string")
    axes = [_named_axis(m, "models", "model", source, required=True)]
    axes.append(_named_axis(m, "datasets", "data", source, default=["synthetic"]))
    seeds = m.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise UserError(f"{source}: matrix.seeds must be a non-empty list of integers")
    for s in seeds:
        check_int_range(f"{source}: matrix.seeds", s)
        if not 0 <= s <= SEED_MAX:
            raise UserError(f"{source}: matrix.seeds: {s} is not in 0..{SEED_MAX}")
    axes.append([{"train.seed": s} for s in seeds])
    keys = ["models", "datasets", "seeds"]
    for key, values in m.items():
        if key not in MATRIX_AXES + MATRIX_SETTINGS:
            axes.append(_dotted_axis(key, values, source))
            keys.append(key)
    for key, axis in zip(keys, axes, strict=True):
        _check_axis(key, axis, source)
    max_retry = m.get("max_retry", MAX_RETRY)
    if type(max_retry) is not int or not 0 <= max_retry <= 100:
        raise UserError(f"{source}: matrix.max_retry = {max_retry!r}: an integer in 0..100")
    return MatrixConfig(name, tuple(tuple(a) for a in axes), max_retry)


# the keys that the named axes set: a dotted axis (or a tied table) setting one of them would
# be silently overridden by, or override, its named axis
OWN_AXIS = {"model.name": "models", "data.name": "datasets", "train.seed": "seeds"}


def _check_axis(key: str, axis: list[dict[str, Any]], source: str) -> None:
    """Refuse an axis that repeats a choice (``seeds = [0, 0]`` would train one cell twice
    and pool it as two seeds) or that sets a key owned by a named axis."""
    seen: dict[str, int] = {}
    for i, choice in enumerate(axis):
        for k in choice if key not in OWN_AXIS.values() else ():
            if k in OWN_AXIS:
                raise UserError(
                    f"{source}: matrix.{key} sets {k}, which matrix.{OWN_AXIS[k]} sets: "
                    f"list the values in matrix.{OWN_AXIS[k]}"
                )
        text = json.dumps(choice, sort_keys=True, default=str)
        if text in seen:
            shown = next(iter(choice.values())) if len(choice) == 1 else choice
            raise UserError(
                f"{source}: matrix.{key} lists {shown!r} twice (entries {seen[text] + 1} and "
                f"{i + 1}): each cell would run twice"
            )
        seen[text] = i


def _named_axis(
    m: dict,
    key: str,
    section: str,
    source: str,
    required: bool = False,
    default: list | None = None,
) -> list[dict[str, Any]]:
    """matrix.models / matrix.datasets: names, or tables {name = ..., knob = ...}."""
    values = m.get(key, default)
    if not isinstance(values, list) or not values:
        raise UserError(f"{source}: matrix.{key} must be a non-empty list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, str):
            out.append({f"{section}.name": v})
        elif isinstance(v, dict) and isinstance(v.get("name"), str):
            out.append({f"{section}.{k}": x for k, x in v.items()})
        else:
            raise UserError(f"{source}: matrix.{key} entries are names or {{name = ..., ...}}")
    return out


def _dotted_axis(key: str, values: Any, source: str) -> list[dict[str, Any]]:
    """ "section.key" = [values], or a name = [tables of dotted keys set together]."""
    if not isinstance(values, list) or not values:
        raise UserError(f"{source}: matrix.{key} must be a non-empty list, got {values!r}")
    if all(isinstance(v, dict) for v in values):  # tied keys: one choice sets them all
        for v in values:
            for k in v:
                if "." not in k:
                    raise UserError(f"{source}: matrix.{key}: '{k}' must be SECTION.KEY")
        return [dict(v) for v in values]
    if "." not in key:
        raise UserError(f"{source}: matrix.{key}: keys are dotted config keys, e.g. model.depth")
    return [{key: v} for v in values]


# the metrics a search may optimise, and in which direction
OBJECTIVES = {
    "val_top1": "maximize",
    "val_top5": "maximize",
    "val_loss": "minimize",
    "gmacs": "minimize",
    "params_m": "minimize",
}
SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class Choices:
    """A categorical knob: scalars, or tables of dotted keys set together (tied)."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A numeric knob in [low, high]; integers when both ends are integers."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Tie:
    """A knob derived from another: model.inner_dim kept so that pixels x dim stays fixed."""

    key: str = "model.pixel_size"
    keep: str = "pixels_x_dim"


@dataclass(frozen=True)
class SearchConfig:
    study: str
    objectives: tuple[str, ...] = ("val_top1",)
    sampler: str = "tpe"
    pruner: str = "median"
    n_trials: int = 20
    seed: int = 0
    gmacs_budget: float = 0.0  # > 0: constraint GMACs <= budget (trial.set_constraint)
    heartbeat_interval: int = 10  # s, RDB storages: a silent worker's trial is re-queued
    grace_period: int = 30
    max_retry: int = MAX_RETRY
    space: dict[str, Choices | Range | Tie] = field(default_factory=dict)


def parse_search(raw: dict[str, Any], source: str) -> SearchConfig:
    s = raw.get("search")
    if not isinstance(s, dict):
        raise UserError(f"{source}: no [search] table")
    s = dict(s)
    space = s.pop("space", None)
    if not isinstance(space, dict) or not space:
        raise UserError(f"{source}: [search.space] must list at least one key")
    objectives = s.pop("objectives", ["val_top1"])
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if not objectives or len(objectives) > 2 or any(o not in OBJECTIVES for o in objectives):
        raise UserError(
            f"{source}: search.objectives = {objectives!r}: one or two of {', '.join(OBJECTIVES)}"
        )
    hints = typing.get_type_hints(SearchConfig)
    for k, v in s.items():
        if k not in hints or k == "space":
            raise UserError(f"{source}: unknown key 'search.{k}' (valid: {', '.join(hints)})")
        s[k] = _check_type(f"{source}: search.{k}", v, hints[k])
    cfg = SearchConfig(**{"study": Path(source).stem, **s}, objectives=tuple(objectives))
    for key, kind, allowed in (("sampler", cfg.sampler, SAMPLERS), ("pruner", cfg.pruner, PRUNERS)):
        if kind not in allowed:
            raise UserError(f"{source}: search.{key} = {kind!r}: one of {', '.join(allowed)}")
    if cfg.n_trials < 1:
        raise UserError(f"{source}: search.n_trials = {cfg.n_trials}: must be >= 1")
    # Optuna would take these and fail inside every trial (or never), so they are named here
    for key, low in (("gmacs_budget", 0), ("heartbeat_interval", 1), ("grace_period", 1)):
        if getattr(cfg, key) < low:
            raise UserError(f"{source}: search.{key} = {getattr(cfg, key)}: must be >= {low}")
    if cfg.max_retry < 0:
        raise UserError(f"{source}: search.max_retry = {cfg.max_retry}: must be >= 0")
    specs = {name: _space_spec(name, spec, cfg.sampler, source) for name, spec in space.items()}
    for name, spec in specs.items():
        if isinstance(spec, Tie) and spec.key not in _searched_keys(specs):
            raise UserError(
                f"{source}: search.space.{name} is tied to {spec.key}, which the space does "
                f"not search: add {spec.key} to [search.space]"
            )
    return dataclasses.replace(cfg, space=specs)


def _searched_keys(specs: dict[str, Choices | Range | Tie]) -> set[str]:
    """The dotted keys a space sets: its names, and the keys inside tied choices."""
    keys = set()
    for name, spec in specs.items():
        keys.add(name)
        if isinstance(spec, Choices):
            keys |= {k for v in spec.values if isinstance(v, dict) for k in v}
    return keys


def _space_spec(name: str, spec: Any, sampler: str, source: str) -> Choices | Range | Tie:
    where = f"{source}: search.space.{name}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a table such as {{choices = [...]}}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise UserError(f"{where}.choices must be a non-empty list")
        return Choices(tuple(spec["choices"]))
    if "tie" in spec:
        if spec.get("keep") != "pixels_x_dim" or spec["tie"] != "model.pixel_size":
            raise UserError(
                f'{where}: supported tie is {{tie = "model.pixel_size", keep = "pixels_x_dim"}}'
            )
        return Tie(spec["tie"], spec["keep"])
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: give choices, low/high, or tie")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    if not all(type(x) in (int, float) for x in (low, high)) or not isinstance(log, bool):
        raise UserError(f"{where}: low and high must be numbers and log true or false")
    for end, x in (("low", low), ("high", high)):
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"{where}.{end} = {x!r}: must be a finite number")
        check_int_range(f"{where}.{end}", x)
    if not low < high:
        raise UserError(f"{where}: low = {low!r} must be < high = {high!r}")
    if log and low <= 0:
        raise UserError(f"{where}: low = {low!r} with log = true: a log range needs low > 0")
    unknown = set(spec) - {"low", "high", "log"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (low, high, log)")
    if sampler == "grid":
        raise UserError(f"{where}: the grid sampler needs choices, not a range")
    if "." not in name:
        raise UserError(f"{where}: range keys are dotted config keys, e.g. train.lr")
    return Range(low, high, log, integer=type(low) is int and type(high) is int)


def spec_table(spec: Choices | Range | Tie) -> dict[str, Any]:
    """A space entry as the TOML table it came from (for logs and fingerprints)."""
    if isinstance(spec, Choices):
        return {"choices": list(spec.values)}
    if isinstance(spec, Tie):
        return {"tie": spec.key, "keep": spec.keep}
    return {"low": spec.low, "high": spec.high, "log": spec.log}
