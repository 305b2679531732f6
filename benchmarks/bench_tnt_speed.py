"""Fast TNT: our TNT-S and DeiT-S against timm's, train and infer img/s, in one run.

Every timed step alternates between the four models (ours/timm x TNT-S/DeiT-S) in one process,
so drift in machine load hits all of them; each pair shares weights (timm's converted). Same
batch, same dtype per comparison; the train step is forward + cross-entropy + backward + SGD.
Prints img/s and the ratios issue 9 asks for:

- ours / timm TNT-S training, fp32 and bf16 (target >= 1.2 each);
- ours in its default dtype (``train.amp = auto``: bf16 on CPUs with bf16 and on CUDA) against
  timm's TNT-S in fp32 eager (target >= 2.0);
- FLOP-normalised efficiency (ours TNT-S img/s x 5.2) / (ours DeiT-S img/s x 4.6), training
  (target >= 0.9; the paper's GFLOPs);
- ours / timm DeiT-S (target >= 1.0).

``--compile [MODE]`` adds our models compiled through ``suite.runtime.compile_model`` (bare:
whole-model ``torch.compile``, what ``tntbench train`` does by default on CUDA; ``regional``:
each block), for the modes and dtypes in ``--compile-modes``/``--compile-dtypes`` (default:
training in bf16; whole-model compiling takes about a minute per model, mode and dtype on an
H100). Compile time is printed apart, never in the img/s. ``--json PATH`` writes every figure.

Targets (issue 13, CUDA): ours/timm TNT-S eager bf16 >= 1.25, ours compiled (as
``tntbench train`` runs it) / timm eager >= 2.4, ours/timm DeiT-S >= 1.0. On CPU: ours/timm
TNT-S >= 1.1 in fp32 and bf16 (no regression from the CPU work, issue 9).
``--img-size``/``--depth`` shrink both sides alike (for a smoke run; the targets mean 224/12).

``--inner-kernel torch,triton`` adds our TNT-S with ``model.inner_kernel = "triton"`` (the fused
Triton inner block, issue 18) as rows "ours tnt triton" (eager, every mode and dtype) and
"ours tnt triton compiled" (where ``--compile`` compiles), same weights. Targets (issue 18,
CUDA, train bf16): FLOP-normalised TNT-S/DeiT-S >= 0.8 (both compiled), TNT-S MFU >= 12% (6 x
MACs x img/s over the measured bf16 matmul peak, as ``tntbench profile``), >= 3.5x timm eager
TNT-S, and the same training step through either kernel: loss agreement (1 - relative
difference) and the cosine of all parameter gradients >= 0.99. Triton rows need CUDA (or
TRITON_INTERPRET=1, which only tests should set); elsewhere they are skipped with the reason.

    python benchmarks/bench_tnt_speed.py [--batch-size 16] [--steps 4] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from suite.models import create_model, load_timm_state_dict
from suite.models.kernels.inner_op import interpreted
from suite.profile import matmul_peak_tflops
from suite.runtime import compile_model, resolve_precision

PAPER_GFLOPS = {"tnt": 5.2, "deit": 4.6}  # TNT paper Table 3 (TNT-S, DeiT-S)
NAMES = {"tnt": "tnt_s_patch16_224", "deit": "deit_small_patch16_224"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, opt, x, y, dtype, device, train):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if not train:
                with torch.inference_mode():
                    return model(x)
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(models: dict, args, device, dtype: str, train: bool) -> dict[str, float]:
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    steps = {}
    for k, m in models.items():
        m.train(train)
        opt = torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)
        steps[k] = make_step(m, opt, x, y, dtype, device, train)
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for k, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: args.batch_size / statistics.median(v) for k, v in times.items()}


def compile_ours(name, state, size, args, device, dtype, train):
    """Our model compiled as ``args.compile`` says; its first step (the compile) timed apart.
    ``size``: create_model's overrides (img_size, depth, and inner_kernel for triton rows)."""
    m = create_model(name, **size).to(device)
    m.load_state_dict(state)
    m.train(train)
    opt = torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    c = compile_model(
        m, args.compile, lambda fn: make_step(fn, opt, x, y, dtype, device, train)(), device
    )
    return c.fn, c.compile_s


def triton_skip_reason(device: torch.device) -> str:
    """Why the Triton rows cannot run here ("" when they can)."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return ""
    return f"the Triton inner kernel runs on CUDA ({device.type} here, TRITON_INTERPRET unset)"


def tnt_macs(size: dict) -> float:
    """Our TNT-S's forward multiply-adds per image, by FlopCounterMode on the meta device (the
    figure ``tntbench profile`` computes MFU from; the same with either inner kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(NAMES["tnt"], **size)
        x = torch.zeros(1, 3, size["img_size"], size["img_size"])
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def step_agreement(state: dict, size: dict, device: torch.device, dtype: str) -> dict:
    """One training step of our TNT-S through each inner kernel, same weights and batch:
    1 - |loss difference| / |loss|, and the cosine between the two sets of gradients."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, size["img_size"], size["img_size"], device=device)
    y = torch.randint(0, 1000, (4,), device=device)
    losses, grads = [], []
    for kernel in ("torch", "triton"):
        m = create_model(NAMES["tnt"], inner_kernel=kernel, **size).to(device).train()
        m.load_state_dict(state)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters()]))
    return {
        "loss agreement": 1 - abs(losses[0] - losses[1]) / abs(losses[0]),
        "gradient cosine": F.cosine_similarity(grads[0], grads[1], dim=0).item(),
    }


def triton_ratios(res: dict, args, device: torch.device, state: dict, size: dict) -> dict:
    """Issue 18's figures for the rows with the Triton inner kernel."""
    out = {}
    macs = tnt_macs(size)
    peaks = {d: matmul_peak_tflops(device, d) for d in {k.split()[1] for k in res}}
    for key, r in res.items():
        mode, dtype = key.split()
        for row in ("ours tnt triton", "ours tnt triton compiled"):
            if row not in r:
                continue
            label = row.removeprefix("ours tnt ")
            out[f"{key}: ours {label} / timm TNT-S"] = r[row] / r["timm tnt"]
            # model FLOP/s as tntbench profile counts them: 2 per MAC, training 3x the forward
            flops = (6 if mode == "train" else 2) * macs * r[row]
            out[f"{key}: MFU ours {label}"] = flops / (peaks[dtype] * 1e12)
            deit = "ours deit compiled" if row.endswith("compiled") else "ours deit"
            out[f"{key}: FLOP-normalised TNT-S/DeiT-S (ours {label})"] = (
                r[row] * PAPER_GFLOPS["tnt"] / (r[deit] * PAPER_GFLOPS["deit"])
            )
    for dtype in args.dtypes.split(","):
        if f"train {dtype}" in res:
            for k, v in step_agreement(state, size, device, dtype).items():
                out[f"train {dtype}: triton/torch step {k}"] = v
    return out


def use_tiles(path: str) -> dict:
    """Set the Triton kernel's (rows, warps) per padded inner dim to the best of a
    bench_inner_kernel.py run; returns what was set."""
    from suite.models.kernels import inner_triton as K

    with open(path) as f:
        shapes = json.load(f)["shapes"]
    used = {}
    for shape in shapes:
        best = shape.get("best")
        if not best:
            continue
        cp, pp = K.padded(shape["dim"]), K.padded(16)
        K.FWD_TILE[cp] = (best["fwd"][0] * pp, best["fwd"][1])
        K.BWD_TILE[cp] = (best["bwd"][0] * pp, best["bwd"][1])
        used[cp] = {"fwd (rows, warps)": K.FWD_TILE[cp], "bwd (rows, warps)": K.BWD_TILE[cp]}
    print(f"inner tiles from {path}: {used or 'none (no variant ran), the defaults'}")
    return used


def targets_for(device: torch.device, default_dtype: str) -> dict[str, float]:
    if device.type == "cuda":  # issue 13
        return {
            "train bf16: ours/timm TNT-S": 1.25,
            "train bf16: ours compiled / timm TNT-S": 2.4,
            "train bf16: ours/timm DeiT-S": 1.0,
            "train fp32: ours/timm DeiT-S": 1.0,
            # issue 18: the fused Triton inner block (rows present with --inner-kernel triton)
            "train bf16: FLOP-normalised TNT-S/DeiT-S (ours triton compiled)": 0.8,
            "train bf16: MFU ours triton compiled": 0.12,
            "train bf16: ours triton compiled / timm TNT-S": 3.5,
            "train bf16: triton/torch step loss agreement": 0.99,
            "train bf16: triton/torch step gradient cosine": 0.99,
        }
    return {  # issue 9's CPU targets; issue 13: no CPU regression below 1.1
        "train fp32: ours/timm TNT-S": 1.1,
        "train bf16: ours/timm TNT-S": 1.1,
        f"train: ours default ({default_dtype}) / timm TNT-S fp32": 2.0,
        "train fp32: FLOP-normalised TNT-S/DeiT-S (ours)": 0.9,
        "train bf16: FLOP-normalised TNT-S/DeiT-S (ours)": 0.9,
        "train fp32: ours/timm DeiT-S": 1.0,
        "train bf16: ours/timm DeiT-S": 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model and mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="whole",
        choices=["whole", "regional"],
        help="also time our models compiled (bare: whole model, as tntbench train on CUDA)",
    )
    ap.add_argument("--compile-modes", default="train", help="modes timed compiled")
    ap.add_argument("--compile-dtypes", default="bf16", help="dtypes timed compiled")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument(
        "--inner-kernel",
        default="torch",
        help="our TNT-S's inner kernels to time: torch, or torch,triton (adds the Triton rows)",
    )
    ap.add_argument(
        "--inner-tiles",
        metavar="JSON",
        help="the Triton kernel's tiles from a bench_inner_kernel.py --json run (its best per "
        "inner dim), instead of the kernel's defaults",
    )
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    default_dtype = resolve_precision("auto", device)
    if default_dtype == "fp16":
        default_dtype = "bf16"  # this benchmark's step has no grad scaler
    torch.manual_seed(0)
    size = dict(img_size=args.img_size, depth=args.depth)
    models = {}
    for fam, name in NAMES.items():
        ref = timm.create_model(name, pretrained=False, **size)
        models[f"timm {fam}"] = ref.to(device)
        ours = load_timm_state_dict(create_model(name, **size), ref.state_dict())
        models[f"ours {fam}"] = ours.to(device)
    kernels = args.inner_kernel.split(",")
    triton_skipped = triton_skip_reason(device) if "triton" in kernels else ""
    if triton_skipped:
        print(f"triton rows skipped: {triton_skipped}")
        kernels.remove("triton")
    tnt_state = models["ours tnt"].state_dict()
    tiles = use_tiles(args.inner_tiles) if "triton" in kernels and args.inner_tiles else {}
    if "triton" in kernels:
        fused = create_model(NAMES["tnt"], inner_kernel="triton", **size)
        fused.load_state_dict(tnt_state)
        models["ours tnt triton"] = fused.to(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {dev_name}  threads {torch.get_num_threads()}  batch {args.batch_size}  "
        f"img {args.img_size}  depth {args.depth}  torch {torch.__version__}  "
        f"timm {timm.__version__}  ours default dtype {default_dtype}"
        f"  compile {args.compile or 'off'}  inner kernels {','.join(kernels)}"
    )
    res: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float] = {}
    for mode in args.modes.split(","):
        for dtype in args.dtypes.split(","):
            key = f"{mode} {dtype}"
            timed = dict(models)
            compiled = (
                args.compile
                and mode in args.compile_modes.split(",")
                and dtype in args.compile_dtypes.split(",")
            )
            if compiled:  # a fresh copy with the same weights per mode and dtype
                for fam, name in NAMES.items():
                    state = models[f"ours {fam}"].state_dict()
                    fn, secs = compile_ours(name, state, size, args, device, dtype, mode == "train")
                    timed[f"ours {fam} compiled"] = fn
                    compile_s[f"ours {fam} compiled {key}"] = secs
                if "triton" in kernels:
                    tri = {**size, "inner_kernel": "triton"}
                    fn, secs = compile_ours(
                        NAMES["tnt"], tnt_state, tri, args, device, dtype, mode == "train"
                    )
                    timed["ours tnt triton compiled"] = fn
                    compile_s[f"ours tnt triton compiled {key}"] = secs
            res[key] = bench(timed, args, device, dtype, mode == "train")
            row = "  ".join(f"{k} {v:7.1f}" for k, v in res[key].items())
            print(f"{key:12s} img/s  {row}", flush=True)

    ratios = {}
    for key, r in res.items():
        mode, dtype = key.split()
        ratios[f"{key}: ours/timm TNT-S"] = r["ours tnt"] / r["timm tnt"]
        ratios[f"{key}: ours/timm DeiT-S"] = r["ours deit"] / r["timm deit"]
        ratios[f"{key}: FLOP-normalised TNT-S/DeiT-S (ours)"] = (
            r["ours tnt"] * PAPER_GFLOPS["tnt"] / (r["ours deit"] * PAPER_GFLOPS["deit"])
        )
        if "ours tnt compiled" in r:
            for fam, label in (("tnt", "TNT-S"), ("deit", "DeiT-S")):
                ratios[f"{key}: ours compiled / timm {label}"] = (
                    r[f"ours {fam} compiled"] / r[f"timm {fam}"]
                )
            ratios[f"{key}: FLOP-normalised TNT-S/DeiT-S (ours compiled)"] = (
                r["ours tnt compiled"]
                * PAPER_GFLOPS["tnt"]
                / (r["ours deit compiled"] * PAPER_GFLOPS["deit"])
            )
    for mode in args.modes.split(","):
        if f"{mode} fp32" in res and f"{mode} {default_dtype}" in res:
            ratios[f"{mode}: ours default ({default_dtype}) / timm TNT-S fp32"] = (
                res[f"{mode} {default_dtype}"]["ours tnt"] / res[f"{mode} fp32"]["timm tnt"]
            )
    if "triton" in kernels:
        ratios.update(triton_ratios(res, args, device, tnt_state, size))
    # the targets are about TNT-S and DeiT-S as published (224 px, depth 12): none for smoke runs
    full_size = (args.img_size, args.depth) == (224, 12)
    targets = targets_for(device, default_dtype) if full_size else {}
    targets = {k: v for k, v in targets.items() if "triton" not in k or k in ratios}
    print("\nratios")
    missed = []
    for k, v in ratios.items():
        t = targets.get(k)
        mark = "" if t is None else f"   target >= {t:.2f}  {'ok' if v >= t else 'MISSED'}"
        if t is not None and v < t:
            missed.append(k)
        print(f"  {k:58s} {v:6.2f}{mark}")
    for k, v in compile_s.items():
        print(f"  compile time {k}: {v:.1f} s (not counted in img/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev_name,
                    "batch_size": args.batch_size,
                    "img_size": args.img_size,
                    "depth": args.depth,
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                    "img_per_s": res,
                    "ratios": ratios,
                    "targets": targets,
                    "missed": missed,
                    "compile_s": compile_s,
                    "inner_kernels": kernels,
                    "triton_skipped": triton_skipped,
                    "inner_tiles": tiles,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
