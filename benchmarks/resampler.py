#!/usr/bin/env python
"""The streaming resampler's cost against the model's, in one run on this machine.

    python benchmarks/resampler.py [--model models/default] [--threads 1]

For each device layout (rate x leads) it times `WindowResampler.push` on 0.25 s frames, per second of signal, and
the model's graph advancing 16 streams by one 25-sample hop (its serving call shape), per second of signal at the
model's rate; prints both and the ratio resampler / model. Results: benchmarks/results/resampler.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from msssm_serve.resample import WindowResampler
from msssm_serve.runtime import DEFAULT_MODEL_DIR, OnnxModel

LAYOUTS = [(360, 2), (500, 3), (250, 12), (500, 12), (128, 1), (1000, 1)]


def seconds_per_call(fn, repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model directory")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    model = OnnxModel(args.model, threads=args.threads)
    rows, hop = 16, 25
    x = np.random.default_rng(0).standard_normal((rows, hop, model.n_channels)).astype(np.float32) * 0.1
    state = model.zero_state(rows)
    model_s = seconds_per_call(lambda: model.advance(x, state)) / (rows * hop) * model.sample_rate
    print(f"model {model.name}: {model_s * 1e3:.2f} ms of compute per stream-second at {model.sample_rate} Hz "
          f"({rows} streams x {hop} samples per call, {args.threads} thread(s))")
    print("| device | resampler ms per stream-second | model ms per stream-second | resampler / model |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(1)
    for rate, leads in LAYOUTS:
        frame = rng.standard_normal((rate // 4, leads)).astype(np.float32)
        resampler = WindowResampler(rate, model.sample_rate, model.window, leads)
        per_frame = seconds_per_call(lambda: resampler.push(frame), repeat=200)
        resample_s = per_frame * 4
        print(f"| {rate} Hz x {leads} lead(s) | {resample_s * 1e3:.3f} | {model_s * 1e3:.2f} | "
              f"{resample_s / model_s:.3f} |")
    print(f"resampler delay: {WindowResampler(360, model.sample_rate, model.window, 2).delay_seconds * 1e3:.0f} ms "
          f"at 360 Hz, {WindowResampler(500, model.sample_rate, model.window, 2).delay_seconds * 1e3:.0f} ms at 500 Hz")


if __name__ == "__main__":
    main()
