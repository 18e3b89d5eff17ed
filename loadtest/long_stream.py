"""One stream, one hour of ECG (360,000 samples at 100 Hz, real PTB-XL fixture records tiled), fed as fast as the
server takes it: does per-sample cost or server memory grow with the stream's length?

    PYTHONPATH=. python loadtest/long_stream.py --model models/default [--frame-samples 250] [--in-flight 1]

Frames of 250 samples (10 hops of 25) are sent with at most --in-flight frames unacknowledged (default 1: send, wait for
the frame's last hop prediction, send the next). Per-sample server time = frame round trip / frame samples. Compares the
first and last minute of data (goal: ratio within ±10 %) and the server's RSS (server + workers) after the first minute
and at the end (goal: growth < 5 MB). Writes loadtest/results/long_stream.{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from streams import (SAMPLE_RATE, Server, environment, fmt, load_records, pin_load_generator, server_arguments,
    tree_cpu_rss, write_results)


def rss_mb(server: Server) -> float:
    return tree_cpu_rss(server.procs())[1] / 2**20


async def feed(server: Server, signal: np.ndarray, F: int, in_flight: int, rss_marks: dict, minute: int) -> dict:
    import websockets

    frames = len(signal) // F
    done_at = [0.0] * frames
    sent_at = [0.0] * frames
    async with websockets.connect(server.ws_url, max_size=2**22, ping_interval=None, compression=None) as ws:
        await ws.send(json.dumps({"hop": 25}))
        cfg = json.loads(await ws.recv())
        W, H = int(cfg["window"]), int(cfg["hop"])
        rss_marks["connected"] = rss_mb(server)
        # cumulative number of hop predictions expected after frame i
        expected_after = [((i + 1) * F) // H for i in range(frames)]
        received = 0
        next_done = 0  # first frame not yet fully answered
        sem = asyncio.Semaphore(in_flight)
        errors: list[str] = []
        all_done = asyncio.Event()

        async def receiver():
            nonlocal received, next_done
            async for msg in ws:
                m = json.loads(msg)
                if m.get("type") == "prediction":
                    received += 1
                    while next_done < frames and received >= expected_after[next_done]:
                        done_at[next_done] = time.perf_counter()
                        next_done += 1
                        sem.release()
                    if next_done >= frames:
                        all_done.set()
                        return
                elif m.get("type") == "error":
                    errors.append(str(m.get("detail")))
            errors.append(f"closed {ws.close_code}")
            all_done.set()

        rt = asyncio.create_task(receiver())
        t0 = time.perf_counter()
        for i in range(frames):
            await sem.acquire()
            if errors:
                break
            if i == minute // F:  # first minute of data answered
                rss_marks["after_first_minute"] = rss_mb(server)
            sent_at[i] = time.perf_counter()
            await ws.send(signal[i * F:(i + 1) * F].tobytes())
        await asyncio.wait_for(all_done.wait(), 120)
        total_s = time.perf_counter() - t0
        rss_marks["end_connection_open"] = rss_mb(server)
        rt.cancel()
    return {"frames": frames, "window": W, "hop": H, "total_s": total_s, "received_predictions": received,
            "errors": errors, "sent_at": sent_at, "done_at": done_at}


def main(argv=None) -> int:
    p = server_arguments(__doc__)
    p.add_argument("--samples", type=int, default=360_000, help="default: one hour at 100 Hz")
    p.add_argument("--frame-samples", type=int, default=250)
    p.add_argument("--in-flight", type=int, default=1)
    args = p.parse_args(argv)
    pin_load_generator(args)

    recs = load_records()
    tiled = recs.reshape(-1, recs.shape[-1])
    reps = -(-args.samples // len(tiled))
    signal = np.ascontiguousarray(np.tile(tiled, (reps, 1))[:args.samples])
    F, minute = args.frame_samples, 60 * SAMPLE_RATE
    server = Server(args.model, args.workers, log_name="long_stream-server", cpus=args.server_cpus)
    rss = {"ready": rss_mb(server)}
    try:
        out = asyncio.run(feed(server, signal, F, args.in_flight, rss, minute))
        time.sleep(1)
        rss["after_close"] = rss_mb(server)
    finally:
        server.stop()

    rt = np.array(out["done_at"]) - np.array(out["sent_at"])  # frame round trips (s)
    per_sample_us = rt / F * 1e6
    nmin = minute // F
    first, last = per_sample_us[:nmin], per_sample_us[-nmin:]
    five = 5 * nmin
    ratio = float(np.median(last) / np.median(first))
    ratio5 = float(np.median(per_sample_us[-five:]) / np.median(per_sample_us[:five]))
    growth = rss["end_connection_open"] - rss["after_first_minute"]
    data = {"mode": "long_stream", "model": str(args.model), "workers": args.workers, "samples": args.samples,
            "frame_samples": F, "in_flight": args.in_flight, "window": out["window"], "hop": out["hop"],
            "total_s": round(out["total_s"], 2), "samples_per_s": round(args.samples / out["total_s"], 1),
            "realtime_factor": round(args.samples / SAMPLE_RATE / out["total_s"], 1),
            "received_predictions": out["received_predictions"], "expected_predictions": args.samples // out["hop"],
            "errors": out["errors"],
            "per_sample_us": {"first_minute_median": float(np.median(first)), "last_minute_median": float(np.median(last)),
                              "first_minute_mean": float(np.mean(first)), "last_minute_mean": float(np.mean(last)),
                              "first_5min_median": float(np.median(per_sample_us[:five])),
                              "last_5min_median": float(np.median(per_sample_us[-five:])),
                              "whole_run_median": float(np.median(per_sample_us))},
            "last_over_first_minute_ratio": round(ratio, 3), "last_over_first_5min_ratio": round(ratio5, 3),
            "ratio_goal_within_10pct": abs(ratio - 1) <= 0.10,
            "rss_mb": {k: round(v, 2) for k, v in rss.items()},
            "rss_growth_mb_first_minute_to_end": round(growth, 2), "rss_goal_below_5mb": growth < 5,
            "environment": environment()}
    ps = data["per_sample_us"]
    md = ["# One-hour stream\n",
          f"Model `{args.model}`: {args.samples} samples ({args.samples / SAMPLE_RATE / 3600:g} h at 100 Hz, real records "
          f"tiled) on one WebSocket stream in {F}-sample frames, ≤ {args.in_flight} frame in flight, hop {out['hop']}, "
          f"window {out['window']}.\n",
          f"- took {out['total_s']:.1f} s ({data['realtime_factor']}× real time); predictions "
          f"{out['received_predictions']}/{data['expected_predictions']}; errors: {out['errors'] or 'none'}",
          f"- per-sample server time (frame round trip / {F}): first minute median {fmt(ps['first_minute_median'])} µs, "
          f"last minute {fmt(ps['last_minute_median'])} µs → ratio **{ratio:.3f}** (goal ±10 %: "
          f"{'met' if data['ratio_goal_within_10pct'] else 'NOT met'}); first/last 5 min: "
          f"{fmt(ps['first_5min_median'])} / {fmt(ps['last_5min_median'])} µs (ratio {ratio5:.3f})",
          f"- server RSS: ready {rss['ready']:.1f} MB, after first minute {rss['after_first_minute']:.1f} MB, end "
          f"{rss['end_connection_open']:.1f} MB → growth **{growth:+.2f} MB** (goal < 5 MB: "
          f"{'met' if data['rss_goal_below_5mb'] else 'NOT met'}); after close {rss['after_close']:.1f} MB"]
    jp, mp = write_results("long_stream", data, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {jp} {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
