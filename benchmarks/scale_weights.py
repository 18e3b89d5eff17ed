#!/usr/bin/env python
"""What the scale mixer's output costs, in one run on this machine.

    python benchmarks/scale_weights.py [--model models/default] [--threads 1] [--rounds 7]

Three ways to run the same model, timed interleaved (round-robin, median of `--rounds` rounds) at the server's two
call shapes, 16 streams x one 25-sample hop and one 1,000-sample /classify window:
  * `without output`: the graph with its `scale_weights` output removed (onnxruntime then drops the Concat that
    fed it): what serving cost before the mixer was an output;
  * `not requested`: the bundled graph, `OnnxModel.advance` not asking for the weights (the default path);
  * `requested`: asking for them, plus the summary into per-scale shares that a prediction carries.
Prints each in us per sample and the ratios to `without output`. Results: benchmarks/results/scale_weights.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from msssm_serve.runtime import DEFAULT_MODEL_DIR, OnnxModel, summarise_scale_weights

RESULTS = Path(__file__).resolve().parent / "results" / "scale_weights.md"


def without_scale_output(model_dir: Path, into: Path) -> Path:
    """A copy of the model directory whose graph lacks the scale_weights output."""
    graph = onnx.load(str(model_dir / "model.onnx"))
    kept = [o for o in graph.graph.output if o.name != "scale_weights"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    into.mkdir()
    onnx.save(graph, str(into / "model.onnx"))
    (into / "model.json").write_text((model_dir / "model.json").read_text())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model directory")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    model_dir = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        bare = OnnxModel(without_scale_output(model_dir, Path(tmp) / "bare"), threads=args.threads)
        full = OnnxModel(model_dir, threads=args.threads)
    if bare.has_scale_weights or not full.has_scale_weights:
        raise SystemExit(f"{model_dir}: its graph has no scale_weights output to measure")
    rng = np.random.default_rng(0)
    shapes = {"16 streams x 25 samples": (16, 25, 40), "1 window x 1000 samples": (1, 1000, 3)}
    variants = {
        "without output": lambda m, x, s: bare.advance(x, s),
        "not requested": lambda m, x, s: full.advance(x, s),
        "requested": lambda m, x, s: summarise_scale_weights(full.advance(x, s, scale_weights=True)[2]),
    }
    lines = ["# The scale mixer's output: cost per sample", "",
             f"`python benchmarks/scale_weights.py --model {os.path.relpath(args.model)} --threads {args.threads}`: "
             f"median of "
             f"{args.rounds} interleaved rounds, onnxruntime intra-op threads {args.threads}.", "",
             "| call shape | " + " | ".join(f"{v} us/sample" for v in variants) + " | not requested / without | "
             "requested / without |", "|---|" + "---|" * (len(variants) + 2)]
    for shape, (rows, length, calls) in shapes.items():
        x = rng.normal(0, 0.3, (rows, length, full.n_channels)).astype(np.float32)
        state = full.zero_state(rows)
        times = {v: [] for v in variants}
        for v in variants:  # warm-up
            variants[v](None, x, state)
        for _ in range(args.rounds):
            for v, run in variants.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    run(None, x, state)
                times[v].append((time.perf_counter() - t0) / (calls * rows * length))
        us = {v: 1e6 * float(np.median(t)) for v, t in times.items()}
        lines.append(f"| {shape} | " + " | ".join(f"{us[v]:.2f}" for v in variants)
                     + f" | {us['not requested'] / us['without output']:.3f} | "
                       f"{us['requested'] / us['without output']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
