"""The GPU path: CUDA against CPU, the attention paths, mixed precision, compile, chunked SDPA,
resume, profile and NCCL DDP. Skipped, with the reason, on machines without a CUDA device;
``benchmarks/gpu_check.sh`` runs them on a GPU machine (``pytest -m cuda``).

Tolerances: fp32 with TF32 off, so CUDA and CPU differ only by summation order (1e-4).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port

from suite.models import Attention, create_model
from suite.models.fastpath import SDPA_MAX_BATCH, sdpa
from suite.runtime import compile_model
from suite.training.engine import Criterion, StepOptions, build_optimizer, train_one_epoch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
CUDA = torch.device("cuda", 0)
MODELS = ["tnt_s_patch16_224", "deit_small_patch16_224"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons need true fp32 matmuls and convolutions (TF32 keeps 10 mantissa bits)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(name, **kw):
    cpu = create_model(name, depth=2, **kw).train()
    gpu = create_model(name, depth=2, **kw).to(CUDA).train()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("name", MODELS)
def test_cuda_matches_cpu_fp32_logits_and_grads(name):
    cpu, gpu = _pair(name)
    x = torch.randn(2, 3, 224, 224)
    y_cpu, y_gpu = cpu(x), gpu(x.to(CUDA))
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    y_cpu.square().mean().backward()
    y_gpu.square().mean().backward()
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize(("tokens", "dim", "heads"), [(16, 24, 4), (16, 40, 4), (197, 384, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_and_sdpa_attention_agree_on_cuda(tokens, dim, heads, dtype):
    """TNT-S's and TNT-B's inner shapes (head dim 6 and 10) and the outer one, fwd and bwd."""
    attn = Attention(dim, heads).to(CUDA)
    x = torch.randn(64, tokens, dim, device=CUDA, requires_grad=True)
    outs, grads = [], []
    for fused in (True, False):
        attn.fused = fused
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = attn(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append(x.grad.clone())
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **{k: v * 10 for k, v in tol.items()})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "deit_small_patch16_224"])
def test_mixed_precision_training_steps_stay_finite(name, amp):
    """The suite's own epoch loop: bf16 autocast, or fp16 with a GradScaler."""
    model = create_model(name, depth=2, num_classes=10).to(CUDA)
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    loader = [(torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))) for _ in range(4)]
    opts = StepOptions(amp=amp, scaler=scaler, log_every=1)
    m = train_one_epoch(model, loader, opt, sched, Criterion(0.1), CUDA, opts)
    assert math.isfinite(m["train_loss"]) and m["steps"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if amp == "fp16":
        assert scaler.get_scale() > 0


@pytest.mark.parametrize("name", ["tnt_nano", "deit_nano"])
def test_compiled_matches_eager_on_cuda(name):
    eager = create_model(name, depth=2).to(CUDA).eval()
    model = create_model(name, depth=2).to(CUDA).eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        c = compile_model(model, "whole", lambda fn: fn(x), CUDA)
        assert c.mode == "whole" and not c.fallback and c.compile_s > 0
        torch.testing.assert_close(c.fn(x), eager(x), atol=1e-4, rtol=1e-4)


def test_sdpa_in_chunks_past_the_cuda_batch_cap():
    """More than 65,535 sequences: the fused kernels' grid cap, so sdpa() splits the batch."""
    n = SDPA_MAX_BATCH + 1000
    q, k, v = (torch.randn(n, 2, 16, 8, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    out = sdpa(q, k, v)
    attn = ((q.float() @ k.float().transpose(-2, -1)) * 8**-0.5).softmax(-1)
    torch.testing.assert_close(out.float(), attn @ v.float(), atol=2e-2, rtol=2e-2)


def test_tnt_with_fused_inner_attention_past_the_cap():
    """B x 196 > 65,535 inner sequences through SDPA (forced) equals the written-out default."""
    model = create_model("tnt_s_patch16_224", depth=1).to(CUDA).eval()
    x = torch.randn(336, 3, 224, 224, device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        written = model(x).float()
        model.blocks[0].inner.attn.fused = True
        fused = model(x).float()
    torch.testing.assert_close(fused, written, atol=5e-2, rtol=5e-2)


def _rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize(
    ("dim", "heads", "dtype"),
    [
        (12, 2, torch.bfloat16),
        (24, 4, torch.float32),
        (24, 4, torch.bfloat16),
        (40, 4, torch.bfloat16),
    ],
)
def test_triton_inner_block_matches_the_torch_block(dim, heads, dtype):
    """The fused Triton inner block on TNT-Ti/S/B's inner shapes, 1,001 sequences of 16 pixels
    (a masked last tile): output, input gradient and every weight gradient against the fp32
    PyTorch Block on the same (rounded) input. Tolerances: max error / max |reference|."""
    pytest.importorskip("triton")
    from suite.models import Block
    from suite.models.kernels.inner_op import flat_params, inner_block

    block = Block(dim, heads, qkv_bias=False, eps=1e-5).to(CUDA)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1001, 16, dim, device=CUDA).to(dtype)
    dy = torch.randn(x.shape, device=CUDA)
    results = []
    for fused in (False, True):
        block.zero_grad()
        xi = (x if fused else x.float()).detach().requires_grad_()
        out = inner_block(xi, flat_params(block), heads, 1e-5) if fused else block(xi)
        out.backward(dy.to(out.dtype))
        results.append((out, xi.grad, [p.grad.clone() for p in block.parameters()]))
    (ref, ref_dx, ref_dw), (got, got_dx, got_dw) = results
    tol, wtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    assert got.dtype == got_dx.dtype == dtype
    assert _rel_err(got, ref) < tol and _rel_err(got_dx, ref_dx) < tol
    assert all(_rel_err(g, r) < wtol for g, r in zip(got_dw, ref_dw, strict=True))


def test_tnt_with_the_triton_inner_kernel_trains_and_compiles_like_torch():
    """inner_kernel = "triton" vs "torch", same weights: one bf16 autocast training step
    (loss, gradient cosine), and the whole model compiled (fp32 logits)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    ref, fused = (
        create_model("tnt_s_patch16_224", depth=2, inner_kernel=k).to(CUDA)
        for k in ("torch", "triton")
    )
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 224, 224, device=CUDA)
    y = torch.randint(0, 1000, (4,), device=CUDA)
    losses, grads = [], []
    for m in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
    ref.eval()
    fused.eval()
    with torch.no_grad():
        c = compile_model(fused, "whole", lambda fn: fn(x), CUDA)
        assert c.mode == "whole" and not c.fallback
        torch.testing.assert_close(c.fn(x), ref(x), atol=1e-3, rtol=1e-3)


def test_fit_then_resume_on_cuda(tmp_path):
    """Resume on CUDA continues the run; metrics equal an uninterrupted run within 1e-3 (loss,
    relative) and 2 points (top-1 over 128 images): CUDA's atomics reorder sums run to run."""
    from suite.config import load_config
    from suite.tracking import Tracker
    from suite.training.fit import fit

    sets = [
        "data.train_size=256",
        "data.val_size=128",
        "train.batch_size=64",
        "train.epochs=2",
        "train.lr=1e-3",
        "train.amp='fp32'",
        "train.device='cuda'",
        "train.compile=false",
        "tracking.system_metrics=false",
    ]
    full = fit(
        load_config(None, [*sets, f"train.out_dir='{tmp_path}/a'"]), Tracker(), progress=False
    )

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    cfg = load_config(None, [*sets, f"train.out_dir='{tmp_path}/b'"])
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, Tracker(), on_epoch=stop, progress=False)
    resumed = fit(cfg, Tracker(), resume=str(tmp_path / "b" / "tnt_nano_s0"), progress=False)
    assert len(resumed.history) == 2
    for key in ("train_loss", "val_loss"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], rel=1e-3), key
    assert resumed.history[-1]["val_top1"] == pytest.approx(full.history[-1]["val_top1"], abs=2.0)


def test_profile_cli_on_cuda_reports_mfu(tmp_path):
    import json

    from suite.cli import main

    out = tmp_path / "p.json"
    argv = [
        "profile",
        "tnt_nano",
        "deit_nano",
        "--device",
        "cuda",
        "--dtype",
        "bf16",
        "--mode",
        "train",
        "--steps",
        "5",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    for r in rows:
        assert r["device"] == "cuda" and r["mfu"] > 0 and r["img_per_s"] > 0
        assert r["gmacs_fvcore"] == pytest.approx(r["gmacs_torch"], rel=0.01)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2+ GPUs")
def test_torchrun_two_gpus_nccl_log_one_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [
        "data.train_size=512",
        "data.val_size=256",
        "train.batch_size=64",
        "train.epochs=1",
        "train.device='cuda'",
        "train.compile=false",
        "tracking.system_metrics=false",
        f"train.out_dir='{tmp_path}/runs'",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),  # the OS picks it: parallel runs never share a rendezvous
        "-m",
        "suite",
        "train",
        "--tracking-uri",
        uri,
        *[f"--set={s}" for s in sets],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.MlflowClient(uri).search_runs(["1"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == "2" and runs[0].data.tags["device"] == "cuda"
    assert runs[0].data.params["global_batch"] == "128"
