"""Where a training step's time goes: torch.profiler over one step, ops by self time (CUDA time
on a GPU, CPU time on a CPU), optionally with the model compiled and a Chrome trace written.

python benchmarks/profile_tnt_step.py [--model tnt_s_patch16_224] [--dtype fp32|bf16]
    [--batch-size 16] [--device auto|cpu|cuda] [--inner-kernel auto|torch|triton]
    [--compile] [--trace step.json] [--shapes]   # --shapes: group by input shape
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from suite.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tnt_s_patch16_224")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--inner-kernel", default="auto", help="TNT's model.inner_kernel")
    ap.add_argument("--compile", action="store_true", help="whole-model torch.compile first")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--trace", metavar="PATH", help="also write a Chrome trace of the step")
    args = ap.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    extra = {"inner_kernel": args.inner_kernel} if args.model.startswith("tnt") else {}
    model = create_model(args.model, **extra).to(device).train()
    size = (
        model.pixel_embed.img_size if hasattr(model, "pixel_embed") else model.patch_embed.img_size
    )
    fn = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = F.cross_entropy(fn(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (and the compile, with --compile)
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=args.shapes) as prof:
        step()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by=sort, row_limit=args.rows, max_name_column_width=60
    )
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{args.model}  {args.dtype}  batch {args.batch_size}  {name}  "
        f"compile {'whole' if args.compile else 'off'}  inner kernel {args.inner_kernel}"
    )
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
