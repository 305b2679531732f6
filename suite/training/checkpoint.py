"""Checkpoints: written atomically, read back only as tensors and plain data.

A checkpoint may come from anyone (a colleague, a shared MLflow server's artifacts or tags), so
it is never unpickled: ``torch.load(weights_only=True)`` accepts tensors, numbers, strings,
lists, tuples and dicts and refuses anything else. What we write fits that: state dicts,
history as dicts of floats, RNG states as tensors, the resolved config as TOML text.

A write goes to ``.<name>.tmp`` and is renamed over ``<name>`` once complete and synced, so a
crash or a full disk never leaves a half-written checkpoint where the last good one was.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import torch

from suite.errors import UserError, first_line


def rng_state() -> dict[str, Any]:
    """Python's and torch's (CPU and CUDA) generator states, as tensors."""
    _, mt, _ = random.getstate()  # (version, 625 ints, gauss) -> the 625 ints
    state: dict[str, Any] = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically. A failed write (disk full, read-only folder) is
    one ``UserError`` naming the file and the reason; the temporary file is removed and the
    previous checkpoint at ``path`` is left as it was."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory: the file write below is plain OS I/O
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(tmp, buf.getbuffer())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except BaseException:  # Ctrl-C mid-write: no stray temporary file either
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved at ``path``, read with ``weights_only=True``; anything else (a pickle
    with code in it, a truncated or foreign file) is one ``UserError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # whatever stops a safe read (a pickle with code, a bad file)
        first = first_line(e)
        raise UserError(
            f"checkpoint {path}: cannot be read safely (not a checkpoint, truncated, or holds "
            f"objects other than tensors and plain data): {first[:200]}"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def model_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict: a tntbench checkpoint's ``model`` entry, or a bare state dict."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path}: no model state dict in it")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, a mismatch (another architecture or size) one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:3])
        raise UserError(f"checkpoint {path} does not fit the model: {detail[:300]}") from None


def checkpoint_model(ckpt: dict[str, Any], path: str | Path, name: str | None = None) -> Any:
    """The model a training checkpoint describes (its one description: ``model_name`` and
    ``model_kwargs``, written by ``fit.checkpoint_meta``) with the checkpoint's weights, on the
    CPU in eval mode; what viz and a distillation teacher both load. ``name``: a model named
    by the user instead (a bare state dict has none; another name's kwargs are not used)."""
    from suite.models import create_model

    name = name or ckpt.get("model_name")
    if not isinstance(name, str) or not name:
        raise UserError(f"checkpoint {path}: it does not name its model")
    kwargs = ckpt.get("model_kwargs", {}) if ckpt.get("model_name", name) == name else {}
    if not isinstance(kwargs, dict):
        raise UserError(f"checkpoint {path}: model_kwargs is not a table of knobs")
    try:
        model = create_model(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: {e}") from None
    load_weights(model, model_state(ckpt, path), path)
    return model.eval()


# What a FINISHED run keeps (``train.keep_checkpoints``). A running or interrupted run always
# has its ``last.pt`` (everything ``--resume`` needs); once FINISHED nothing resumes it, and the
# optimizer's moments (AdamW: 2 x the weights) are dead weight in every cell of a study.
KEEP_CHECKPOINTS = {
    "best": ("best.pt",),  # the weights-only best (default): viz, teachers, fine-tuning
    "all": ("best.pt", "last.pt"),  # last.pt too, with its optimizer state
    "none": (),
}


class Checkpointer:
    """The only writer and reader of a run's checkpoints: ``last.pt`` after every epoch,
    holding everything ``--resume`` needs, and ``best.pt`` on a new best top-1, weights only
    (the model, its EMA if any, and what rebuilds it: no optimizer, schedule or RNG state).

    ``state`` is a ``TrainState`` (suite.training.engine); ``meta`` the run's fixed entries
    (model name and constructor arguments, config TOML, run ID). ``enabled`` is False on
    torchrun's other ranks and with ``train.checkpoint = false``.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], enabled: bool = True) -> None:
        self.folder, self.meta, self.enabled = Path(folder), meta, enabled

    def save_best(self, state: Any) -> None:
        """``best.pt``: the weights of the best epoch, without the optimizer state that only
        a resume needs (12.3 -> 4 bytes per parameter in fp32, 8 with an EMA)."""
        if not self.enabled:
            return
        ema = state.ema.state_dict() if state.ema is not None else None
        save_checkpoint(
            self.folder / "best.pt",
            {
                **self.meta,
                "model": state.model.state_dict(),
                "ema": ema,
                "epoch": state.epoch,
                "best_top1": state.best,
            },
        )

    def kept_size(self, keep: str) -> dict[str, float]:
        """``checkpoint_mb``: the size of what the run keeps once FINISHED (a metric)."""
        if not self.enabled:
            return {}
        kept = [self.folder / n for n in KEEP_CHECKPOINTS[keep]]
        return {"checkpoint_mb": sum(p.stat().st_size for p in kept if p.is_file()) / 2**20}

    def finish(self, keep: str) -> list[Path]:
        """The run is FINISHED: remove the checkpoints ``keep`` does not name; the kept files.
        A checkpointer that is off (another rank, ``train.checkpoint = false``) removes none."""
        if not self.enabled:
            return []
        kept = KEEP_CHECKPOINTS[keep]
        for name in ("best.pt", "last.pt"):
            if name not in kept:
                (self.folder / name).unlink(missing_ok=True)
        return [self.folder / n for n in kept if (self.folder / n).is_file()]

    def save(self, state: Any, name: str = "last.pt") -> None:
        if not self.enabled:
            return
        ema = state.ema.state_dict() if state.ema is not None else None
        save_checkpoint(
            self.folder / name,
            {
                **self.meta,
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(),
                "ema": ema,
                "epoch": state.epoch,
                "history": state.history,
                "best_top1": state.best,
                "rng": rng_state(),
            },
        )

    @staticmethod
    def restore(path: Path, state: Any, model_name: str, device: torch.device) -> str | None:
        """Load ``path`` into ``state`` (weights, optimizer, schedule, scaler, EMA, epoch,
        best, history); returns the checkpoint's run ID. Another model's checkpoint, or a
        damaged one, is one UserError."""
        ckpt = load_checkpoint(path, map_location=device)
        if ckpt.get("model_name") != model_name:
            raise UserError(
                f"--resume {path}: a checkpoint of {ckpt.get('model_name')!r}, but "
                f"the config trains {model_name!r}"
            )
        if "model" in ckpt and "optimizer" not in ckpt:
            raise UserError(
                f"--resume {path}: weights only (a best.pt), no optimizer state to resume from; "
                "resume from the run's last.pt, which it keeps until it finishes"
            )
        load_weights(state.model, model_state(ckpt, path), path)
        try:
            state.optimizer.load_state_dict(ckpt["optimizer"])
            state.scheduler.load_state_dict(ckpt["scheduler"])
            state.scaler.load_state_dict(ckpt["scaler"])
            if state.ema is not None and ckpt.get("ema") is not None:
                state.ema.load_state_dict(ckpt["ema"])
            state.epoch, state.best = int(ckpt["epoch"]), float(ckpt["best_top1"])
            state.history = list(ckpt["history"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(
                f"--resume {path}: not a complete tntbench checkpoint ({type(e).__name__}: {e})"
            ) from None
        return ckpt.get("run_id") or None
