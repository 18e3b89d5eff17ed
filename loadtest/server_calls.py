#!/usr/bin/env python
"""The batcher's calls under a real load: how many a second, how many streams each, and what the graph costs per
sample inside the server against the bare graph at the same shape measured right after, on the same CPU.

    python loadtest/server_calls.py --streams 300 [--workers 1] [--server-cpus 0 --loadgen-cpus 1] [--duration 20]
                                    [--per-connection 100]

Runs `--streams` paced 100 Hz streams (the load test's clients, `loadtest/streams.py`) against `python -m server` and
reads the server's /metrics at the end of the warm-up and of the run: `msssm_batch_size` (streams per turn),
`msssm_inference_seconds{kind="stream"}` (time in the graph call, with the state gather and scatter around it) and
`msssm_samples_processed{kind="stream"}`. Then it times the bare graph at `--bare-rows` x hop as
`benchmarks/efficiency.py` does (`graph_rate`: one one-thread process on the server's CPUs, its state never leaving
the cache). Prints one line per figure. Streams per turn well below the call's best (`OnnxModel.rows_per_call`: 20
at hop 25) are calls too small to share the graph's cost per call; an in-server cost above the bare one is the
price of gathering each call's states from the pool's rows and writing them back. (The load test's CPU figure covers
the measured span, after any shedding: a server that shed streams is not idle for being under 100 %.)
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from streams import (REPO_ROOT, SAMPLE_RATE, Sampler, Server, StreamRun, pin_load_generator, server_arguments,
                     tiled_records)

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from efficiency import graph_rate  # noqa: E402  (the bare graph timed as the efficiency benchmark times it)


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {sample name with its labels: value}, histogram buckets left out."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if not s.name.endswith("_bucket"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return values


def main(argv=None) -> int:
    p = server_arguments(__doc__)
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--per-connection", type=int, default=1, help="streams per connection; above 1 over /gateway")
    p.add_argument("--tick-ms", type=float, default=20.0, help="with --per-connection: a gateway's sending period")
    p.add_argument("--bare-rows", type=int, default=16, help="rows of the bare graph's calls (hop samples each)")
    args = p.parse_args(argv)
    pin_load_generator(args)
    server = Server(args.model, args.workers, extra=["--max-streams", str(args.streams * 4)],
                    log_name="server-calls", cpus=args.server_cpus)
    sampler = Sampler(server)
    hop = int(server.model_info.get("default_hop", 25))
    marks: list[tuple[float, dict]] = []

    def mark_after(delay: float) -> None:
        time.sleep(delay)
        marks.append((time.monotonic(), scrape(server.url)))

    try:
        random.seed(args.streams)
        run = StreamRun(server.ws_url, args.streams, hop, {"hop": hop}, SAMPLE_RATE, args.warmup, args.duration,
                        args.per_connection, args.tick_ms / 1000)
        # the warm-up counts from the last connection; the marks fall inside the measured span
        marks_thread = threading.Thread(target=lambda: (mark_after(args.warmup + 1),
                                                        mark_after(args.duration - 2)), daemon=True)
        marks_thread.start()
        r = asyncio.run(run.go(tiled_records(), sampler))
        marks_thread.join()
    finally:
        sampler.stop()
        server.stop()
    (t0, a), (t1, b) = marks
    delta = {k: b[k] - a.get(k, 0.0) for k in b}
    span = t1 - t0
    turns, rows = delta["msssm_batch_size_count"], delta["msssm_batch_size_sum"]
    seconds = delta['msssm_inference_seconds_sum{kind="stream"}']
    samples = delta['msssm_samples_processed_total{kind="stream"}']
    bare = 1e6 / graph_rate(args.model, args.bare_rows, hop, 1, 5.0, args.server_cpus)
    over = f" over /gateway, {args.per_connection} per connection" if args.per_connection > 1 else ""
    print(f"{args.streams} streams{over}, {args.workers} worker(s): p99 {r['p99_ms']} ms, server CPU {r['server_cpu_pct']} %, "
          f"shed {r.get('shed', 0)}, failures {r['failures']}")
    print(f"turns {turns / span:.1f}/s, {rows / max(turns, 1):.1f} streams per turn, {samples / span:,.0f} samples/s")
    print(f"graph in the server {1e6 * seconds / max(samples, 1):.2f} us/sample ({seconds / span:.2f} of a core); "
          f"bare graph {args.bare_rows}x{hop} right after {bare:.2f} us/sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
