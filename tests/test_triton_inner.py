"""The fused Triton inner block (suite/models/kernels) against the PyTorch inner Block, run on
CPU by Triton's interpreter; the model.inner_kernel switch; FLOP counts; the custom op's fake
implementation and autograd registration (opcheck).

Triton reads TRITON_INTERPRET=1 when it is imported and when ``@triton.jit`` decorates a
kernel; conftest.py sets it on machines without CUDA, before anything imports triton. On a
CUDA machine this module skips: tests/test_cuda.py runs the kernels on the GPU. Sizes are tiny
(3-7 sequences, 2-4 per program) because the interpreter runs each program in numpy.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("CUDA here: tests/test_cuda.py runs the kernels", allow_module_level=True)

from suite.errors import UserError  # noqa: E402
from suite.models import Block, create_model  # noqa: E402
from suite.models.kernels import inner_op  # noqa: E402
from suite.models.kernels.inner_op import flat_params, inner_block, use_triton  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    if not inner_op.interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")


def _block(dim, heads, qkv_bias=False, **kw):
    """A TNT inner Block with every parameter random (LN weights around 1), so each matters."""
    block = Block(dim, heads, qkv_bias=qkv_bias, eps=1e-5, **kw)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0))
    return block


def _grads(block, x, fn):
    """fn(x)'s output and the gradients of x and every parameter for a fixed random dy."""
    block.zero_grad()
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return out.detach(), x.grad, grads


# (inner dim, heads, pixels, sequences, sequences per program): TNT-Ti/S/B inner dims, odd
# sequence counts (a masked last tile), 9 pixels (padded to 16), a qkv bias
SHAPES = [(12, 2, 16, 3, 2, False), (24, 4, 16, 5, 2, False), (40, 4, 16, 3, 2, False)]
SHAPES += [(24, 4, 9, 7, 4, False), (12, 2, 16, 3, 2, True)]


@pytest.mark.parametrize("dim, heads, pixels, seqs, block_s, qkv_bias", SHAPES)
def test_fp32_forward_and_every_gradient_match_the_torch_block(
    dim, heads, pixels, seqs, block_s, qkv_bias
):
    block = _block(dim, heads, qkv_bias)
    x = torch.randn(seqs, pixels, dim)
    ref = _grads(block, x, block)
    got = _grads(block, x, lambda t: inner_block(t, flat_params(block), heads, 1e-5, block_s))
    # fp32 throughout, "ieee" dots: only summation order differs
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-4, atol=1e-4, msg=name)


def _rel_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


# max error / max |reference|: bf16 has 8 significant bits, and Triton 3.8's interpreter rounds
# fp32 -> bf16 toward zero (the GPU rounds to nearest), which roughly triples the error: about
# 1.5% measured on the output and input grad, 4% on the worst weight grad (torch's own bf16
# autocast: 0.4%, 0.9%); fp16 (11 bits, rounded to nearest) measured 0.04%, 0.07%, 0.2%
@pytest.mark.parametrize(
    "dtype, tol, wtol", [(torch.bfloat16, 3e-2, 6e-2), (torch.float16, 2e-3, 5e-3)]
)
def test_low_precision_matches_the_fp32_block(dtype, tol, wtol):
    block = _block(24, 4)
    x = torch.randn(5, 16, 24).to(dtype)
    ref = _grads(block, x.float(), block)  # fp32 reference on the same rounded input
    got = _grads(block, x, lambda t: inner_block(t, flat_params(block), 4, 1e-5, 2))
    assert got[0].dtype == got[1].dtype == dtype
    assert _rel_err(got[0], ref[0]) < tol and _rel_err(got[1], ref[1]) < tol
    for name, g in ref[2].items():
        assert got[2][name].dtype == torch.float32
        assert _rel_err(got[2][name], g) < wtol, name


def test_backward_is_deterministic():
    block = _block(12, 2)
    x = torch.randn(7, 16, 12)
    fn = lambda t: inner_block(t, flat_params(block), 2, 1e-5, 2)  # noqa: E731
    a, b = _grads(block, x, fn), _grads(block, x, fn)
    assert torch.equal(a[1], b[1]) and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_autocast_casts_the_input_to_bf16_and_matches_the_torch_path():
    block = _block(12, 2)
    x = torch.randn(3, 16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = block(x)
        got = inner_op.inner_forward(block, x, "triton")
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, ref.float()) < 3e-2  # both bf16, see above


def test_model_switch_triton_equals_torch_logits_and_grads():
    torch.manual_seed(0)
    ours = create_model("tnt_nano", depth=1, inner_kernel="torch")
    fused = create_model("tnt_nano", depth=1, inner_kernel="triton")
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 32, 32)  # 16 patches: 4 programs of 4 sequences
    outs = []
    for m in (ours, fused):
        out = m(x)
        out.logsumexp(-1).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    grads = dict(ours.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_is_torch_on_cpu_and_the_default():
    block, x = _block(12, 2), torch.randn(2, 16, 12)
    assert not use_triton("auto", block, x) and not use_triton("torch", block, x)
    assert use_triton("triton", block, x)
    assert inner_op.AUTO_PICKS_TRITON  # on CUDA, where the GPU figures say it wins
    assert all(b.inner_kernel == "auto" for b in create_model("tnt_nano").blocks)


def test_triton_on_cpu_without_the_interpreter_is_one_named_error(monkeypatch):
    monkeypatch.setattr(inner_op, "interpreted", lambda: False)
    model = create_model("tnt_nano", depth=1, inner_kernel="triton")
    with pytest.raises(UserError) as e:
        model(torch.randn(1, 3, 32, 32))
    msg = str(e.value)
    assert "model.inner_kernel = 'triton'" in msg and "TRITON_INTERPRET=1" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(inner_kernel="cuda"), ["model.inner_kernel = 'cuda'", "auto, triton, torch"]),
        (dict(inner_kernel="triton", inner_dim=96, inner_heads=2), ["inner_dim 96", "<= 64"]),
        (dict(inner_kernel="triton", patch_size=16, pixel_size=1), ["256 pixels"]),
    ],
)
def test_bad_setting_or_shape_the_kernel_declines_is_named(kw, words):
    with pytest.raises(ValueError) as e:
        create_model("tnt_nano", **kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_dropout_and_drop_path_fall_back_to_torch_in_training(monkeypatch):
    calls = []
    real = inner_op.inner_block
    monkeypatch.setattr(inner_op, "inner_block", lambda *a: calls.append(1) or real(*a))
    model = create_model("tnt_nano", depth=2, inner_kernel="triton", drop_path_rate=0.5)
    x = torch.randn(1, 3, 32, 32)
    model.train()
    model(x)
    assert calls == [1]  # block 0 has drop path 0 (the linear rule), block 1 has 0.5
    model.eval()
    model(x)
    assert calls == [1, 1, 1]
    block = _block(12, 2, drop=0.1).train()
    assert not use_triton("triton", block, torch.randn(2, 16, 12))


def test_custom_op_fake_impl_and_autograd_registration():
    block = _block(12, 2)
    x = torch.randn(3, 16, 12, requires_grad=True)
    w = flat_params(block).detach().requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(inner_block, (x, w, 2, 1e-5, 2), test_utils=tests)


def test_flop_counters_count_the_same_macs_with_either_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    from suite.profile import count_flops

    totals = {}
    for kernel in ("torch", "triton"):
        # full TNT-S forward + backward on the meta device: the op's fake impl and formulas
        with torch.device("meta"):
            model = create_model("tnt_s_patch16_224", inner_kernel=kernel)
            x = torch.zeros(2, 3, 224, 224)
        with FlopCounterMode(display=False) as fc:
            model(x).sum().backward()
        # fvcore traces for real: TNT-S's inner shapes (16 pixels x 24) at 32 px, one block
        small = create_model("tnt_s_patch16_224", inner_kernel=kernel, img_size=32, depth=1)
        totals[kernel] = (fc.get_total_flops(), count_flops(small, 32))
    (fc_torch, fv_torch), (fc_triton, fv_triton) = totals["torch"], totals["triton"]
    assert fc_triton == fc_torch
    assert fv_triton.gmacs_fvcore == fv_triton.gmacs_torch == fv_torch.gmacs_fvcore
    assert fv_torch.gmacs_fvcore == fv_torch.gmacs_torch
    assert "tntbench::inner_block" not in fv_triton.unsupported


@pytest.mark.slow
def test_torch_compile_traces_the_op_in_one_graph():
    block = _block(12, 2)
    x = torch.randn(3, 16, 12)
    compiled = torch.compile(lambda t: inner_op.inner_forward(block, t, "triton"), fullgraph=True)
    ref = _grads(block, x, block)
    got = _grads(block, x, compiled)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_picks_the_kernel_only_on_cuda_gpus_it_trusts(monkeypatch):
    """auto on a CUDA tensor: the kernel from sm_80 on, PyTorch on older GPUs (a stand-in for
    the CUDA tensor: use_triton reads its device, dtype and shape)."""
    block = _block(24, 4)
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 16, 24))
    for cap, picked in (((9, 0), True), ((8, 0), True), ((7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert use_triton("auto", block, x) is picked, cap
    assert not use_triton("torch", block, x)


AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from suite.models.kernels import inner_triton as K
from suite.models.kernels.shapes import dims, param_offsets

c, p, hidden, heads = 40, 16, 160, 4  # TNT-S's inner block: 16 pixels of 40 channels
d, o = dims(p, c, hidden, heads, 1e-6, None, 32), param_offsets(c, hidden)
ptr = {"x_ptr": "*bf16", "w_ptr": "*fp32"}
kernels = {
    "fwd": (K.inner_fwd_kernel, {**ptr, "out_ptr": "*bf16"}),
    "bwd": (K.inner_bwd_kernel, {**ptr, "g_ptr": "*bf16", "dx_ptr": "*bf16", "dw_ptr": "*fp32"}),
}
for arch in (80, 90):
    for name, (fn, sig) in kernels.items():
        sig = {**sig, "S": "i32", "D": "constexpr", "O": "constexpr"}
        src = ASTSource(fn=fn, signature=sig, constexprs={"D": d, "O": o})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        print(name, arch, len(k.asm["cubin"]))
"""


def test_kernels_compile_for_sm80_and_sm90_through_ptxas():
    """No GPU needed: Triton lowers both kernels (named constants and all) to PTX and ptxas
    assembles them for the A100's and the H100's architectures, as a GPU run would at launch.
    A separate process, without TRITON_INTERPRET (the interpreter replaces the kernels)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("this triton has no ptxas")
    assert r.returncode == 0, r.stderr[-2000:]
    built = {tuple(line.split()[:2]): int(line.split()[2]) for line in r.stdout.splitlines()}
    assert set(built) == {(n, a) for n in ("fwd", "bwd") for a in ("80", "90")}
    assert all(size > 10_000 for size in built.values())  # a real cubin, not an empty stub
