"""Map timm (and official TNT) checkpoints onto our models, so published weights fine-tune here.

ViT/DeiT use timm's parameter names already. TNT differs in three ways: timm keeps separate
``qk`` and ``v`` projections (we fuse them into one ``qkv``), names the inner/outer sub-blocks
flat (``norm_in``, ``attn_out``, ...), and stores the pixel position table as (1, c, g, g)
where ours is (1, P, c).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .tnt import TNT

# official huawei-noah names -> timm names (applied first, so both formats load)
_OFFICIAL_TO_TIMM = [
    (r"^outer_pos$", "patch_pos"),
    (r"^inner_pos$", "pixel_pos"),
    (r"^patch_embed\.", "pixel_embed."),
    (r"\.proj_norm1\.", ".norm1_proj."),
    (r"\.proj_norm2\.", ".norm2_proj."),
    (r"^proj_norm1\.", "norm1_proj."),
    (r"^proj_norm2\.", "norm2_proj."),
    (r"\.inner_norm1\.", ".norm_in."),
    (r"\.inner_attn\.", ".attn_in."),
    (r"\.inner_norm2\.", ".norm_mlp_in."),
    (r"\.inner_mlp\.", ".mlp_in."),
    (r"\.outer_norm1\.", ".norm_out."),
    (r"\.outer_attn\.", ".attn_out."),
    (r"\.outer_norm2\.", ".norm_mlp."),
    (r"\.outer_mlp\.", ".mlp."),
]

# timm TNT block names -> ours (inner/outer are our shared pre-norm Blocks)
_TIMM_TNT_BLOCK = {
    "norm_in": "inner.norm1",
    "attn_in": "inner.attn",
    "norm_mlp_in": "inner.norm2",
    "mlp_in": "inner.mlp",
    "norm1_proj": "proj_norm1",
    "proj": "proj",
    "norm2_proj": "proj_norm2",
    "norm_out": "outer.norm1",
    "attn_out": "outer.attn",
    "norm_mlp": "outer.norm2",
    "mlp": "outer.mlp",
}


def _convert_tnt(sd: Mapping[str, torch.Tensor], model: TNT) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "outer_tokens":  # unused tensor of the official code
            continue
        for pat, rep in _OFFICIAL_TO_TIMM:
            k = re.sub(pat, rep, k)
        m = re.match(r"^blocks\.(\d+)\.([a-z0-9_]+)\.(.+)$", k)
        if m and m.group(2) in _TIMM_TNT_BLOCK:
            k = f"blocks.{m.group(1)}.{_TIMM_TNT_BLOCK[m.group(2)]}.{m.group(3)}"
        if k == "pixel_pos" and v.ndim == 4:  # timm: (1, c, g, g) -> ours: (1, P, c)
            v = v.flatten(2).transpose(1, 2)
        renamed[k] = v
    # fuse timm's qk (2c x c) and v (c x c) into one qkv (3c x c): rows q, k, v as ours reads them
    out: dict[str, torch.Tensor] = {}
    for k, v in renamed.items():
        if ".attn.qk." in k:
            kv = k.replace(".attn.qk.", ".attn.v.")
            out[k.replace(".attn.qk.", ".attn.qkv.")] = torch.cat([v, renamed[kv]], dim=0)
        elif ".attn.v." not in k:
            out[k] = v
    return out


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a timm (or official TNT) checkpoint of the same architecture into ``model``.

    Strict: any missing, unexpected or mis-shaped tensor raises a ValueError naming it.
    """
    sd = state_dict.get("state_dict", state_dict.get("model", state_dict))
    converted = _convert_tnt(sd, model) if isinstance(model, TNT) else dict(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for k, v in converted.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"checkpoint tensor {k} has shape {tuple(v.shape)}, "
                f"model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(converted, strict=True)
    return model
