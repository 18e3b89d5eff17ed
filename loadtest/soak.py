"""Soak: N real-time streams held open for a long time on one server. Does memory drift, does latency creep, does
anything fail?

    python loadtest/soak.py --model models/default --streams 200 --minutes 10

The streams are loadtest/streams.py's clients (25-sample binary frames every 250 ms from real PTB-XL records, per-hop
latency measured from the frame that completes a hop to its prediction), connected once and kept for the whole
run. Reports per minute: hop latency p50/p99, failures and the server's RSS; and the RSS drift from the end of the
first minute to the end (goal < 50 MB), total failures (goal 0). Writes loadtest/results/soak.{json,md}.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import numpy as np

from streams import (SAMPLE_RATE, Sampler, Server, StreamRun, environment, fmt, pin_load_generator, server_arguments,
    tiled_records, write_results)


class Timed(list):
    """A list that also remembers when each value was added (the clients append latencies as they arrive)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def append(self, value) -> None:
        super().append(value)
        self.times.append(time.monotonic())


def main(argv=None) -> int:
    p = server_arguments(__doc__)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--rss-drift-mb", type=float, default=50, help="goal: RSS growth after the first minute")
    args = p.parse_args(argv)
    pin_load_generator(args)

    tiled = tiled_records()
    server = Server(args.model, args.workers, extra=["--max-streams", str(args.streams * 2)],
                    log_name="soak-server", cpus=args.server_cpus)
    sampler = Sampler(server, interval=5)
    random.seed(0)
    hop = int(server.model_info.get("default_hop", 25))
    run = StreamRun(server.ws_url, args.streams, hop, {"hop": hop}, SAMPLE_RATE, 5, args.minutes * 60)
    run.latency_ms = Timed()
    try:
        overall = asyncio.run(run.go(tiled, sampler))
    finally:
        sampler.stop()
        server.stop()
    t0 = min(run.latency_ms.times) if run.latency_ms.times else time.monotonic()
    minutes = []
    for m in range(int(np.ceil(args.minutes))):
        a, b = t0 + 60 * m, t0 + 60 * (m + 1)
        lat = [v for v, t in zip(run.latency_ms, run.latency_ms.times) if a <= t < b]
        rss = [s[2] for s in sampler.samples if a <= s[0] < b]
        minutes.append({"minute": m + 1, "hops": len(lat),
                        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
                        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
                        "server_rss_mb": round(rss[-1] / 2**20, 1) if rss else None})
    rss_after_first = next((m["server_rss_mb"] for m in minutes if m["server_rss_mb"] is not None), None)
    rss_end = next((m["server_rss_mb"] for m in reversed(minutes) if m["server_rss_mb"] is not None), None)
    drift = None if rss_after_first is None or rss_end is None else round(rss_end - rss_after_first, 1)
    data = {"streams": args.streams, "minutes": args.minutes, "model": args.model, "workers": args.workers,
            "failures": overall["failures"], "failure_kinds": overall["failure_kinds"],
            "p50_ms": overall.get("p50_ms"), "p99_ms": overall.get("p99_ms"),
            "rss_drift_mb_after_first_minute": drift, "per_minute": minutes, "environment": environment()}
    ok = overall["failures"] == 0 and drift is not None and drift < args.rss_drift_mb
    rows = "\n".join(f"| {m['minute']} | {m['hops']} | {fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | "
                     f"{fmt(m['server_rss_mb'])} |" for m in minutes)
    markdown = (f"# Soak: {args.streams} real-time streams for {args.minutes:g} min\n\n"
                f"`python loadtest/soak.py --model {args.model} --streams {args.streams} --minutes {args.minutes:g}`\n\n"
                f"Failures: {overall['failures']}; hop latency p50 {fmt(overall.get('p50_ms'))} ms, p99 "
                f"{fmt(overall.get('p99_ms'))} ms; server RSS drift after the first minute: {fmt(drift)} MB "
                f"(goal < {args.rss_drift_mb:g}).\n\n| minute | hops | p50 ms | p99 ms | server RSS MB |\n"
                f"|---|---|---|---|---|\n{rows}\n")
    jp, mp = write_results("soak", data, markdown)
    print(markdown)
    print(f"wrote {jp} {mp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
