#!/usr/bin/env python
"""Training-step time (forward + backward) of the default MS-SSM: parallel scans vs the sequential reference.

    python benchmarks/train_step.py [--batch 32 --length 1000 --repeats 3 --device cpu|cuda]

All variants run in one process on the same weights and input; ratios are what this script is for.
"""

from __future__ import annotations

import argparse
import time


import torch

from msssm_serve import selective
from msssm_serve.config import ModelConfig
from msssm_serve.model import MSSSMClassifier


def step_seconds(model, x, scan: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # first run warms up (and compiles the fused kernel)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x, scan=scan)[:, -1].logsumexp(-1).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--channels", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(n_channels=args.channels)
    model = MSSSMClassifier(cfg).to(args.device)
    x = torch.randn(args.batch, args.length, args.channels, device=args.device)

    results = {
        "sequential reference (tensor ops, one step at a time)": step_seconds(model, x, "sequential", args.repeats),
        "blocked parallel scan (tensor ops; the CUDA form)": step_seconds(model, x, "blocked", args.repeats),
    }
    if selective.fused_available(x.device):
        results["fused CPU scan (C++ kernel; training default on CPU)"] = step_seconds(model, x, "fused", args.repeats)

    print(f"train step, default config {cfg.d_model=} {cfg.n_layers=} {cfg.d_state=} {cfg.n_scales=}, "
          f"B={args.batch} L={args.length} C={args.channels}, device {x.device}, torch threads={torch.get_num_threads()}")
    reference = next(iter(results.values()))
    for name, seconds in results.items():
        print(f"  {name:58s} {seconds * 1000:9.1f} ms   speed-up vs sequential {reference / seconds:5.2f}x")


if __name__ == "__main__":
    main()
