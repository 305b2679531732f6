"""The fused Triton inner block alone on the GPU: its tile sizes swept, against PyTorch.

One TNT inner block (pre-norm attention + MLP over P pixel tokens of C channels) on the
S = batch x 196 sequences of a TNT model at 224 px, bf16, forward and backward timed apart
with ``triton.testing.do_bench`` (CUDA events, median):
- the kernel for every (sequences per program, warps) in the sweep, each checked against the
  fp32 PyTorch block (forward output and input gradient, relative error);
- the PyTorch block eager and ``torch.compile``d (autocast bf16), forward + backward.
Prints a table per shape and the best forward and backward tile, and ``--json`` writes it all;
``benchmarks/gpu_check.sh`` passes the best tiles on to ``bench_tnt_speed.py --inner-tile``.

Compiling a kernel variant takes seconds, so the variants are first compiled in parallel
processes (``--jobs``), which fill Triton's on-disk cache, then timed one at a time here.

    python benchmarks/bench_inner_kernel.py [--models tnt_s,tnt_b] [--batch-size 128] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# (inner dim, heads) of the paper's configs; 16 pixels of 4x4 each, MLP ratio 4
SHAPES = {"tnt_ti": (12, 2), "tnt_s": (24, 4), "tnt_b": (40, 4)}
PIXELS, PATCHES = 16, 196
BLOCK_S = (1, 2, 4, 8)
WARPS = (2, 4, 8)
TOL = 0.05  # relative error of a bf16 kernel against the fp32 block, as a correctness guard


def make(model: str, batch: int, device: torch.device):
    from suite.models.kernels.inner_op import flat_params
    from suite.models.layers import Block

    dim, heads = SHAPES[model]
    torch.manual_seed(0)
    block = Block(dim, heads, qkv_bias=False, eps=1e-5).to(device)
    x = torch.randn(batch * PATCHES, PIXELS, dim, device=device)
    grad = torch.randn_like(x)
    return block, x, grad, flat_params(block).detach(), heads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def warm(model: str, batch: int, block_s: int, warps: int) -> None:
    """Compile one variant (fills Triton's cache): one forward and one backward."""
    from suite.models.kernels import inner_triton as K

    block, x, grad, w, heads = make(model, batch, torch.device("cuda"))
    xb = x.bfloat16()
    K.forward(xb, w, heads, 1e-5, block_s, warps)
    K.backward(grad.bfloat16(), xb, w, heads, 1e-5, block_s, warps)
    torch.cuda.synchronize()


def warm_all(variants: list[tuple], batch: int, jobs: int, limit_s: float) -> dict[tuple, str]:
    """Compile every variant in parallel processes; {variant: error} for those that failed."""

    def one(v):
        cmd = [sys.executable, __file__, "--warm", *map(str, v), "--batch-size", str(batch)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return v, f"compile took over {limit_s:.0f} s"
        return v, "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]

    with ThreadPoolExecutor(jobs) as pool:
        return {v: err for v, err in pool.map(one, variants) if err}


def sweep(model: str, batch: int, failed: dict) -> dict:
    from triton.testing import do_bench

    from suite.models.kernels import inner_triton as K

    device = torch.device("cuda")
    block, x, grad, w, heads = make(model, batch, device)
    # the fp32 reference: output and input gradient
    xr = x.clone().requires_grad_()
    ref = block(xr)
    ref.backward(grad)
    xb, gb = x.bfloat16(), grad.bfloat16()
    rows = []
    for bs, warps in itertools.product(BLOCK_S, WARPS):
        row = {"block_s": bs, "warps": warps}
        if (model, bs, warps) in failed:
            rows.append({**row, "error": failed[(model, bs, warps)]})
            continue
        try:
            out = K.forward(xb, w, heads, 1e-5, bs, warps)
            dx, _ = K.backward(gb, xb, w, heads, 1e-5, bs, warps)
            row["fwd_err"], row["dx_err"] = rel_err(out, ref), rel_err(dx, xr.grad)
            tile = (bs, warps)  # bound now: do_bench runs the lambdas before the loop moves on
            row["fwd_ms"] = do_bench(lambda: K.forward(xb, w, heads, 1e-5, *tile))  # noqa: B023
            row["bwd_ms"] = do_bench(lambda: K.backward(gb, xb, w, heads, 1e-5, *tile))  # noqa: B023
        except Exception as e:  # a variant the compiler or the GPU refuses: recorded, skipped
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    ok = [r for r in rows if "error" not in r and max(r["fwd_err"], r["dx_err"]) < TOL]
    best_fwd = min(ok, key=lambda r: r["fwd_ms"]) if ok else None
    best_bwd = min(ok, key=lambda r: r["bwd_ms"]) if ok else None

    # the PyTorch block, eager and compiled, bf16 autocast, forward and forward + backward
    def torch_times(fn) -> dict[str, float]:
        xg = xb.detach().requires_grad_()

        def fwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(xg)

        def fwd_bwd():
            out = fwd()
            out.backward(gb.to(out.dtype))

        fwd_bwd()  # compiles, if compiled
        return {"fwd_ms": do_bench(fwd), "fwd_bwd_ms": do_bench(fwd_bwd, grad_to_none=[xg])}

    t0 = time.perf_counter()
    compiled = torch.compile(block)
    pt = {"eager": torch_times(block), "compiled": torch_times(compiled)}
    pt["compile_s"] = time.perf_counter() - t0
    res = {"model": model, "dim": SHAPES[model][0], "heads": heads, "sequences": x.shape[0]}
    res.update(variants=rows, torch=pt)
    if best_fwd and best_bwd:
        tri = best_fwd["fwd_ms"] + best_bwd["bwd_ms"]
        res["best"] = {
            "fwd": [best_fwd["block_s"], best_fwd["warps"]],
            "bwd": [best_bwd["block_s"], best_bwd["warps"]],
            "fwd_bwd_ms": tri,
            "torch_compiled_over_triton": pt["compiled"]["fwd_bwd_ms"] / tri,
            "torch_eager_over_triton": pt["eager"]["fwd_bwd_ms"] / tri,
        }
    return res


def show(res: dict) -> None:
    print(
        f"\n{res['model']}: inner dim {res['dim']}, {res['heads']} heads, "
        f"{res['sequences']} sequences of {PIXELS} pixels, bf16"
    )
    print(
        f"  {'seq/prog':>8} {'warps':>5} {'fwd ms':>8} {'bwd ms':>8} {'fwd err':>8} {'dx err':>8}"
    )
    for r in res["variants"]:
        if "error" in r:
            print(f"  {r['block_s']:8d} {r['warps']:5d}  {r['error']}")
        else:
            print(
                f"  {r['block_s']:8d} {r['warps']:5d} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} "
                f"{r['fwd_err']:8.4f} {r['dx_err']:8.4f}"
            )
    for k, t in res["torch"].items():
        if isinstance(t, dict):
            print(f"  torch {k:8s} fwd {t['fwd_ms']:.3f} ms  fwd+bwd {t['fwd_bwd_ms']:.3f} ms")
    b = res.get("best")
    if b:
        print(
            f"  best: fwd {b['fwd']} bwd {b['bwd']} (seq/prog, warps): fwd+bwd "
            f"{b['fwd_bwd_ms']:.3f} ms; torch compiled / triton "
            f"{b['torch_compiled_over_triton']:.2f}, eager / triton "
            f"{b['torch_eager_over_triton']:.2f}"
        )
    else:
        print("  no variant ran correctly")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tnt_s,tnt_b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--batch-size", type=int, default=128, help="images (x 196 sequences)")
    ap.add_argument("--jobs", type=int, default=12, help="parallel compile processes")
    ap.add_argument("--compile-limit", type=float, default=120, help="seconds per variant")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--warm", nargs=3, metavar=("MODEL", "BLOCK_S", "WARPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_inner_kernel.py: needs CUDA (the kernel's CPU checks are tests)")
    if args.warm:
        warm(args.warm[0], args.batch_size, int(args.warm[1]), int(args.warm[2]))
        return
    models = args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        sys.exit(f"bench_inner_kernel.py: --models: unknown {unknown} (of {', '.join(SHAPES)})")
    t0 = time.perf_counter()
    variants = [(m, bs, w) for m in models for bs, w in itertools.product(BLOCK_S, WARPS)]
    failed = warm_all(variants, args.batch_size, args.jobs, args.compile_limit)
    print(
        f"compiled {len(variants) - len(failed)} of {len(variants)} variants in "
        f"{time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()}",
        flush=True,
    )
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "shapes": [],
    }
    for m in models:
        res = sweep(m, args.batch_size, failed)
        show(res)
        out["shapes"].append(res)
        if args.json:  # after each shape, so a step cut by its timeout keeps what it measured
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
