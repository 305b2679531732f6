"""Fidelity: timm's model, random init, weights converted onto ours, same logits."""

import pytest
import torch

from suite.models import create_model, load_timm_state_dict

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "name",
    [
        "tnt_s_patch16_224",
        "tnt_b_patch16_224",
        "deit_small_patch16_224",
        "deit_small_distilled_patch16_224",
        pytest.param("vit_base_patch16_224", marks=pytest.mark.slow),  # 86 M params: seconds
    ],
)
def test_logits_match_timm(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    # random init of timm leaves biases/pos at zero: perturb every tensor so all of them matter
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # TNT's inner blocks on the PyTorch path (the Triton kernel has tests/test_triton_inner.py)
    kw = {"inner_kernel": "torch"} if name.startswith("tnt") else {}
    ours = load_timm_state_dict(create_model(name, **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_official_tnt_checkpoint_names_load():
    """The huawei-noah checkpoint layout (inner_pos as (1, P, c), outer_tokens) loads too."""
    ref = timm.create_model("tnt_s_patch16_224", pretrained=False, depth=1).eval()
    sd = ref.state_dict()
    renames = {
        "patch_pos": "outer_pos",
        "pixel_pos": "inner_pos",
        "norm1_proj": "proj_norm1",
        "norm2_proj": "proj_norm2",
        "pixel_embed": "patch_embed",
        "norm_in": "inner_norm1",
        "attn_in": "inner_attn",
        "norm_mlp_in": "inner_norm2",
        "mlp_in": "inner_mlp",
        "norm_out": "outer_norm1",
        "attn_out": "outer_attn",
        "norm_mlp": "outer_norm2",
        "mlp": "outer_mlp",
    }
    official = {}
    for k, v in sd.items():
        parts = k.split(".")
        idx = 2 if parts[0] == "blocks" else 0
        parts[idx] = renames.get(parts[idx], parts[idx])
        if k == "pixel_pos":
            v = v.flatten(2).transpose(1, 2)
        official[".".join(parts)] = v
    official["outer_tokens"] = torch.zeros(1)
    ours = load_timm_state_dict(create_model("tnt_s_patch16_224", depth=1), official).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)


def test_mismatched_checkpoint_is_rejected():
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="does not fit|shape"):
        load_timm_state_dict(create_model("deit_small_patch16_224"), ref.state_dict())
