"""Training-step speed of our tnt_s_patch16_224 against timm's, same weights, same batch.

Steps alternate between the two models in one process (so drift in machine load hits both),
in fp32 and in bf16 autocast. Prints median step times and the ratio timm / ours (>= 1.0 means
ours is not slower).

    python benchmarks/bench_models.py [--model tnt_s_patch16_224] [--batch-size 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from suite.models import create_model, load_timm_state_dict


def train_step(model, opt, x, y, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tnt_s_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = timm.create_model(args.model, pretrained=False)
    ours = load_timm_state_dict(create_model(args.model), ref.state_dict())
    x = torch.randn(args.batch_size, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch_size,))
    print(
        f"{args.model}  batch {args.batch_size}  threads {torch.get_num_threads()}  "
        f"torch {torch.__version__}"
    )
    for dtype in args.dtypes.split(","):
        models = {"ours": ours.train(), "timm": ref.train()}
        opts = {
            k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()
        }
        times = {k: [] for k in models}
        for i in range(args.warmup + args.steps):
            for k, m in models.items():
                t0 = time.perf_counter()
                train_step(m, opts[k], x, y, dtype)
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{dtype:5s} train step  ours {med['ours'] * 1e3:8.1f} ms "
            f"({args.batch_size / med['ours']:6.1f} img/s)  timm {med['timm'] * 1e3:8.1f} ms "
            f"({args.batch_size / med['timm']:6.1f} img/s)  ratio timm/ours "
            f"{med['timm'] / med['ours']:.2f}"
        )


if __name__ == "__main__":
    main()
