"""The registry as a table (``tntbench models``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from suite.errors import UserError

from .registry import create_model, get_entry, list_models


def param_count(name: str, **overrides: Any) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def models_table(
    names: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    gmacs: Callable[..., float] | None = None,
) -> pd.DataFrame:
    """One row per model: params (ours, the paper's), the paper's GFLOPs and top-1; with
    ``gmacs(name, **overrides)`` (an fvcore count at the model's img size) a "GMACs" column
    beside the paper's figure."""
    rows = []
    for name in names or list_models():
        try:
            entry = get_entry(name)
            n = param_count(name, **(overrides or {}))
        except (ValueError, TypeError) as e:
            raise UserError(f"{name}: {e}") from None
        row = {
            "model": name,
            "family": entry.family,
            "img": (overrides or {}).get("img_size", entry.img_size),
            "params (M)": round(n / 1e6, 2),
            "paper params (M)": entry.paper.params_m,
        }
        if gmacs is not None:
            row["GMACs (fvcore)"] = f"{gmacs(name, **(overrides or {})):.3f}"
        row |= {"paper GFLOPs": entry.paper.gflops, "paper top-1": entry.paper.top1}
        rows.append(row)
    return pd.DataFrame(rows).astype(object).where(lambda d: d.notna(), "-")
