"""``tntbench train``: one training run from a Config, on CPU, one GPU or many (torchrun).

``fit`` reads top to bottom: data, the training state (model, optimizer, schedule, scaler,
EMA), a resume if asked, then one tracked run: compile, and for each epoch train, evaluate,
checkpoint (``suite.training.checkpoint.Checkpointer``) and log. Only rank 0 logs and writes.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from suite.config import Config, safe_name, to_toml
from suite.errors import UserError, first_line, redact_data
from suite.models import create_model, get_entry, model_img_size
from suite.plots import learning_curves, pyplot
from suite.profile import peak_memory_mb
from suite.runtime import (
    autocast,
    check_precision,
    compile_model,
    count_params,
    dist_env,
    oom_message,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from suite.tracking import Run, Tracker, environment_tags, flatten, make_tracker
from suite.training.checkpoint import (
    KEEP_CHECKPOINTS,
    Checkpointer,
    checkpoint_model,
    load_checkpoint,
)
from suite.training.data import DataInfo, build_datasets
from suite.training.engine import (
    Criterion,
    StepOptions,
    TrainState,
    build_ema,
    build_optimizer,
    build_scheduler,
    data_bound,
    evaluate,
    train_one_epoch,
    training_noise,
)
from suite.training.pipeline import BatchPrep, batch_preps


@dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's metrics, plus params_m and gmacs
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: str = ""
    best_top1: float = 0.0


@dataclass
class Data:
    """The loaders of one run, and what they hold."""

    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    info: DataInfo
    img_size: int
    # the batch-level pipeline on the device: uint8 items -> normalised float (train: erased
    # and mixed too); the loaders carry uint8 (issue 23: 4x less to move, float work per batch)
    prep: BatchPrep | None = None
    eval_prep: BatchPrep | None = None


@dataclass
class Recipe:
    """What every epoch of a run uses, fixed for the run."""

    cfg: Config
    device: torch.device
    amp: str  # the precision resolved: fp32, bf16 or fp16
    data: Data
    criterion: Criterion
    # how each step runs (precision, scaler, EMA, data.prep, teacher, ...); each epoch gives
    # it its own on_log and progress bar (dataclasses.replace)
    steps: StepOptions


@dataclass
class StudyLink:
    """A run's place in a study (a matrix cell, a search trial): the parent run it is filed
    under, and the tags and params the study adds to the run's own."""

    parent_run_id: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitContext:
    """One ``fit`` call's settings besides its Config, resolved once: where it runs (only rank
    0 records and writes), where it starts, its place in a study, and what it reports."""

    device: torch.device
    rank: int
    world: int
    resume: str | None
    continue_run: str | None
    study: StudyLink
    on_epoch: Callable[[int, dict[str, float]], None] | None
    progress: bool  # per-epoch lines and bars (rank 0 only)


# ---------------------------------------------------------------------------------------------
# The run


def fit(
    cfg: Config,
    tracker: Tracker,
    *,
    resume: str | None = None,
    continue_run: str | None = None,
    study: StudyLink | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` as one tracked run; returns its final metrics and history.

    ``resume``: a checkpoint file or folder, or a run ID, to continue exactly from.
    ``continue_run``: the ID of a tracked run that was cut short (a killed process): it goes on
    in that same run, from its last checkpoint if it saved one, else from the start.
    ``study``: the parent run, tags and params of a matrix cell or search trial.
    ``on_epoch(epoch, metrics)`` is called after each epoch's checkpoint (the search prunes).
    """
    rank, local_rank, world = dist_env()
    device = resolve_device(cfg.train.device, local_rank)
    if world > 1 and not dist.is_initialized():
        # NCCL for GPUs; gloo for CPU processes, also on a machine that has GPUs
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ctx = FitContext(
        device=device,
        rank=rank,
        world=world,
        resume=resume,
        continue_run=continue_run,
        study=study or StudyLink(),
        on_epoch=on_epoch,
        progress=progress and rank == 0,
    )
    try:
        # other ranks look up what rank 0 recorded (the run to resume) but record nothing
        return _fit(cfg, tracker if rank == 0 else tracker.read_only(), ctx)
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        # the run is already FAILED (with the error as a tag); the user gets one line
        if (message := out_of_memory(e, cfg.train.batch_size, device)) is None:
            raise
        raise UserError(message) from None
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def out_of_memory(e: BaseException, batch_size: int, device: torch.device) -> str | None:
    """The one line for a run that ran out of memory, naming what to lower; None when ``e`` is
    another error. CUDA raises OutOfMemoryError; on CPU torch's allocator raises RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), Python MemoryError."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return oom_message("train.batch_size", batch_size, device)
    if isinstance(e, RuntimeError) and not is_cpu_oom(e):
        return None
    why = first_line(e)[:120]
    return (
        f"train.batch_size = {batch_size} does not fit in memory on {device} "
        f"({type(e).__name__}: {why}); lower train.batch_size"
    )


def is_cpu_oom(e: BaseException) -> bool:
    """Whether ``e`` is torch's CPU out-of-memory RuntimeError."""
    text = str(e)
    return "DefaultCPUAllocator" in text or "can't allocate memory" in text


def _fit(cfg: Config, tracker: Tracker, ctx: FitContext) -> TrainResult:
    recipe, state, lr = prepare(cfg, tracker, ctx)
    profile = model_profile(state.model, recipe.data.img_size)
    ckpt_path, folder = start_point(ctx.resume, ctx.continue_run, tracker)
    run_id = ctx.continue_run
    if ckpt_path is not None:
        run_id = Checkpointer.restore(ckpt_path, state, cfg.model.name, ctx.device) or run_id
        if ctx.resume and run_id and tracker.uri:
            check_resumed_run(tracker, run_id, cfg, ctx.resume)
    state.net = state.model
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        state.net = nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
    tags = run_tags(recipe, ctx.world, ctx.study.tags)
    name = default_run_name(cfg)
    with tracker.run(cfg.tracking.experiment, name, tags, ctx.study.parent_run_id, run_id) as run:
        if folder is None:  # a new run: its own folder (other ranks never write)
            folder = (
                new_checkpoint_dir(cfg.train.out_dir, run.run_id or name)
                if ctx.rank == 0
                else Path(cfg.train.out_dir)
            )
        meta = checkpoint_meta(cfg, recipe, run.run_id)
        ckpt = Checkpointer(folder, meta, enabled=ctx.rank == 0 and cfg.train.checkpoint)
        if ckpt_path is None:
            params = run_params(cfg, recipe, lr, ctx.world, ctx.study.params)
            record_start(run, params, folder, cfg, recipe.data.info, profile)
        else:
            log_missing_epochs(run, tracker, state.history)
        if cfg.tracking.system_metrics:
            run.start_system_metrics()
        state.net = compile_for_training(state, recipe, run)
        train_epochs(state, recipe, run, ckpt, on_epoch=ctx.on_epoch, progress=ctx.progress)
        final = {**(state.history[-1] if state.history else {}), **profile}
        # peak memory of the training process (CUDA: max allocated; CPU: peak RSS)
        final["best_val_top1"], final["peak_mb"] = state.best, peak_memory_mb(recipe.device)
        last = {"best_val_top1": state.best, "peak_mb": final["peak_mb"]}
        if ctx.rank == 0:
            _log_artifacts(run, state.history, folder, cfg, state.model)
            last.update(ckpt.kept_size(cfg.train.keep_checkpoints))
        run.log_metrics(last)  # one request (a search trial's commits add up)
    # FINISHED now (the block ended the run): nothing resumes it, last.pt goes unless kept
    ckpt.finish(cfg.train.keep_checkpoints)
    return TrainResult(run.run_id, final, state.history, str(folder), state.best)


def train_epochs(
    state: TrainState,
    recipe: Recipe,
    run: Run,
    ckpt: Checkpointer,
    *,
    on_epoch: Callable | None,
    progress: bool,
) -> None:
    """The epochs left: train, evaluate, checkpoint, then log (so that a resume re-logs an
    epoch only if its metrics never reached the store); Ctrl-C saves first."""
    try:
        for epoch in range(state.epoch, recipe.cfg.train.epochs):
            metrics, step_rows = run_epoch(state, recipe, epoch, progress=progress)
            improved = state.finish_epoch(metrics)
            ckpt.save(state, "last.pt")
            if improved:
                ckpt.save_best(state)
            run.log_metric_rows([*step_rows, (epoch + 1, _epoch_row(metrics))])
            if reason := training_noise(metrics, recipe.device):  # the report marks it
                run.set_tags({"timing_noisy": f"train img/s, epoch {epoch + 1}: {reason}"})
            if why := data_bound(metrics):  # the loader, not the model, set the pace
                w = recipe.cfg.data.workers
                run.set_tags({"data_bound": f"epoch {epoch + 1}: {why}; data.workers = {w}"})
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    except KeyboardInterrupt:
        # at an epoch boundary the state is exact; mid-epoch, --resume redoes that epoch
        ckpt.save(state, "last.pt")
        print(f"\ninterrupted: checkpoint saved in {ckpt.folder}", file=sys.stderr)
        raise


# ---------------------------------------------------------------------------------------------
# Building the run's parts


def prepare(cfg: Config, tracker: Tracker, ctx: FitContext) -> tuple[Recipe, TrainState, float]:
    """The run's fixed parts, its training state, and its learning rate."""
    device = ctx.device
    amp = resolve_precision(cfg.train.amp, device)
    check_precision(amp, device, "train.amp")
    seed_everything(cfg.train.seed)
    data = build_data(cfg, device, ctx.rank, ctx.world)
    state, lr = build_state(cfg, data, device, amp, ctx.world)
    teacher = load_teacher(cfg, device, tracker)
    criterion = Criterion(cfg.train.label_smoothing, cfg.distill if teacher is not None else None)
    # MixUp/CutMix: part of data.prep (BatchMix), after normalisation and erasing, as before
    steps = StepOptions(
        amp=amp,
        scaler=state.scaler,
        clip_grad=cfg.train.clip_grad,
        ema=state.ema,
        prep=data.prep,
        teacher=teacher,
        log_every=cfg.tracking.log_every,
    )
    return Recipe(cfg, device, amp, data, criterion, steps), state, lr


def checkpoint_meta(cfg: Config, recipe: Recipe, run_id: str) -> dict[str, Any]:
    """What every checkpoint of the run holds besides the state: enough to rebuild the model."""
    kwargs = {**cfg.model.overrides, "num_classes": recipe.data.info.num_classes}
    return {
        "model_name": cfg.model.name,
        "model_kwargs": kwargs,
        "run_id": run_id,
        # redacted: the checkpoint is logged to the store (best.pt), and a password must not be
        "config_toml": to_toml(redact_data(cfg.to_dict())),
    }


def build_data(cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    """Datasets and loaders, each of the ``world`` ranks its shard (DistributedSampler; one
    shard alone)."""
    t = cfg.train
    img_size = model_img_size(cfg.model.name, cfg.model.overrides)
    # uint8 items; DataInfo's mean/std normalise them per batch on the device (data.prep)
    train_ds, val_ds, info = build_datasets(cfg.data, img_size, uint8=True)
    # on CPU each batch goes into the same float buffers (the loop is done with a batch before
    # it takes the next one): a fresh tensor per batch costs page faults there
    cpu = device.type == "cpu"
    prep, eval_prep = batch_preps(cfg.data, info.mean, info.std, info.num_classes, cpu)
    drop_last = len(train_ds) >= t.batch_size * world
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=drop_last
    )
    val_sampler = DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False)
    kw = dict(
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.workers > 0,
    )
    train = DataLoader(train_ds, t.batch_size, sampler=sampler, drop_last=drop_last, **kw)
    val = DataLoader(val_ds, t.batch_size, sampler=val_sampler, **kw)
    return Data(train, val, sampler, info, img_size, prep, eval_prep)


def build_state(
    cfg: Config, data: Data, device: torch.device, amp: str, world: int = 1
) -> tuple[TrainState, float]:
    """The model and what trains it, with the learning rate they use (DeiT's scaling rule:
    base_lr x global batch (x ``world`` ranks) / 512, unless train.lr is set)."""
    t = cfg.train
    model = build_model(cfg, data.info).to(device)
    lr = t.lr or t.base_lr * t.batch_size * world / 512
    steps = max(len(data.train), 1)
    optimizer = build_optimizer(model, lr, t.weight_decay)
    scheduler = build_scheduler(
        optimizer, t.epochs * steps, int(t.warmup_epochs * steps), lr, t.min_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = build_ema(model, t.ema_decay) if t.ema else None
    return TrainState(model, optimizer, scheduler, scaler, ema), lr


def build_model(cfg: Config, info: DataInfo) -> nn.Module:
    overrides = dict(cfg.model.overrides)
    n = overrides.setdefault("num_classes", info.num_classes)
    if n != info.num_classes:
        raise UserError(
            f"model.num_classes = {n} but data '{info.name}' has {info.num_classes} classes"
        )
    try:
        return create_model(cfg.model.name, **overrides)
    except ValueError as e:
        raise UserError(f"model: {e}") from None


def model_profile(model: nn.Module, img_size: int) -> dict[str, float]:
    """Params (M) and GMACs (fvcore), logged with the run."""
    from suite.profile import count_flops

    return {
        "params_m": count_params(model)[0] / 1e6,
        "gmacs": count_flops(model, img_size).gmacs_fvcore,
    }


def default_run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name} s{cfg.train.seed}"


def run_tags(recipe: Recipe, world: int, extra: dict[str, str]) -> dict[str, Any]:
    cfg, device = recipe.cfg, recipe.device
    cuda = device.type == "cuda"
    return {
        "model": cfg.model.name,
        "family": get_entry(cfg.model.name).family,
        "dataset": recipe.data.info.name,
        "device": device.type,
        "amp": recipe.amp,
        "world_size": world,
        **environment_tags(),
        **extra,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "pid": os.getpid(),  # with the host tag: whether a RUNNING run's process still lives
    }


def run_params(
    cfg: Config, recipe: Recipe, lr: float, world: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """The run's params: its settings (not the tracking section: that is the run's name and
    place, which the run name and experiment say already; config.toml keeps it all) and what
    they resolved to."""
    settings = {k: v for k, v in cfg.to_dict().items() if k != "tracking"}
    return {
        **flatten(settings),
        "lr_effective": lr,
        "amp_resolved": recipe.amp,
        "global_batch": cfg.train.batch_size * world,
        **extra,
    }


def record_start(
    run: Run,
    params: dict[str, Any],
    folder: Path,
    cfg: Config,
    info: DataInfo,
    profile: dict[str, float],
) -> None:
    """What a new run records before its first epoch."""
    run.log_params(params)
    run.set_tags({"checkpoint_dir": str(folder.resolve())})
    run.log_text(to_toml(cfg.to_dict()), "config.toml")  # redacted by the tracker
    run.log_dataset(info, "train")
    run.log_metrics(profile, step=0)


def log_missing_epochs(run: Run, tracker: Tracker, history: list[dict[str, float]]) -> None:
    """A process killed after an epoch's checkpoint but before its metrics reached the store:
    log what is missing, so that each epoch is recorded exactly once."""
    if not history or not run.run_id:
        return
    logged = {int(step) for step, _ in tracker.metric_history(run.run_id, "epoch")}
    run.log_metric_rows(
        [(int(h["epoch"]), _epoch_row(h)) for h in history if int(h["epoch"]) not in logged]
    )


# settings that may change on a resume: where things are and how they run, not what is
# trained (the run's params keep the first values; these do not describe the result)
RESUME_MAY_CHANGE = (
    "train.out_dir",
    "train.device",
    "train.checkpoint",
    "data.workers",
    "data.root",
)


def check_resumed_run(tracker: Tracker, run_id: str, cfg: Config, resume: str) -> None:
    """``--resume`` goes on in the checkpoint's own run: refused when that run is in another
    experiment than tracking.experiment, or when its logged params disagree with the config
    (a resumed run keeps its first params, so the record would describe another training)."""
    try:
        run = tracker.get_run(run_id)
    except Exception as e:
        why = first_line(e)
        raise UserError(
            f"--resume {resume}: its run {run_id} is not in {tracker.uri} ({why})"
        ) from None
    client = getattr(tracker, "client", None)
    if client is not None:
        experiment = client.get_experiment(run.info.experiment_id).name
        if experiment != cfg.tracking.experiment:
            raise UserError(
                f"--resume {resume}: its run {run_id} belongs to experiment {experiment!r}, "
                f"not tracking.experiment = {cfg.tracking.experiment!r}"
            )
    logged = run.data.params
    settings = flatten({k: v for k, v in cfg.to_dict().items() if k != "tracking"})
    for key, value in settings.items():
        was = logged.get(key)
        # a value over MLflow's length limit was logged as its hash (suite.tracking)
        if was is None or key in RESUME_MAY_CHANGE or was.startswith("sha256:"):
            continue
        if was != str(value):
            raise UserError(
                f"--resume {resume}: the run logged {key} = {logged[key]}, the config now "
                f"says {value!r}; resume with the run's settings or start a new run"
            )


def start_point(
    resume: str | None, continue_run: str | None, tracker: Tracker
) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume from, its run's folder) for ``--resume`` or a continued run; a
    continued run that saved nothing yet keeps its folder and starts from epoch 0."""
    if resume:
        path = find_checkpoint(resume, tracker)
        return path, path.parent
    if continue_run:
        d = tracker.get_run(continue_run).data.tags.get("checkpoint_dir")
        folder = Path(d) if d and Path(d).is_dir() else None
        if folder is not None and (folder / "last.pt").is_file():
            return folder / "last.pt", folder
        return None, folder
    return None, None


# ---------------------------------------------------------------------------------------------
# One epoch


def compile_for_training(state: TrainState, recipe: Recipe, run: Run) -> nn.Module:
    """``state.net`` compiled as ``train.compile`` says, its first forward + backward run here
    on a zero batch of the training shape (gradients cleared), so that compile time is logged
    apart as ``compile_s`` and never counted in an epoch's img/s."""
    cfg, device, amp = recipe.cfg, recipe.device, recipe.amp
    mode = resolve_compile(cfg.train.compile, device)
    if mode == "eager":
        run.set_tags({"compile": "eager"})
        return state.net
    size = model_img_size(cfg.model.name, cfg.model.overrides)
    # every training batch has this many images (drop_last), else the one short batch
    batch = min(cfg.train.batch_size, len(recipe.data.sampler))
    x = torch.zeros(batch, cfg.model.overrides.get("in_chans", 3), size, size, device=device)

    def first_step(fn: nn.Module) -> None:
        with autocast(device, amp):
            out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().mean() for o in outs).backward()
        state.optimizer.zero_grad(set_to_none=True)

    state.net.train()
    c = compile_model(state.net, mode, first_step, device)
    run.set_tags({"compile": c.mode, **({"compile_fallback": c.fallback} if c.fallback else {})})
    if c.compile_s:
        run.log_metrics({"compile_s": c.compile_s}, step=state.epoch)
    return c.fn


def run_epoch(
    state: TrainState, recipe: Recipe, epoch: int, *, progress: bool
) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
    """Train one epoch and evaluate (the EMA too): the epoch's metrics, and the per-step rows
    that the caller logs after the checkpoint (one batched request per epoch)."""
    cfg, data, device, amp = recipe.cfg, recipe.data, recipe.device, recipe.amp
    data.sampler.set_epoch(epoch)
    # augmentation, dropout and drop-path draws depend on (seed, epoch) only: resume is exact
    seed_everything(cfg.train.seed * 1000 + epoch)
    base_step = epoch * len(data.train)
    step_rows: list[tuple[int, dict[str, float]]] = []
    what = f"epoch {epoch + 1}/{cfg.train.epochs}"
    bar = _progress_bar(len(data.train), what, cfg.train.batch_size) if progress else None
    opts = replace(
        recipe.steps, on_log=lambda s, v: step_rows.append((base_step + s, v)), progress=bar
    )
    m = train_one_epoch(
        state.net, data.train, state.optimizer, state.scheduler, recipe.criterion, device, opts
    )
    if bar is not None:
        bar.close()
    m.update(evaluate(state.model, data.val, device, amp, data.eval_prep))
    if state.ema is not None:
        ema = evaluate(state.ema.module, data.val, device, amp, data.eval_prep)
        m.update({f"ema_{k}": v for k, v in ema.items()})
    m["epoch"] = float(epoch + 1)
    if progress:
        from tqdm import tqdm

        # through tqdm: a matrix's bar above is cleared and redrawn, not written over
        tqdm.write(epoch_line(what, m, device), file=sys.stderr)
    return m, step_rows


def epoch_line(what: str, m: dict[str, float], device: torch.device) -> str:
    """``epoch 2/5  train_loss ...  val_top1 ...  640 img/s  3.1s``: an epoch's metrics; a
    disturbed img/s is marked, with the reason, and so is an epoch that waited for its data."""
    noisy = training_noise(m, device)
    bound = data_bound(m)
    return (
        f"{what}  train_loss {m['train_loss']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.2f}  "
        f"val_top5 {m['val_top5']:.2f}  {m['train_img_per_s']:.0f}{'*' if noisy else ''} "
        f"img/s  {m['epoch_s']:.1f}s"
        + (f"  (* timing disturbed: {noisy})" if noisy else "")
        + (f"  (data-bound: {bound}; raise data.workers)" if bound else "")
    )


class _progress_bar:
    """A tqdm bar over an epoch's steps, called by the loop as progress(step, loss)."""

    def __init__(self, total: int, desc: str, batch_size: int) -> None:
        from tqdm import tqdm

        self.batch_size = batch_size
        # on a terminal only (disable=None): logs and captured output get the epoch lines alone
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="step",
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,
        )

    def __call__(self, step: int, loss: float) -> None:
        self.bar.update(1)
        if not self.bar.disable and not math.isnan(loss):
            rate = self.bar.format_dict.get("rate") or 0.0
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate * self.batch_size:.0f}")

    def close(self) -> None:
        self.bar.close()


def _epoch_row(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k != "steps"}


# ---------------------------------------------------------------------------------------------
# Checkpoints, teachers, artifacts


def load_teacher(cfg: Config, device: torch.device, tracker: Tracker) -> nn.Module | None:
    """The frozen teacher: a checkpoint file, or an MLflow URI whose run holds a checkpoint
    artifact (``runs:/<id>``, ``models:/<name>/<version>``); read as tensors only, never
    unpickled. Its architecture is ``distill.teacher_model``, else the checkpoint's own."""
    k = cfg.distill
    if k.kind == "none":
        return None
    if k.teacher.startswith(("runs:/", "models:/")):
        if not tracker.uri:  # tracking off: the store the config names
            tracker = make_tracker(cfg.tracking.uri or None)
        # downloaded into a folder of its own, removed once read (never left in $TMPDIR)
        with tempfile.TemporaryDirectory(prefix="tntbench-teacher-") as tmp:
            path = tracker.checkpoint_from_uri(k.teacher, tmp)
            ckpt = load_checkpoint(path)
        path = Path(k.teacher)  # what the messages below name: the download is gone
    else:
        path = Path(k.teacher)
        ckpt = load_checkpoint(path)
    if not (k.teacher_model or ckpt.get("model_name")):
        raise UserError(f"distill.teacher_model: required, {path} does not name its model")
    try:
        teacher = checkpoint_model(ckpt, path, k.teacher_model)
    except UserError as e:
        raise UserError(f"distill.teacher: {e}") from None
    teacher.to(device)  # checkpoint_model returns it in eval mode
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def find_checkpoint(resume: str, tracker: Tracker) -> Path:
    """``--resume`` takes a checkpoint file, a run's checkpoint folder, or an MLflow run ID."""
    p = Path(resume)
    if p.is_file():
        return p
    if p.is_dir() and (p / "last.pt").is_file():
        return p / "last.pt"
    if re.fullmatch(r"[0-9a-f]{32}", resume):
        try:
            run = tracker.get_run(resume)
        except Exception as e:
            raise UserError(f"--resume {resume}: no such MLflow run ({e})") from None
        d = run.data.tags.get("checkpoint_dir")
        if d and (Path(d) / "last.pt").is_file():
            return Path(d) / "last.pt"
        raise UserError(f"--resume {resume}: the run has no checkpoint (looked in {d})")
    raise UserError(f"--resume {resume}: not a checkpoint file, folder or MLflow run ID")


def new_checkpoint_dir(out_dir: str | Path, name: str) -> Path:
    """A fresh folder for a run's checkpoints inside ``out_dir``: ``name`` made safe (path
    separators and dots become ``_``, so ``..`` cannot escape), with -2, -3, ... appended when
    taken, so two runs of the same name never share one. Created atomically (mkdir)."""
    safe = safe_name(name)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in itertools.count(1):
            folder = out / (safe if i == 1 else f"{safe}-{i}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(
            f"train.out_dir = {str(out_dir)!r}: cannot create a folder there ({e.strerror or e})"
        ) from None
    raise AssertionError("unreachable")


def _log_artifacts(run: Run, history: list, ckpt_dir: Path, cfg: Config, model: nn.Module) -> None:
    if not history:
        return
    fig = learning_curves(history, f"{cfg.model.name} on {cfg.data.name}")
    run.log_figure(fig, "learning_curves.png")
    pyplot().close(fig)
    best = ckpt_dir / "best.pt"
    if best.is_file() and "best.pt" in KEEP_CHECKPOINTS[cfg.train.keep_checkpoints]:
        # a link, not a second copy, where the artifact store is a local folder
        run.log_artifact(best, "checkpoints", link=True)
    if cfg.tracking.log_model:
        run.log_model(model.cpu())
