"""Where a training step's time goes: torch.profiler over one step, ops by self CPU time.

python benchmarks/profile_tnt_step.py [--model tnt_s_patch16_224] [--dtype fp32|bf16]
    [--batch-size 16] [--shapes]    # --shapes: group by input shape (which tensor is slow)
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
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).train()
    size = (
        model.pixel_embed.img_size if hasattr(model, "pixel_embed") else model.patch_embed.img_size
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        step()
    table = prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40
    )
    print(f"{args.model}  {args.dtype}  batch {args.batch_size}  threads {torch.get_num_threads()}")
    print(table)


if __name__ == "__main__":
    main()
