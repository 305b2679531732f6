"""Models: shared layers, every registered model at a tiny size, paper/timm param counts."""

import pytest
import torch

from suite.cli import main
from suite.models import Attention, create_model, get_entry, list_models
from suite.models.summary import param_count

NANO = [n for n in list_models() if n.endswith(("nano", "nano_distilled"))]
BIG = [n for n in list_models() if n not in NANO]


def test_sdpa_matches_written_out_attention():
    attn = Attention(dim=48, num_heads=4).eval()
    x = torch.randn(3, 17, 48)
    attn.fused = True
    fused = attn(x)
    attn.fused = False
    written = attn(x)
    torch.testing.assert_close(fused, written, rtol=1e-5, atol=1e-6)


def _tiny(name):
    # nano models as registered; 224/384 models at depth 2 (same widths, heads, tokens)
    return create_model(name) if name in NANO else create_model(name, depth=2)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    model = _tiny(name)
    entry = get_entry(name)
    n_cls = model.num_classes
    x = torch.randn(1 if name in BIG else 2, 3, entry.img_size, entry.img_size)
    model.train()
    out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == (2 if model.distilled else 1)
    loss = sum(o.float().logsumexp(-1).sum() for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"zero gradient at {pname}"
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (x.shape[0], n_cls)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_distilled_heads_average_at_eval():
    model = create_model("deit_nano_distilled").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)


def test_tnt_patch_token_gets_pixel_projection_class_token_does_not():
    model = create_model("tnt_nano", depth=1).eval()
    blk = model.blocks[0]
    pixel = torch.randn(2 * 16, 16, 12)
    patch = torch.randn(2, 17, 96)
    seen = {}
    blk.outer.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    blk(pixel, patch)
    inner_out = blk.inner(pixel)
    delta = blk.proj_norm2(blk.proj(blk.proj_norm1(inner_out.reshape(2, 16, -1))))
    torch.testing.assert_close(seen["in"][:, 0], patch[:, 0])
    torch.testing.assert_close(seen["in"][:, 1:], patch[:, 1:] + delta)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(pixel_size=3), ["patch_size=16", "pixel_size=3"]),
        (dict(img_size=200), ["img_size=200", "patch_size=16"]),
        (dict(inner_heads=5), ["inner_dim=24", "inner_heads=5"]),
        (dict(num_heads=7), ["embed_dim=384", "num_heads=7"]),
    ],
)
def test_invalid_combination_names_both_values(kwargs, words):
    with pytest.raises(ValueError) as e:
        create_model("tnt_s_patch16_224", **kwargs)
    for w in words:
        assert w in str(e.value)


def test_pos_embed_switches_remove_the_tables():
    m = create_model("tnt_nano", patch_pos_embed=False, pixel_pos_embed=False)
    assert m.patch_pos is None and m.pixel_pos is None
    full = param_count("tnt_nano")
    assert sum(p.numel() for p in m.parameters()) == full - 17 * 96 - 16 * 12


PAPER_PARAMS = {
    "tnt_ti_patch16_224": 6.1,
    "tnt_s_patch16_224": 23.8,
    "tnt_b_patch16_224": 65.6,
    "deit_tiny_patch16_224": 5.7,
    "deit_small_patch16_224": 22.0,
    "deit_base_patch16_224": 86.0,
}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_params_within_1pct_of_paper(name):
    n = param_count(name) / 1e6
    assert get_entry(name).paper.params_m == PAPER_PARAMS[name]
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, n


@pytest.mark.parametrize("name", [n for n in BIG if get_entry(n).timm_name])
def test_params_equal_timm_exactly(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(get_entry(name).timm_name, pretrained=False)
    assert param_count(name) == sum(p.numel() for p in ref.parameters())


def test_models_cli_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "23.77" in out and "81.5" in out  # TNT-S ours and paper top-1


@pytest.mark.parametrize(
    "argv, words",
    [
        (["models", "tnt_nano", "--set", "foo=1"], ["unknown knob 'foo'"]),
        (["models", "tnt_nano", "--set", "inner_heads=5"], ["inner_dim=12", "inner_heads=5"]),
        (["models", "tnt_nano", "--set", "depth=two"], ["depth='two'", "int"]),
        (["models", "no_such_model"], ["unknown model 'no_such_model'"]),
        (["models", "tnt_nano", "--set", "inner_kernel=cuda"], ["model.inner_kernel = 'cuda'"]),
    ],
)
def test_models_cli_wrong_knob_is_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_onednn_linear_equals_f_linear_forward_and_backward():
    """The fp32 CPU Linear (oneDNN forward and input gradient) is nn.Linear's computation."""
    from suite.models.fastpath import Linear

    lin = Linear(24, 72)
    x = torch.randn(5, 16, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    g = torch.randn(5, 16, 72)
    lin(x).backward(g)
    torch.nn.functional.linear(x_ref, w, b).backward(g)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x_ref, w, b))
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lin.weight.grad, w.grad)
    torch.testing.assert_close(lin.bias.grad, b.grad)
    nobias = Linear(24, 8, bias=False)
    y = nobias(x.detach())
    torch.testing.assert_close(y, x.detach() @ nobias.weight.T)


def test_bf16_cpu_attention_softmax_in_fp32_matches_sdpa():
    attn = Attention(24, 4).eval()
    x = torch.randn(6, 16, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn.fused = False  # the written-out path, fp32 softmax rounded to bf16
        written = attn(x).float()
        attn.fused = True
        fused = attn(x).float()
    torch.testing.assert_close(written, fused, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tnt_nano", "vit_nano"])
def test_compile_blocks_is_the_same_model(name):
    """Regional torch.compile: same logits and gradients as eager, same state-dict names."""
    from suite.models import compile_blocks

    eager = create_model(name, num_classes=10, depth=2).train()
    comp = create_model(name, num_classes=10, depth=2).train()
    comp.load_state_dict(eager.state_dict())
    compile_blocks(comp)
    assert list(comp.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    y, y_ref = comp(x), eager(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), q in zip(comp.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=n)


def test_sdpa_in_batch_chunks_equals_one_call():
    """CUDA's fused kernels cap the batch at 65,535 (TNT's inner attention: B x 196): chunks."""
    from suite.models.fastpath import SDPA_MAX_BATCH, sdpa

    assert SDPA_MAX_BATCH == 65535
    q, k, v = (torch.randn(7, 4, 16, 6) for _ in range(3))
    torch.testing.assert_close(sdpa(q, k, v, max_batch=3), sdpa(q, k, v))


def _attention_shapes(name):
    """(role, tokens, head dim) of every attention in the registered model, read by hooks
    during a depth-1 forward pass on the meta device (no memory, no compute)."""
    shapes = set()
    with torch.device("meta"):
        model = create_model(name, depth=1)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, Attention):
                role = "inner" if ".inner." in mod_name else "outer"

                def hook(m, args, role=role):
                    shapes.add((role, args[0].shape[1], m.head_dim))

                mod.register_forward_pre_hook(hook)
        size = get_entry(name).img_size
        model(torch.empty(1, 3, size, size))
    return shapes


@pytest.mark.parametrize("name", list_models())
def test_attention_dispatch_for_every_model_on_cpu_and_cuda(name):
    """The measured dispatch rule (fastpath.use_sdpa) for each of the model's attentions:
    TNT's inner attention (16 pixel tokens, head dim 3-10) is written out everywhere; the
    224/384 models' outer attention (197+ tokens, head dim 64) goes to SDPA on CUDA and on CPU
    in fp32, written out under CPU bf16 autocast; the nano models' 17-18 tokens are short."""
    from suite.models.fastpath import use_sdpa

    shapes = _attention_shapes(name)
    family = get_entry(name).family
    assert {role for role, _, _ in shapes} == ({"inner", "outer"} if family == "tnt" else {"outer"})
    for role, tokens, head_dim in shapes:
        long_outer = role == "outer" and name not in NANO
        if role == "inner":
            assert tokens == 16 and head_dim % 8 != 0
        elif long_outer:
            assert tokens >= 197 and head_dim == 64
        else:
            assert tokens in (17, 18)
        got = {
            "cuda": use_sdpa("cuda", tokens, head_dim),
            # autocast changes the CPU's choice, never CUDA's (even if the flag came along)
            "cuda+bf16": use_sdpa("cuda", tokens, head_dim, cpu_autocast=True),
            "cpu": use_sdpa("cpu", tokens, head_dim),
            "cpu+bf16": use_sdpa("cpu", tokens, head_dim, cpu_autocast=True),
        }
        want = {"cuda": long_outer, "cuda+bf16": long_outer, "cpu": long_outer, "cpu+bf16": False}
        assert got == want, (role, tokens, head_dim)


def test_attention_dispatch_cuda_rule_edges():
    """CUDA: SDPA needs a head dim that is a multiple of 8 and a sequence of 64+ tokens."""
    from suite.models.fastpath import SDPA_MIN_TOKENS, use_sdpa

    assert SDPA_MIN_TOKENS == 64
    assert use_sdpa("cuda", 64, 8) and use_sdpa("cuda", 577, 64)
    assert not use_sdpa("cuda", 63, 64)  # short: written out
    assert not use_sdpa("cuda", 4096, 6)  # head dim 6: only the slow flash kernel takes it
    assert not use_sdpa("cuda", 197, 12)
    assert use_sdpa("cpu", 64, 6) and not use_sdpa("cpu", 63, 64)
    assert use_sdpa("mps", 16, 6)  # other devices: PyTorch's own dispatch
