"""``tntbench train``: one training run from a Config, on CPU, one GPU or many (torchrun).

Builds the data, model, optimizer, schedule, EMA and teacher; runs the epochs of
``suite.engine``; checkpoints every epoch (and on Ctrl-C); resumes exactly; tracks everything
through ``suite.tracking`` (only rank 0 logs).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from suite.checkpoint import load_checkpoint, load_weights, model_state, rng_state, save_checkpoint
from suite.config import Config, safe_name, to_toml
from suite.data import DataInfo, build_datasets, build_mixup
from suite.engine import (
    Criterion,
    autocast,
    build_ema,
    build_optimizer,
    build_scheduler,
    evaluate,
    resolve_amp,
    train_one_epoch,
)
from suite.errors import UserError
from suite.models import create_model, get_entry
from suite.runtime import compile_model, oom_message, resolve_compile
from suite.tracking import Run, Tracker, environment_tags, flatten, make_tracker


@dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's metrics, plus params_m and gmacs
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: str = ""
    best_top1: float = 0.0


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device = '{name}': no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def default_run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name}/{cfg.data.name}/s{cfg.train.seed}"


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


def model_img_size(cfg: Config) -> int:
    return cfg.model.overrides.get("img_size", get_entry(cfg.model.name).img_size)


def load_teacher(cfg: Config, device: torch.device, tracker: Tracker) -> nn.Module | None:
    """The frozen teacher: a checkpoint file, or an MLflow URI whose run holds a checkpoint
    artifact (``runs:/<id>``, ``models:/<name>/<version>``); read as tensors only, never
    unpickled. Its architecture is ``distill.teacher_model``, else the checkpoint's own."""
    k = cfg.distill
    if k.kind == "none":
        return None
    if k.teacher.startswith(("runs:/", "models:/")):
        if not tracker.uri:  # torchrun's other ranks: the store the config names
            tracker = make_tracker(cfg.tracking.uri or None)
        path = tracker.checkpoint_from_uri(k.teacher)
    else:
        path = Path(k.teacher)
    ckpt = load_checkpoint(path)
    name = k.teacher_model or ckpt.get("model_name")
    if not isinstance(name, str) or not name:
        raise UserError(f"distill.teacher_model: required, {path} does not name its model")
    kwargs = ckpt.get("model_kwargs", {}) if ckpt.get("model_name", name) == name else {}
    try:
        teacher = create_model(name, **(kwargs if isinstance(kwargs, dict) else {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"distill.teacher {path}: {e}") from None
    load_weights(teacher, model_state(ckpt, path), path)
    teacher.to(device).eval()
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


def resume_state(path: Path, cfg: Config, device: torch.device, state: dict[str, Any]) -> dict:
    """Load a checkpoint into the run's objects (``state``: model, optimizer, scheduler,
    scaler, ema); a checkpoint of another model or a damaged one is one UserError."""
    ckpt = load_checkpoint(path, map_location=device)
    name = ckpt.get("model_name")
    if name != cfg.model.name:
        raise UserError(
            f"--resume {path}: a checkpoint of {name!r}, but the config trains {cfg.model.name!r}"
        )
    load_weights(state["model"], model_state(ckpt, path), path)
    try:
        for key in ("optimizer", "scheduler", "scaler"):
            state[key].load_state_dict(ckpt[key])
        if state["ema"] is not None and ckpt.get("ema") is not None:
            state["ema"].load_state_dict(ckpt["ema"])
        int(ckpt["epoch"]), float(ckpt["best_top1"]), list(ckpt["history"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(
            f"--resume {path}: not a complete tntbench checkpoint ({type(e).__name__}: {e})"
        ) from None
    return ckpt


# ---------------------------------------------------------------------------------------------
# The run


def fit(
    cfg: Config,
    tracker: Tracker,
    resume: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    extra_params: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    continue_run: str | None = None,
) -> TrainResult:
    """Train ``cfg`` as one tracked run; returns its final metrics and history.

    ``resume``: a checkpoint file or folder, or a run ID, to continue exactly from.
    ``continue_run``: the ID of a tracked run that was cut short (a killed process): it goes on
    in that same run, from its last checkpoint if it saved one, else from the start.
    """
    rank, local_rank, world = dist_env()
    device = resolve_device(cfg.train.device, local_rank)
    if world > 1 and not dist.is_initialized():
        # NCCL for GPUs; gloo for CPU processes, also on a machine that has GPUs
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _fit(
            cfg,
            tracker if rank == 0 else Tracker(),
            resume,
            parent_run_id,
            extra_tags,
            extra_params,
            on_epoch,
            progress and rank == 0,
            continue_run,
        )
    except torch.cuda.OutOfMemoryError:
        # the run is already FAILED (with the error as a tag); the user gets one line
        raise UserError(oom_message("train.batch_size", cfg.train.batch_size, device)) from None
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit(
    cfg, tracker, resume, parent_run_id, extra_tags, extra_params, on_epoch, progress, continue_run
):
    rank, local_rank, world = dist_env()
    t = cfg.train
    device = resolve_device(t.device, local_rank)
    amp = resolve_amp(t.amp, device)
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp = 'fp16' needs a CUDA device (use bf16 on CPU)")
    seed_everything(t.seed)

    img_size = model_img_size(cfg)
    train_ds, val_ds, info = build_datasets(cfg.data, img_size)
    model = build_model(cfg, info).to(device)
    from suite.profile import count_flops

    flops = count_flops(model, img_size)
    n_params = sum(p.numel() for p in model.parameters())
    profile = {"params_m": n_params / 1e6, "gmacs": flops.gmacs_fvcore}

    train_sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed,
        drop_last=len(train_ds) >= t.batch_size * world,
    )  # fmt: skip
    val_sampler = DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False)
    loader_kw = dict(num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.data.workers > 0)  # fmt: skip
    train_loader = DataLoader(
        train_ds,
        t.batch_size,
        sampler=train_sampler,
        drop_last=train_sampler.drop_last,
        **loader_kw,
    )
    val_loader = DataLoader(val_ds, t.batch_size, sampler=val_sampler, **loader_kw)

    global_batch = t.batch_size * world
    lr = t.lr or t.base_lr * global_batch / 512  # DeiT's linear scaling rule
    steps_per_epoch = max(len(train_loader), 1)
    optimizer = build_optimizer(model, lr, t.weight_decay)
    scheduler = build_scheduler(
        optimizer, t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch), lr, t.min_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = build_ema(model, t.ema_decay) if t.ema else None
    teacher = load_teacher(cfg, device, tracker)
    criterion = Criterion(t.label_smoothing, cfg.distill if teacher is not None else None)
    mixup = build_mixup(cfg.data, info.num_classes)

    start_epoch, history, best, run_id = 0, [], -math.inf, continue_run
    ckpt_path, old_dir = None, None
    if resume:
        ckpt_path = find_checkpoint(resume, tracker)
    elif continue_run:  # a run cut short (killed): its checkpoint if it got to one
        old_dir = tracker.get_run(continue_run).data.tags.get("checkpoint_dir")
        last = Path(old_dir) / "last.pt" if old_dir else None
        ckpt_path = last if last is not None and last.is_file() else None
    if ckpt_path is not None:
        objects = dict(
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema
        )
        ckpt = resume_state(ckpt_path, cfg, device, objects)
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        best, run_id = ckpt["best_top1"], ckpt.get("run_id") or run_id

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    tags = {"model": cfg.model.name, "family": get_entry(cfg.model.name).family,
            "dataset": info.name, "device": device.type, "amp": amp, "world_size": world,
            **environment_tags(), **(extra_tags or {})}  # fmt: skip
    tags["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tags["pid"] = os.getpid()  # with the host tag: whether a RUNNING run's process still lives

    with tracker.run(cfg.tracking.experiment, default_run_name(cfg), tags, parent_run_id,
                     run_id) as run:  # fmt: skip
        if ckpt_path is not None:  # the checkpoint's own folder, tracked or not
            ckpt_dir = ckpt_path.parent
        elif old_dir and Path(old_dir).is_dir():  # a continued run that saved nothing yet
            ckpt_dir = Path(old_dir)
        elif rank == 0:
            ckpt_dir = new_checkpoint_dir(t.out_dir, run.run_id or default_run_name(cfg))
        else:  # other ranks never write checkpoints
            ckpt_dir = Path(t.out_dir)
        if ckpt_path is None:
            params = flatten(cfg.to_dict())
            params.update(lr_effective=lr, global_batch=global_batch, amp_resolved=amp)
            params.update(extra_params or {})
            run.log_params(params)
            run.set_tags({"checkpoint_dir": str(ckpt_dir.resolve())})
            run.log_text(to_toml(cfg.to_dict()), "config.toml")
            run.log_dataset(info, "train")
            run.log_metrics(profile, step=0)
        elif history and run.run_id:
            # killed after an epoch's checkpoint but before its metrics reached the store:
            # log what is missing, so that each epoch is recorded exactly once
            logged = {int(step) for step, _ in tracker.metric_history(run.run_id, "epoch")}
            run.log_metric_rows(
                [(int(h["epoch"]), _epoch_row(h)) for h in history if int(h["epoch"]) not in logged]
            )
        if cfg.tracking.system_metrics:
            run.start_system_metrics()
        net = _compile(net, cfg, device, amp, len(train_sampler), optimizer, run, start_epoch)

        def save(name: str, epoch: int) -> None:
            if rank != 0 or not t.checkpoint:
                return
            state = {
                "model": model.state_dict(),
                "model_name": cfg.model.name,
                "model_kwargs": {**cfg.model.overrides, "num_classes": info.num_classes},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch,
                "history": history,
                "best_top1": best,
                "run_id": run.run_id,
                "config_toml": to_toml(cfg.to_dict()),
                "rng": rng_state(),
            }
            save_checkpoint(ckpt_dir / name, state)  # atomic; tensors and plain data only

        completed = start_epoch
        try:
            for epoch in range(start_epoch, t.epochs):
                metrics, step_rows = _run_epoch(
                    epoch,
                    cfg,
                    net,
                    model,
                    ema,
                    train_loader,
                    val_loader,
                    train_sampler,
                    optimizer,
                    scheduler,
                    scaler,
                    criterion,
                    device,
                    amp,
                    mixup,
                    teacher,
                    progress,
                )
                history.append(metrics)
                improved = metrics["val_top1"] > best
                best = max(best, metrics["val_top1"])
                completed = epoch + 1
                save("last.pt", completed)
                if improved:
                    save("best.pt", completed)
                # after the checkpoint: a resume re-logs an epoch only if it never got here
                run.log_metric_rows([*step_rows, (epoch + 1, _epoch_row(metrics))])
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
        except KeyboardInterrupt:
            # at an epoch boundary the state is exact; mid-epoch, --resume redoes that epoch
            save("last.pt", completed)
            print(f"\ninterrupted: checkpoint saved in {ckpt_dir}", file=sys.stderr)
            raise

        final = {**history[-1], **profile} if history else dict(profile)
        final["best_val_top1"] = best
        run.log_metrics({"best_val_top1": best})
        if rank == 0:
            _log_artifacts(run, history, ckpt_dir, cfg, model)
        return TrainResult(run.run_id, final, history, str(ckpt_dir), best)


def _compile(
    net, cfg: Config, device, amp: str, samples: int, optimizer, run: Run, epoch: int
) -> nn.Module:
    """``net`` compiled as ``train.compile`` says, its first forward + backward run here on a
    zero batch of the training shape (gradients cleared), so that compile time is logged apart
    as ``compile_s`` and never counted in an epoch's img/s."""
    mode = resolve_compile(cfg.train.compile, device)
    if mode == "eager":
        run.set_tags({"compile": "eager"})
        return net
    size = model_img_size(cfg)
    # every training batch has this many images (drop_last), else the one short batch
    batch = min(cfg.train.batch_size, samples)
    x = torch.zeros(batch, cfg.model.overrides.get("in_chans", 3), size, size, device=device)

    def first_step(fn: nn.Module) -> None:
        with autocast(device, amp):
            out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().mean() for o in outs).backward()
        optimizer.zero_grad(set_to_none=True)

    net.train()
    c = compile_model(net, mode, first_step, device)
    tags = {"compile": c.mode}
    if c.fallback:
        tags["compile_fallback"] = c.fallback
    run.set_tags(tags)
    if c.compile_s:
        run.log_metrics({"compile_s": c.compile_s}, step=epoch)
    return c.fn


def _run_epoch(
    epoch,
    cfg,
    net,
    model,
    ema,
    train_loader,
    val_loader,
    sampler,
    optimizer,
    scheduler,
    scaler,
    criterion,
    device,
    amp,
    mixup,
    teacher,
    progress,
) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
    t = cfg.train
    sampler.set_epoch(epoch)
    # augmentation, dropout and drop-path draws depend on (seed, epoch) only: resume is exact
    seed_everything(t.seed * 1000 + epoch)
    steps_per_epoch = len(train_loader)
    step_logs: list[tuple[int, dict[str, float]]] = []
    base_step = epoch * steps_per_epoch
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step",
                   leave=False, file=sys.stderr, dynamic_ncols=True)  # fmt: skip

    def on_progress(step: int, loss: float) -> None:
        bar.update(1)
        if not math.isnan(loss):
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate * t.batch_size:.0f}")

    m = train_one_epoch(
        net, train_loader, optimizer, scheduler, criterion, device, amp, scaler, t.clip_grad,
        ema, mixup, teacher, cfg.tracking.log_every,
        on_log=lambda s, v: step_logs.append((base_step + s, v)),
        progress=on_progress if bar is not None else None,
    )  # fmt: skip
    if bar is not None:
        bar.close()
    m.update(evaluate(model, val_loader, device, amp))
    if ema is not None:
        m.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, device, amp).items()})
    m["epoch"] = float(epoch + 1)
    if progress:
        print(
            f"epoch {epoch + 1}/{t.epochs}  train_loss {m['train_loss']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.2f}  "
            f"val_top5 {m['val_top5']:.2f}  {m['train_img_per_s']:.0f} img/s  "
            f"{m['epoch_s']:.1f}s",
            file=sys.stderr,
        )
    # logged by the caller after the checkpoint: one batched request per epoch
    return m, step_logs


def _epoch_row(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k != "steps"}


def _log_artifacts(run: Run, history, ckpt_dir: Path, cfg: Config, model: nn.Module) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [h["val_top1"] for h in history], "o-", label="top-1")
    b.plot(epochs, [h["val_top5"] for h in history], "o-", label="top-5")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{cfg.model.name} on {cfg.data.name}")
    b.legend()
    fig.tight_layout()
    run.log_figure(fig, "learning_curves.png")
    plt.close(fig)
    best = ckpt_dir / "best.pt"
    if best.is_file():
        run.log_artifact(best, "checkpoints")
    if cfg.tracking.log_model:
        run.log_model(model.cpu())
