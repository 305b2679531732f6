"""The training loop's parts: optimizer, schedule, losses, one epoch, evaluation.

Each function takes explicit objects and returns plain values (``dict[str, float]``), so the
same pieces serve ``tntbench train``, the matrix and the search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from suite import noise
from suite.config import DistillConfig
from suite.runtime import autocast

# an epoch whose model waited for data longer than this share of its wall time is data-bound:
# its img/s measures the loader, not the model (issue 23); the epoch line and the run say so
DATA_BOUND_FRAC = 0.10


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, tokens and position tables (DeiT, timm)."""
    decay, no_decay = [], []
    named = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in named
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to lr, then cosine down to min_lr, stepped once per batch."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@dataclass
class Criterion:
    """Label-smoothed cross entropy (soft targets under MixUp/CutMix), plus DeiT distillation.

    ``outputs`` is the model's output: logits (B, K), or (class logits, dist logits) for a
    distilled model in training. ``teacher_logits`` (B, K) when distilling.
    """

    label_smoothing: float = 0.0
    distill: DistillConfig | None = None

    def __call__(
        self,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(outputs, tuple):
            return self.ce(outputs, target)
        cls_out, dist_out = outputs
        if teacher_logits is None:  # distilled architecture without a teacher: both heads on labels
            return (self.ce(cls_out, target) + self.ce(dist_out, target)) / 2
        alpha = self.distill.alpha
        base = self.ce(cls_out, target)
        if self.distill.kind == "hard":
            # DeiT hard distillation: the dist head learns the teacher's argmax
            dist_loss = F.cross_entropy(dist_out.float(), teacher_logits.argmax(dim=-1))
        else:
            tau = self.distill.tau
            dist_loss = F.kl_div(
                F.log_softmax(dist_out.float() / tau, dim=-1),
                F.log_softmax(teacher_logits.float() / tau, dim=-1),
                reduction="batchmean",
                log_target=True,
            ) * (tau * tau)
        return (1 - alpha) * base + alpha * dist_loss

    def ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # target: class indices (B,) or soft targets (B, K) from MixUp/CutMix
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run diverged."""


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class TrainState:
    """Everything a training run carries from step to step and epoch to epoch; what a
    checkpoint saves (``suite.training.checkpoint.Checkpointer``)."""

    model: nn.Module  # the bare model: its state dict is what checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None
    net: nn.Module | None = None  # what the step calls: the model, DDP-wrapped and/or compiled
    epoch: int = 0  # epochs completed
    best: float = -math.inf  # best val top-1 so far
    history: list[dict[str, float]] = field(default_factory=list)

    def finish_epoch(self, metrics: dict[str, float]) -> bool:
        """Record an epoch's metrics; True if its top-1 is a new best."""
        self.history.append(metrics)
        self.epoch += 1
        improved = metrics["val_top1"] > self.best
        self.best = max(self.best, metrics["val_top1"])
        return improved


def forward_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Criterion,
    teacher: nn.Module | None,
    device: torch.device,
    amp: str,
) -> torch.Tensor:
    """The training loss of a batch under autocast, with the frozen teacher's logits."""
    with autocast(device, amp):
        out = model(x)
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
        return criterion(out, y, t_logits)


def optimizer_step(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float,
) -> None:
    """Backward and one optimizer step; with fp16's grad scaler, gradients are unscaled before
    clipping and a step with inf/NaN gradients is skipped."""
    optimizer.zero_grad(set_to_none=True)
    scaled = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaled else loss).backward()
    if clip_grad > 0:
        if scaled:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class EpochClock:
    """Splits an epoch's time into waiting for the loader and computing, and watches the
    conditions (``suite.noise``), so that a data-loading stall or another process's load never
    passes for the model's speed.

    On CPU every step is synchronous: the wait is the host's time in ``next(loader)`` and each
    step's compute time is timed. On CUDA the host runs ahead of the GPU, so a host wait can
    overlap queued GPU work; the stall counted is the GPU's idle gap between the end of one
    step and the start of the next (CUDA events, read once at the epoch's end), and the
    per-step spread, which the host cannot see, is left out."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_wait = 0.0
        self.first_wait = 0.0  # before the first step the device is idle, on CUDA too
        self.step_s: list[float] = []
        self.events: list[tuple[Any, Any]] = []  # CUDA: (end of step i, start of step i+1)

    def batches(self, loader: Iterable) -> Iterator[Any]:
        """``loader``'s batches; the time between two yields is a step's compute time."""
        it = iter(loader)
        done = None
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.host_wait += t1 - t0
            if not self.step_s:
                self.first_wait = t1 - t0
            if self.cuda and done is not None:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                self.events.append((done, start))
            yield batch
            self.step_s.append(time.perf_counter() - t1)
            if self.cuda:
                done = torch.cuda.Event(enable_timing=True)
                done.record()

    def data_wait_s(self) -> float:
        """Seconds the device waited for data (CUDA: call after a synchronize)."""
        if not self.cuda:
            return self.host_wait
        gaps = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.first_wait + gaps

    def metrics(self, seen: int, elapsed: float, cond: noise.Conditions) -> dict[str, float]:
        """data_wait_s, train_img_per_s over compute time (the wait excluded), the wall-clock
        rate beside it, and the conditions under ``suite.noise``'s stable names."""
        wait = min(self.data_wait_s(), elapsed)
        compute = elapsed - wait
        out = {
            "data_wait_s": wait,
            "data_wait_frac": wait / elapsed if elapsed > 0 else 0.0,  # of the wall time
            "train_img_per_s": seen / compute if compute > 0 else 0.0,
            "train_img_per_s_wall": seen / elapsed if elapsed > 0 else 0.0,
        }
        window = noise.Window(self.step_s if not self.cuda else [], cond)
        if window.times:
            out.update(noise.window_metrics(window))
        else:  # no per-step spread: the conditions alone
            out.update(
                timing_other_cpu=cond.other_cpu,
                load_avg_1m=cond.load_avg_1m_after,
                load_avg_1m_before=cond.load_avg_1m_before,
                timing_steps=0.0,
                timing_window_s=cond.window_s,
                timing_cores=float(cond.cores),
            )
        return out


def device_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    prep: Callable | None,
    mixup: Callable | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the training device, through the batch-level input pipeline: ``prep``
    turns (B, 3, H, W) uint8 into normalised float (erased, mixed), then ``mixup`` for loaders
    whose items are already float. Copies are asynchronous from pinned memory."""
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if prep is not None:
        x, y = prep(x, y)
    if mixup is not None:
        x, y = mixup(x, y)
    return x, y


@dataclass(frozen=True)
class StepOptions:
    """How each training step of an epoch runs, beyond the model, its optimizer and the loss:
    built once by ``fit`` from the config and passed whole (``dataclasses.replace`` changes a
    field, e.g. the per-epoch ``on_log``)."""

    amp: str = "fp32"  # autocast precision (suite.runtime.autocast)
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA
    clip_grad: float = 0.0  # max grad norm; 0 = off
    ema: nn.Module | None = None  # an AveragedModel updated after each step
    # the batch-level input pipeline on the device (``pipeline.BatchPrep``: uint8 images
    # normalised, erased, mixed), and a mix for loaders whose items are already float
    prep: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    mixup: Callable | None = None
    teacher: nn.Module | None = None  # a frozen teacher for DeiT's distillation
    log_every: int = 20  # steps between per-step metrics given to ``on_log``
    on_log: Callable[[int, dict[str, float]], None] | None = None  # (step, metrics), buffered
    progress: Callable[[int, float], None] | None = None  # (step, loss or nan), a progress bar


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: Criterion,
    device: torch.device,
    opts: StepOptions = StepOptions(),  # noqa: B008 - frozen, so one shared default is safe
) -> dict[str, float]:
    """One pass over ``loader``: train_loss, train_img_per_s (over compute time: the loader's
    stalls are apart as data_wait_s; train_img_per_s_wall is the wall-clock rate), epoch_s,
    steps, and the timing conditions (``EpochClock``). Per-step metrics go to ``opts.on_log``
    every ``opts.log_every`` steps (the caller buffers them: no logging inside the timed loop).
    Raises NonFiniteLoss if the loss diverges."""
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
    seen = steps = 0
    clock = EpochClock(device)
    with noise.watch(device) as cond:
        t0 = time.perf_counter()
        for x, y in clock.batches(loader):
            x, y = device_batch(x, y, device, opts.prep, opts.mixup)
            loss = forward_loss(model, x, y, criterion, opts.teacher, device, opts.amp)
            optimizer_step(model, loss, optimizer, opts.scaler, opts.clip_grad)
            scheduler.step()
            if opts.ema is not None:
                opts.ema.update_parameters(model)
            loss_sum += loss.detach() * x.shape[0]
            seen += x.shape[0]
            steps += 1
            if steps % opts.log_every == 0:
                _check_and_log(loss, steps, optimizer, opts.on_log)
            if opts.progress is not None:
                opts.progress(steps, loss.item() if steps % 10 == 0 else float("nan"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    total_loss, total_seen = _all_reduce([loss_sum.item(), seen], device)
    mean_loss = total_loss / max(total_seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"mean training loss is {mean_loss}")
    return {
        "train_loss": mean_loss,
        **clock.metrics(total_seen, elapsed, cond[0]),
        "epoch_s": elapsed,
        "steps": float(steps),
    }


def data_bound(metrics: dict[str, float]) -> str:
    """Why an epoch was data-bound ("" = it was not): the share of its wall time the model
    waited for the loader (``data_wait_frac``) above ``DATA_BOUND_FRAC``."""
    frac = metrics.get("data_wait_frac", 0.0)
    if frac <= DATA_BOUND_FRAC:
        return ""
    return (
        f"waited for data {100 * frac:.0f}% of the wall time (limit {100 * DATA_BOUND_FRAC:.0f}%)"
    )


def training_noise(metrics: dict[str, float], device: torch.device) -> str:
    """Why an epoch's train_img_per_s cannot be trusted ("" = it can): ``suite.noise``'s rule
    applied to the conditions ``train_one_epoch`` returned."""
    return noise.metrics_reason(metrics, noise.need_cores(device))


def _check_and_log(
    loss: torch.Tensor,
    steps: int,
    optimizer: torch.optim.Optimizer,
    on_log: Callable[[int, dict[str, float]], None] | None,
) -> None:
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} at step {steps}")
    if on_log is not None:
        on_log(steps, {"train_loss_step": value, "lr": optimizer.param_groups[0]["lr"]})


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: str = "fp32",
    prep: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (in %) over ``loader``, summed across ranks under DDP. ``prep``:
    the batch-level input pipeline (uint8 -> normalised float; it must not mix labels)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if prep is not None:
            x, y = prep(x, y)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, k)
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=-1).sum()
        n += y.shape[0]
    loss, c1, c5, total = _all_reduce(
        [loss_sum.item(), correct1.item(), correct5.item(), n], device
    )
    total = max(total, 1)
    return {"val_loss": loss / total, "val_top1": 100 * c1 / total, "val_top5": 100 * c5 / total}
