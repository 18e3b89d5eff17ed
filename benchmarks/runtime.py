#!/usr/bin/env python
"""The exported graph under onnxruntime: latency and throughput, vs PyTorch eager, and streaming vs recomputing.

    python benchmarks/runtime.py [--model models/default] [--checkpoint runs/default/checkpoint.pt] [--threads 2]

Prints, from one run on this machine:
  1. per-call latency and samples/s of the graph for T in {1, 25, 100, 1000} x batch in {1, 16, 256};
  2. a 10 s 12-lead window: onnxruntime vs PyTorch eager (the checkpoint the model was exported from), as ratios,
     against both PyTorch forms: the fused C++ scan kernel (what `model(x)` runs on CPU) and the tensor-op scan
     (plain PyTorch ops, what runs where the kernel is not built);
  3. stream update cost (advance one hop from the carried state) vs recomputing the window so far from scratch at
     every hop (W = window, hop = 25), as a ratio;
  4. the graph's cost per sample by call shape (streams x samples per call, one Session.run each): the measurement
     behind the runtime's ROWS_PER_CALL and SAMPLES_PER_CALL;
  5. with --against OTHER_MODEL_DIR [--rounds N]: both models' cost per sample at the serving shapes, interleaved
     so that the machine's moments fall on both, and the median ratio (e.g. a candidate default model against the
     bundled one: python benchmarks/runtime.py --model CANDIDATE --against models/default).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from msssm_serve.runtime import OnnxModel


def best_seconds(fn, min_time: float = 0.5, max_runs: int = 50) -> float:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "models" / "default"))
    p.add_argument("--checkpoint", help="checkpoint the model was exported from (for the PyTorch comparison)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--hop", type=int, default=25)
    p.add_argument("--against", help="a second model directory: cost per sample side by side, as a ratio")
    p.add_argument("--rounds", type=int, default=7, help="--against: interleaved measurements per shape")
    args = p.parse_args()
    model = OnnxModel(args.model, threads=args.threads or None)
    rng = np.random.default_rng(0)
    C, W = model.n_channels, model.window
    print(f"model {model.name}: {model.meta['config']['d_model']=} layers={model.meta['config']['n_layers']} "
          f"state {model.state_bytes} B/stream, providers {model.providers}, threads {args.threads or 'all'}")

    print("\n1. graph latency (median per call) and throughput")
    print(f"{'T':>6} {'batch':>6} {'ms/call':>10} {'samples/s':>12}")
    for T in (1, 25, 100, 1000):
        for batch in (1, 16, 256):
            x = rng.standard_normal((batch, T, C)).astype(np.float32)
            state = model.zero_state(batch)
            s = best_seconds(lambda: model.advance(x, state), min_time=0.3, max_runs=20)
            print(f"{T:>6} {batch:>6} {s * 1000:>10.2f} {batch * T / s:>12.0f}")

    window = rng.standard_normal((1, W, C)).astype(np.float32)
    ort_s = best_seconds(lambda: model.advance(window, model.zero_state(1)))
    print(f"\n2. one {W / model.sample_rate:.0f} s {C}-lead window, batch 1: onnxruntime {ort_s * 1000:.1f} ms")
    if args.checkpoint:
        import torch

        from msssm_serve.checkpoint import load_checkpoint

        torch_model, _, _ = load_checkpoint(args.checkpoint)
        torch_model.eval()
        xt = torch.from_numpy(window)
        for scan, label in (("auto", "fused C++ scan kernel"), ("blocked", "tensor-op scan")):
            with torch.no_grad():
                torch_s = best_seconds(lambda: torch_model.advance(xt, torch_model.zero_state(1), scan=scan))
            print(f"   PyTorch eager, {label}: {torch_s * 1000:.1f} ms (threads {torch.get_num_threads()}) -> "
                  f"onnxruntime is {torch_s / ort_s:.2f}x faster")

    hop = args.hop
    state = model.zero_state(1)
    _, state = model.advance(window[:, : W - hop], state)
    update_s = best_seconds(lambda: model.advance(window[:, W - hop :], state))
    # Without a carried state every hop would rerun the window so far; averaged over the hops of a window that is
    # the mean prefix length, measured here at its end (the whole window) as the worst case and at W/2 as the mean.
    recompute_full = best_seconds(lambda: model.advance(window, model.zero_state(1)))
    recompute_half = best_seconds(lambda: model.advance(window[:, : W // 2], model.zero_state(1)))
    print(f"\n3. stream update, W={W}, hop={hop}: advance {hop} samples from state {update_s * 1000:.2f} ms; "
          f"recompute from scratch: {recompute_full * 1000:.1f} ms (whole window), {recompute_half * 1000:.1f} ms "
          f"(mean prefix W/2)")
    print(f"   update vs recompute: {recompute_full / update_s:.0f}x (whole window), "
          f"{recompute_half / update_s:.0f}x (mean over the window's hops)")

    print("\n4. graph cost by call shape (one Session.run per call, no splitting)")
    print(f"{'streams':>8} {'samples':>8} {'us/sample':>10}")
    for rows, length in ((1, 1000), (1, 250), (4, 125), (16, 25), (16, 50), (64, 25), (256, 25)):
        x = rng.standard_normal((rows, length, C)).astype(np.float32)
        print(f"{rows:>8} {length:>8} {us_per_sample(model, x, min_time=0.3, max_runs=20):>10.1f}")

    if args.against:
        side_by_side(model, OnnxModel(args.against, threads=args.threads or None), rng, args.rounds)


def us_per_sample(model: OnnxModel, x: np.ndarray, min_time: float, max_runs: int) -> float:
    """The graph's cost per sample for one call of `x` [rows, T, C] from the zero state (one Session.run)."""
    feeds = {"x": x, **dict(zip(model.state_names, model.zero_state(len(x))))}
    s = best_seconds(lambda: model.session.run(model.output_names, feeds), min_time=min_time, max_runs=max_runs)
    return s * 1e6 / (x.shape[0] * x.shape[1])


def side_by_side(model: OnnxModel, other: OnnxModel, rng, rounds: int = 7) -> None:
    """Cost per sample of two models at the shapes the server calls (streams x hop, /classify windows): `rounds`
    interleaved pairs of measurements per shape; each model's best, and the median of the pairs' ratios (a pair's two
    measurements are taken within a second of each other, so the machine's drift falls on both)."""
    print(f"\n5. serving cost per sample: {model.dir} vs {other.dir} ({rounds} interleaved rounds)")
    print(f"{'streams':>8} {'samples':>8} {'us/sample':>10} {'against':>10} {'ratio':>7}")
    ratios = []
    for rows, length in ((1, 1000), (1, 512), (4, 125), (16, 25), (20, 25), (64, 25), (256, 25)):
        x = rng.standard_normal((rows, length, model.n_channels)).astype(np.float32)
        pairs = [(us_per_sample(model, x, 0.2, 10), us_per_sample(other, x, 0.2, 10)) for _ in range(rounds)]
        ratio = float(np.median([a / b for a, b in pairs]))
        ratios.append(ratio)
        best, best_other = min(a for a, _ in pairs), min(b for _, b in pairs)
        print(f"{rows:>8} {length:>8} {best:>10.1f} {best_other:>10.1f} {ratio:>7.2f}")
    print(f"   cost ratio {model.dir} / {other.dir}: {np.mean(ratios):.2f} (mean over the shapes), "
          f"{max(ratios):.2f} (worst)")


if __name__ == "__main__":
    main()
