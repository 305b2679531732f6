"""The registry as a table (``tntbench models``)."""

from __future__ import annotations

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


def models_table(names: list[str] | None = None, overrides: dict[str, Any] | None = None):
    rows = []
    for name in names or list_models():
        try:
            entry = get_entry(name)
            n = param_count(name, **(overrides or {}))
        except (ValueError, TypeError) as e:
            raise UserError(f"{name}: {e}") from None
        rows.append(
            {
                "model": name,
                "family": entry.family,
                "img": entry.img_size
                if not overrides
                else overrides.get("img_size", entry.img_size),
                "params (M)": round(n / 1e6, 2),
                "paper params (M)": entry.paper.params_m,
                "paper GFLOPs": entry.paper.gflops,
                "paper top-1": entry.paper.top1,
            }
        )
    return pd.DataFrame(rows).astype(object).where(lambda d: d.notna(), "-")
