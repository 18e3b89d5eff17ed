#!/usr/bin/env python
"""The graph against this machine's peak: work per sample, a roofline ratio, and what a fused recurrence would save.

    python benchmarks/roofline.py [--model models/default] [--rows 16] [--samples 25] [--out benchmarks/results/roofline.md]

Prints, from one run on one thread (onnxruntime and PyTorch both pinned to one):
  1. the model's work per sample, counted from its config: matrix multiply-adds, other arithmetic, exponentials and
     other transcendentals (what the exported graph executes, zeros of the block-diagonal dt projection included);
  2. this machine's peak for each kind: the vector FMA rate (onnxruntime's MatMul on 512 x 512) for every
     multiply-add, add and multiply; the better of numpy's and onnxruntime's SIMD exp and log on cache-resident
     vectors for the transcendentals;
  3. the graph's achieved samples/s at its best call shape (rows x samples per call) and the roofline ratio:
     (time per sample if every op ran at its peak) / (time per sample measured);
  4. onnxruntime's profile of that call: the share of time in the recurrence (each layer's lowered Scan and the
     decay / drive / read-out ops around it) and in the rest, and the project's fused C++ scan kernel
     (msssm_serve/csrc, what CPU training runs) timed on the same recurrence, so that the graph's time with a fused
     recurrence operator is measured, not guessed: rest + kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from msssm_serve.config import ModelConfig
from msssm_serve.runtime import OnnxModel

ROOT = Path(__file__).resolve().parents[1]


def work_per_sample(cfg: ModelConfig) -> dict[str, int]:
    """Operations per input sample of one stream, as the exported graph runs them: `macs` (multiply-adds of the
    matrix products), `arith` (other elementwise adds, multiplies, divides, reductions), `exp`, `other_trans`
    (log, sigmoid, square root)."""
    dm, D, M, N, r, S, K = cfg.d_model, cfg.d_inner, cfg.n_ssm, cfg.d_state, cfg.rank, cfg.n_scales, cfg.kernel_size
    c_in = cfg.n_channels * cfg.features_per_channel
    macs = arith = exp = other = 0
    # input normalisation (and template deviation, lead mask), embedding
    arith += 2 * c_in  # per feature: a subtract and a divide, or a select and a cast
    macs += c_in * dm
    arith += dm  # embedding bias
    for _ in range(cfg.n_layers):
        arith += 4 * dm; other += 1  # RMSNorm: square, mean, scale, weight; one sqrt
        macs += dm * 2 * D; arith += 2 * D  # in_proj with bias
        other += D; arith += D  # silu(u)
        if S:
            arith += S * (2 * K * D + 2 * (K - 1) * D)  # low and high filters, K taps each
        if cfg.ssm == "s6":
            macs += D * M * (r + 2 * N)  # x_proj
            macs += (M * r) * (M * D)  # block-diagonal dt_proj, as executed
        arith += M * D  # dt bias
        exp += M * D; other += M * D; arith += 5 * M * D  # softplus as relu(x) + log(1 + exp(-|x|))
        arith += M * N * D; exp += M * N * D  # decay = exp(dt * A)
        arith += M * D  # dt * x
        arith += 5 * M * N * D  # a step: drive, decay * h, add (in the Scan), h * C, sum over N
        arith += 2 * M * D  # skip: y + D * x
        if S:
            macs += D * M; arith += M  # mixer projection
            arith += 2 * M * D  # y * E, sum over scales
        other += D; arith += 2 * D  # silu(gate), z * gate
        macs += D * dm; arith += 2 * dm  # out_proj with bias, residual
    arith += 4 * dm; other += 1  # final RMSNorm
    arith += 2 * dm + 2  # causal mean pooling: running sum, count, divide
    macs += dm * cfg.n_classes; arith += cfg.n_classes
    other += cfg.n_classes  # sigmoid / softmax
    return {"macs": macs, "arith": arith, "exp": exp, "other_trans": other}


def session(graph: onnx.GraphProto) -> ort.InferenceSession:
    return one_thread(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def best_rate(run, work: float, min_time: float = 0.4) -> float:
    """Work units per second of `run` (median over repeats after a warm-up)."""
    run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return work / float(np.median(times))


@functools.cache
def peak_matmul(n: int = 512, chain: int = 8) -> float:
    """Multiply-adds per second of onnxruntime's MatMul on [n, n] x [n, n] (its GEMM near the FMA peak)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], (np.eye(n, dtype=np.float32)).ravel())
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"]) for i in range(chain)]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info(f"h{chain}", TensorProto.FLOAT, [n, n])], [w])
    s = session(g)
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return best_rate(lambda: s.run(None, {"x": x}), chain * n**3)


def peak_transcendental(op: str, size: int = 16384, repeats: int = 32) -> float:
    """Elements per second of a SIMD float32 `op` ("Exp" or "Log") over a cache-resident vector: the better of
    numpy's ufunc and a chain of onnxruntime's node (both vectorised for this CPU)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-5.0, -0.01, size).astype(np.float32) if op == "Exp" else rng.uniform(0.5, 2.0, size).astype(np.float32)
    out = np.empty_like(x)
    fn = np.exp if op == "Exp" else np.log
    numpy_rate = best_rate(lambda: [fn(x, out=out) for _ in range(repeats)], repeats * size)
    # a chain that stays in range: exp(x) of x <= 0 is in (0, 1], then minus one is <= 0 again; log of a value
    # in [0.5, 2] is in [-0.7, 0.7], plus 1.3 is back in [0.6, 2]
    shift = helper.make_tensor("k", TensorProto.FLOAT, [], [-1.0 if op == "Exp" else 1.3])
    nodes = []
    for i in range(repeats):
        source = "x" if i == 0 else f"s{i}"
        nodes += [helper.make_node(op, [source], [f"h{i}"]), helper.make_node("Add", [f"h{i}", "k"], [f"s{i + 1}"])]
    g = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                          [helper.make_tensor_value_info(f"s{repeats}", TensorProto.FLOAT, [size])], [shift])
    s = session(g)
    chain_s = 1 / best_rate(lambda: s.run(None, {"x": x}), 1.0)
    adds_s = repeats * size / peak_matmul()
    ort_rate = repeats * size / max(chain_s - adds_s, 1e-9)  # the adds taken out at the FMA rate
    return max(numpy_rate, ort_rate)


LOWERED = re.compile(r"^ssm\d+_")  # names the exporter's lowering gives the recurrence's ops (export/lowering.py)


def feeds_for(sess: ort.InferenceSession, channels: int, rows: int, samples: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "x":
            feeds["x"] = rng.standard_normal((rows, samples, channels)).astype(np.float32)
        else:
            feeds[inp.name] = np.zeros([rows, *[int(d) for d in inp.shape[1:]]], np.float32)
    return feeds


def without_recurrence(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each layer's lowered recurrence (the Scan and the decay / drive / read-out ops around it)
    replaced by Identity(x) -> y and Identity(h0) -> h_last: everything else the graph does, unchanged. dt, B and C,
    which a fused operator would read, are kept as outputs so that nothing upstream of the recurrence is pruned."""
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    lowered = [n for n in g.graph.node if any(LOWERED.match(v) for v in (*n.input, *n.output))]
    keep = [n for n in g.graph.node if n not in lowered]
    replacement, extra_outputs = [], []
    for k in range(len([n for n in lowered if n.op_type == "Scan"])):
        prefix = f"ssm{k}_"
        mine = [n for n in lowered if any(v.startswith(prefix) for v in (*n.input, *n.output))]
        inputs = {n.output[0]: n.input for n in mine}
        x, dt = inputs[f"{prefix}x_tm"][0], inputs[f"{prefix}dt_tm"][0]
        b, c, h0 = inputs[f"{prefix}B_tm"][0], inputs[f"{prefix}C_tm"][0], inputs[f"{prefix}h0_nd"][0]
        y = next(n.output[0] for n in mine if list(n.input) == [f"{prefix}y_tm"])
        h_last = next(n.output[0] for n in mine if list(n.input) == [f"{prefix}h_last_nd"])
        replacement += [helper.make_node("Identity", [x], [y]), helper.make_node("Identity", [h0], [h_last])]
        extra_outputs += [dt, b, c]
    del g.graph.node[:]
    g.graph.node.extend(keep + replacement)
    g.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in extra_outputs)
    _sort_topologically(g.graph)
    return g


def _sort_topologically(graph: onnx.GraphProto) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(v in known or not v for v in n.input)]
        if not ready:
            raise RuntimeError("graph has a cycle or a missing input")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def one_thread(model: onnx.ModelProto, profile_dir: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def call_times(model_dir: Path, channels: int, rows: int, samples: int, rounds: int = 7) -> tuple[float, float]:
    """Microseconds per call of the graph and of the graph without its recurrence, interleaved (best of rounds)."""
    graph = onnx.load(str(model_dir / "model.onnx"))
    sessions = [one_thread(graph), one_thread(without_recurrence(graph))]
    feeds = feeds_for(sessions[0], channels, rows, samples)
    best = [float("inf")] * 2
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            best[i] = min(best[i], 1e6 / best_rate(lambda: s.run(None, feeds), 1.0, min_time=0.2))
    return best[0], best[1]


def profiled_ops(model_dir: Path, channels: int, rows: int, samples: int, calls: int = 100) -> dict[str, float]:
    """Microseconds per call in each op type's kernels (the recurrence's ops as one part), from onnxruntime's
    profiler. The profiler adds its own cost to every node it times, so these are shares, not a wall time."""
    graph = onnx.load(str(model_dir / "model.onnx"))
    for node in graph.graph.node:  # name every node after its first output, so the profile says which it is
        if not node.name:
            node.name = f"{node.output[0]}__{node.op_type}"
    recurrence = {n.name for n in graph.graph.node if any(LOWERED.match(v) for v in (*n.input, *n.output))}
    top = {n.name for n in graph.graph.node}
    with tempfile.TemporaryDirectory() as tmp:
        s = one_thread(graph, tmp)
        feeds = feeds_for(s, channels, rows, samples)
        for _ in range(calls):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    per_part: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        if name not in top:
            continue  # nodes inside a Scan body are inside the Scan's own time
        per_part["recurrence" if name in recurrence else ev.get("args", {}).get("op_name", "?")] += ev["dur"] / calls
    return dict(per_part)


def fused_kernel_us(cfg: ModelConfig, rows: int, samples: int) -> float | None:
    """Microseconds per call of the C++ scan kernel's forward, one layer's recurrence at this shape (None: no
    compiler or no torch)."""
    try:
        import torch

        torch.set_num_threads(1)
        from msssm_serve.selective import _load_extension
    except ImportError:
        return None
    ext = _load_extension()
    if ext is None:
        return None
    g = torch.Generator().manual_seed(0)
    M, D, N = cfg.n_ssm, cfg.d_inner, cfg.d_state
    x = torch.randn(rows, samples, M, D, generator=g)
    dt = torch.rand(rows, samples, M, D, generator=g) * 0.1
    A = -torch.rand(M, D, N, generator=g) * 10
    B = torch.randn(rows, samples, M, N, generator=g)
    C = torch.randn(rows, samples, M, N, generator=g)
    h0 = torch.zeros(rows, M, D, N)
    with torch.no_grad():
        return 1e6 / best_rate(lambda: ext.forward(x, dt, A, B, C, h0), 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "default"))
    p.add_argument("--rows", type=int, default=16, help="streams per call (the bare graph's best shape here)")
    p.add_argument("--samples", type=int, default=25, help="samples per stream per call")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "roofline.md"))
    args = p.parse_args()
    model_dir = Path(args.model)
    model = OnnxModel(model_dir, threads=1)
    cfg = ModelConfig.from_dict(model.meta["config"])
    work = work_per_sample(cfg)

    # The machine's peak, not one library's per-op kernels: every multiply-add, add or multiply takes one lane of
    # the vector FMA units, whose rate onnxruntime's GEMM reaches; exponentials and logs at the rate of a SIMD
    # implementation (numpy's). A graph whose ops each stream their operands through memory sits far below it.
    fma = peak_matmul()
    peaks = {"macs": fma, "arith": fma, "exp": peak_transcendental("Exp"), "other_trans": peak_transcendental("Log")}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.samples, model.n_channels)).astype(np.float32)
    state = model.zero_state(args.rows)
    achieved = best_rate(lambda: model.advance(x, state), args.rows * args.samples, min_time=1.0)
    bound_s = sum(work[k] / peaks[k] for k in work)  # seconds per sample at peak
    ratio = bound_s * achieved

    wall_us, rest_us = call_times(model_dir, cfg.n_channels, args.rows, args.samples)
    parts = profiled_ops(model_dir, cfg.n_channels, args.rows, args.samples)
    kernel_us = fused_kernel_us(cfg, args.rows, args.samples)
    profiled_total = sum(parts.values())
    lines = [
        "# The graph against this machine's peak",
        "",
        f"`python benchmarks/roofline.py --rows {args.rows} --samples {args.samples}` "
        f"({time.strftime('%Y-%m-%d')}, one thread, {os.cpu_count()} cores on the machine), model "
        f"`{model.name}`: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_ssm} SSMs x {cfg.d_inner} channels "
        f"x N={cfg.d_state}. Peaks measured here: every multiply-add, add or multiply at the vector FMA rate that "
        f"onnxruntime's MatMul reaches on 512 x 512; exponentials and logs (sigmoid and sqrt counted as logs) at "
        f"the better SIMD float32 rate of numpy's ufunc and onnxruntime's node, on cache-resident vectors.",
        "",
        "| work per sample | count | peak here (per s, one thread) | time at peak (ns/sample) |",
        "|---|---|---|---|",
    ]
    names = {"macs": "matrix multiply-adds", "arith": "other arithmetic (add, multiply, ...)",
             "exp": "exponentials", "other_trans": "log, sigmoid, sqrt"}
    for k in work:
        lines.append(f"| {names[k]} | {work[k]:,} | {peaks[k] / 1e9:.2f} G | {work[k] / peaks[k] * 1e9:.0f} |")
    lines += [
        "",
        f"Achieved at {args.rows} x {args.samples} per call: **{achieved:,.0f} samples/s** "
        f"({1e9 / achieved:,.0f} ns/sample) against **{1 / bound_s:,.0f}** if every op ran at its peak: "
        f"**roofline ratio {ratio:.2f}**.",
        "",
        f"Where a call's time goes: {wall_us:.0f} us per call; without its recurrence (each layer's Scan and the "
        f"decay, drive and read-out ops around it replaced by an Identity) {rest_us:.0f} us, so the recurrence takes "
        f"**{(wall_us - rest_us) / wall_us:.0%}** of the call. By op type (onnxruntime's profiler; it adds its own "
        f"cost per node, so shares only):",
        "",
        "| part | share of kernel time |",
        "|---|---|",
    ]
    for part, us in sorted(parts.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"| {part} | {us / profiled_total:.1%} |")
    lines.append("")
    if kernel_us is None:
        lines.append("The fused C++ kernel could not be loaded (no torch or no compiler): no fused comparison.")
    else:
        fused_us = rest_us + cfg.n_layers * kernel_us
        lines += [
            f"The project's fused C++ scan kernel (`msssm_serve/csrc/selective_scan.cpp`, forward) does one layer's "
            f"recurrence at this shape in {kernel_us:.0f} us against {(wall_us - rest_us) / cfg.n_layers:.0f} us for "
            f"the standard operators, so the graph with a fused recurrence operator would take about {fused_us:.0f} us "
            f"per call: **{wall_us / fused_us:.2f}x** the standard graph's throughput (roofline ratio "
            f"{ratio * wall_us / fused_us:.2f}).",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
