#!/usr/bin/env python
"""Serving efficiency: what the server delivers against what its graph alone can do, on the same cores, in one run.

    python benchmarks/efficiency.py [--model models/default] [--workers 2] [--duration 20] [--write-readme]

1. The bare graph: `--workers` processes, each one onnxruntime thread (as the server's workers run), calling the
   graph at every shape of a batch x T sweep from the zero state for `--shape-seconds` each; its best summed
   samples/s is the ceiling.
2. Stream capacity (`loadtest/streams.py`: real-time 100 Hz streams, p99 < 100 ms, no failures, generator kept
   pace) -> served samples/s = streams x 100: each stream on its own /stream connection, then the same streams
   `--per-connection` to a /gateway connection (`loadtest/streams.py --per-connection`).
3. The batcher path: as many streams, driven in-process straight into the server's `Batcher` (sessions, batching,
   results; no sockets, no latency bound) as fast as it goes: what the server's own per-stream work leaves of the
   bare graph before any network, so the loss splits into the batcher's share and the sockets'.
4. /classify capacity (`loadtest/streams.py --classify --binary`: 10 s windows, p99 < 200 ms) -> windows/s x 1000.
Prints each, and serving efficiency = served samples/s / bare-graph samples/s for streams and for /classify: against
the sweep's best and, since a shared machine's speed drifts over the run, against the graph around each load test (in
parentheses: the mean of the graph's best shape measured again right after the test and right before it, the sweep's
best standing for "before" the first); writes
benchmarks/results/efficiency.md (and .json) and, with --write-readme, the figures between the README's
`<!-- efficiency -->` markers.

By default the load generator shares the machine's cores with the server (its CPU is in the load tests' own result
files), so on a small machine the ratio also pays for the clients. With `--server-cpus 0 --loadgen-cpus 1` the
server and the bare graph run on the same core(s) and the generator on others, as clients on other machines would:
the ratio is then the server's alone (files and README markers `efficiency_pinned` / `efficiency-pinned`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtest"))
from streams import cpu_flags, cpu_list, cpu_text  # noqa: E402  (the load tests' CPU-list syntax)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
LOADTEST = REPO_ROOT / "loadtest" / "results"
BATCHES, LENGTHS = (1, 4, 16, 64, 256), (25, 100, 250, 1000)
MAX_CALL_SAMPLES = 25_600  # bigger calls spill the cache (64 x 1000: a fifth of the rate of 64 x 250) and take long


def _one_thread_on(cpus: set[int] | None) -> None:
    """A measuring process runs as a server worker does: one onnxruntime thread, on the server's CPUs when given."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if cpus:
        os.sched_setaffinity(0, cpus)


def _rate_together(worker, args: tuple, workers: int, seconds: float, settle_s: float, cpus) -> float:
    """`workers` spawned processes run `worker(*args, seconds, start, queue, cpus)` at once; each puts its samples/s
    once `start` is set, `settle_s` after they were started (every process loaded and warm before the clock starts).
    -> the sum."""
    ctx = mp.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(*args, seconds, start, queue, cpus)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(settle_s)
    start.set()
    rate = sum(queue.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return rate


def _graph_worker(model_dir: str, batch: int, length: int, seconds: float, start, queue, cpus) -> None:
    _one_thread_on(cpus)
    from msssm_serve.runtime import OnnxModel

    model = OnnxModel(model_dir, threads=1)
    x = np.random.default_rng(0).normal(0, 0.3, (batch, length, model.n_channels)).astype(np.float32)
    feeds = {"x": x, **dict(zip(model.state_names, model.zero_state(batch)))}
    model.session.run(model.output_names, feeds)  # warm-up
    start.wait()
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        model.session.run(model.output_names, feeds)
        calls += 1
    queue.put(calls * batch * length / (time.perf_counter() - t0))


def graph_rate(model_dir: str, batch: int, length: int, workers: int, seconds: float,
                cpus: set[int] | None) -> float:
    """samples/s of the graph at one call shape, summed over `workers` one-thread processes (on `cpus` when given)."""
    return _rate_together(_graph_worker, (model_dir, batch, length), workers, seconds, 3, cpus)


def bare_graph(model_dir: str, workers: int, seconds: float, rounds: int, cpus: set[int] | None = None) -> dict:
    """samples/s summed over `workers` one-thread processes (on `cpus`, the server's, when given), per (batch, T),
    the best of `rounds` sweeps (a shared machine's speed drifts over a sweep: repeating it keeps one slow moment
    from deciding a shape); the best shape."""
    table: dict[str, float] = {}
    shapes = [(b, t) for b in BATCHES for t in LENGTHS if b * t <= MAX_CALL_SAMPLES]
    for batch, length in [shape for _ in range(rounds) for shape in shapes]:
        rate = graph_rate(model_dir, batch, length, workers, seconds, cpus)
        table[f"{batch}x{length}"] = max(rate, table.get(f"{batch}x{length}", 0.0))
        print(f"bare graph {batch:>3} rows x {length:>4} samples: {rate:,.0f} samples/s", flush=True)
    best = max(table, key=table.get)
    return {"samples_per_s": table[best], "best_shape": best, "table": table}


def bare_graph_again(model_dir: str, workers: int, shape: str, seconds: float, rounds: int,
                     cpus: set[int] | None) -> float:
    """The bare graph at its best shape once more, the best of `rounds`: taken between the load tests, so that each
    capacity is compared with the graph as fast as the machine was around it (a shared machine's graph speed moved
    2x within the hour on 2026-12-07: `docs/performance.md`)."""
    batch, length = map(int, shape.split("x"))
    rate = max(graph_rate(model_dir, batch, length, workers, seconds, cpus) for _ in range(rounds))
    print(f"bare graph {shape} again: {rate:,.0f} samples/s", flush=True)
    return rate


def _batcher_worker(model_dir: str, streams: int, on_loop: bool, seconds: float, start, queue, cpus) -> None:
    """`streams` sessions driven straight into a `Batcher` in this process, no sockets: every round feeds each one
    hop and waits for each one's prediction, as fast as the batcher goes (its calls on the event loop's thread with
    `on_loop`, as the server's workers make them on these cores)."""
    _one_thread_on(cpus)
    sys.path.insert(0, str(REPO_ROOT))
    import asyncio

    from msssm_serve.runtime import OnnxModel, Stream
    from server.batcher import Batcher
    from server.metrics import Metrics

    model = OnnxModel(model_dir, threads=1)
    hop = np.random.default_rng(0).normal(0, 0.3, (model.default_hop, model.n_channels)).astype(np.float32)

    async def rounds() -> float:
        # never waits: every round brings every stream
        batcher = Batcher(model, Metrics(), batch_wait_ms=0, streams_on_loop=on_loop)
        batcher.start()
        outboxes = [asyncio.Queue() for _ in range(streams)]
        sessions = [batcher.open(Stream(model, hop=model.default_hop), box) for box in outboxes]

        async def one_round() -> None:
            for session in sessions:
                await session.feed(hop, stall_timeout_s=60)
            for session, box in zip(sessions, outboxes):
                await box.get()
                session.message_sent()

        await one_round()  # warm-up
        start.wait()
        t0, samples = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            await one_round()
            samples += streams * len(hop)
        rate = samples / (time.perf_counter() - t0)
        await batcher.stop()
        return rate

    queue.put(asyncio.run(rounds()))


def batcher_path(model_dir: str, workers: int, streams: int, seconds: float, cpus: set[int] | None = None) -> float:
    """samples/s summed over `workers` processes (on `cpus` when given), each driving its share of `streams` through
    the server's batcher with no sockets (`_batcher_worker`): what the server's own per-stream work leaves of the bare
    graph at full load, before any network."""
    sys.path.insert(0, str(REPO_ROOT))
    from server.settings import streams_on_loop_for

    on_loop = streams_on_loop_for(1)  # one-thread workers, as `python -m server` makes them on fewer than 3 cores each
    # (5 s: every process loaded and its streams open before the clock starts)
    rate = _rate_together(_batcher_worker, (model_dir, max(16, streams // workers), on_loop), workers, seconds, 5,
                          cpus)
    print(f"batcher path, {streams} streams, no sockets: {rate:,.0f} samples/s", flush=True)
    return rate


def load_test(extra: list[str], result: str) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "loadtest" / "streams.py"), *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return json.loads((LOADTEST / result).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "default"))
    parser.add_argument("--workers", type=int, default=2, help="server workers, and bare-graph processes")
    parser.add_argument("--server-cpus", type=cpu_list, default=None,
                        help="CPUs the server and the bare graph run on, e.g. 0 (default: any, shared with the load "
                             "generator)")
    parser.add_argument("--loadgen-cpus", type=cpu_list, default=None,
                        help="CPUs the load generator runs on, e.g. 1 (default: any)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per load-test step")
    parser.add_argument("--shape-seconds", type=float, default=3.0, help="bare graph: seconds per call shape")
    parser.add_argument("--rounds", type=int, default=2, help="bare graph: sweeps, each shape's best kept")
    parser.add_argument("--steps", default="300,400,500,600,700,800")
    parser.add_argument("--gateway-steps", default=None, help="stream counts for the /gateway search (default: --steps)")
    parser.add_argument("--per-connection", type=int, default=100, help="streams per /gateway connection")
    parser.add_argument("--rates", default="20,40,60,80,100,120")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if args.server_cpus and args.workers > len(args.server_cpus):
        parser.error(f"--workers {args.workers} on {len(args.server_cpus)} server CPU(s): one-thread workers share "
                     "cores, and the bare graph's processes would too")
    pinned = bool(args.server_cpus)
    tag = "_pinned" if pinned else ""
    started = time.time()
    bare = bare_graph(args.model, args.workers, args.shape_seconds, args.rounds, args.server_cpus)
    common = ["--model", args.model, "--workers", str(args.workers), "--duration", str(args.duration),
              "--tag", f"_efficiency{tag}"]
    common += cpu_flags(args)

    def graph_now() -> float:
        return bare_graph_again(args.model, args.workers, bare["best_shape"], args.shape_seconds, args.rounds,
                                args.server_cpus)

    # the graph measured again after each load test: each capacity also against the graph around it
    around = [bare["samples_per_s"]]
    streams = load_test([*common, "--steps", args.steps], f"streams_w{args.workers}_efficiency{tag}.json")
    around.append(graph_now())
    gateway = load_test([*common, "--steps", args.gateway_steps or args.steps, "--per-connection",
                         str(args.per_connection)],
                        f"streams_w{args.workers}_gateway{args.per_connection}_efficiency{tag}.json")
    around.append(graph_now())
    classify = load_test([*common, "--classify", "--binary", "--rates", args.rates],
                         f"classify_w{args.workers}_binary_efficiency{tag}.json")
    around.append(graph_now())
    bare["around_load_tests"] = around
    # the same streams (or the highest step tried, when none passed) through the batcher alone
    path = batcher_path(args.model, args.workers, streams["capacity_streams"] or int(args.steps.split(",")[0]),
                        args.shape_seconds * 3, args.server_cpus)
    stream_rate = (streams["capacity_streams"] or 0) * 100.0
    gateway_rate = (gateway["capacity_streams"] or 0) * 100.0
    classify_rate = (classify["capacity_windows_per_s"] or 0) * 1000.0
    best = bare["samples_per_s"]

    def served(rate: float, test: int) -> dict:
        """A capacity's efficiency against the best bare graph of the run, and against the graph measured right
        before and right after its load test (the mean of the two: the machine's speed around it)."""
        nearby = (around[test] + around[test + 1]) / 2
        return {"samples_per_s": rate, "efficiency": rate / best, "bare_graph_around": nearby,
                "efficiency_around": rate / nearby}

    result = {"model": os.path.relpath(args.model, REPO_ROOT), "workers": args.workers, "bare_graph": bare,
              "server_cpus": sorted(args.server_cpus or []), "loadgen_cpus": sorted(args.loadgen_cpus or []),
              "streams": {"capacity": streams["capacity_streams"], **served(stream_rate, 0)},
              "gateway_streams": {"per_connection": args.per_connection, "capacity": gateway["capacity_streams"],
                                  **served(gateway_rate, 1)},
              "batcher_path": {"samples_per_s": path, "of_bare_graph": path / best},
              "classify": {"windows_per_s": classify["capacity_windows_per_s"], **served(classify_rate, 2)},
              "wall_seconds": time.time() - started, "cpus": os.cpu_count()}
    flags = " ".join(f"--{k.replace('_', '-')} {cpu_text(v) if isinstance(v, set) else v}"
                     for k, v in vars(args).items()
                     if k not in ("write_readme", "workers") and v != parser.get_default(k))
    where = (f"the server and the bare graph on CPU {cpu_text(args.server_cpus)}, the load "
             f"generator on CPU {cpu_text(args.loadgen_cpus or [])}" if pinned
             else f"{os.cpu_count()} cores shared with the load generator")
    text = (f"Serving efficiency{', server alone' if pinned else ''} (`python benchmarks/efficiency.py "
            f"--workers {args.workers}"
            f"{' ' + flags if flags else ''}`, "
            f"{time.strftime('%Y-%m-%d')}, {where}): bare graph "
            f"**{bare['samples_per_s']:,.0f} samples/s** ({args.workers} one-thread process"
            f"{'es' if args.workers > 1 else ''}, best shape {bare['best_shape']}; measured again after each load "
            f"test: {', '.join(f'{r:,.0f}' for r in around[1:])}); streams "
            f"**{streams['capacity_streams']}** × 100 Hz = {stream_rate:,.0f} samples/s, "
            f"**efficiency {result['streams']['efficiency']:.2f}** ({result['streams']['efficiency_around']:.2f} "
            f"against the graph around its test); over /gateway ({args.per_connection} streams per "
            f"connection) **{gateway['capacity_streams']}** = {gateway_rate:,.0f} samples/s, "
            f"**efficiency {result['gateway_streams']['efficiency']:.2f}** "
            f"({result['gateway_streams']['efficiency_around']:.2f}; the same streams through the batcher "
            f"alone, no sockets, at full load: {path:,.0f} samples/s, {result['batcher_path']['of_bare_graph']:.2f}); "
            f"/classify "
            f"**{classify['capacity_windows_per_s']:g} windows/s** = {classify_rate:,.0f} samples/s, "
            f"**efficiency {result['classify']['efficiency']:.2f}** ({result['classify']['efficiency_around']:.2f}).")
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"efficiency{tag}.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {shape} | {rate:,.0f} |" for shape, rate in bare["table"].items())
    (RESULTS / f"efficiency{tag}.md").write_text(f"# Serving efficiency\n\n{text}\n\n| bare graph, rows x samples "
                                                 f"per call | samples/s |\n|---|---|\n{rows}\n")
    if args.write_readme:
        marker = f"efficiency{tag.replace('_', '-')}"
        readme = REPO_ROOT / "README.md"
        body = readme.read_text()
        if f"<!-- {marker} -->" not in body:
            raise SystemExit(f"README.md has no <!-- {marker} --> markers")
        readme.write_text(re.sub(rf"<!-- {marker} -->.*?<!-- /{marker} -->",
                                 lambda _: f"<!-- {marker} -->{text}<!-- /{marker} -->", body, flags=re.S))


if __name__ == "__main__":
    main()
