#!/usr/bin/env python
"""Where a stream server's CPU goes: real-time streams against `python -m server`, every worker sampled with py-spy.

    python loadtest/profile_streams.py [--streams 500] [--workers 2] [--duration 25] [--model models/default]

Runs `--streams` paced 100 Hz streams (the load test's clients, `loadtest/streams.py`) and, after a warm-up, records
each worker process with `py-spy record --format raw --nonblocking` and reads each thread's CPU time from /proc
before and after. A Python-level sample goes to the part of its innermost frame that belongs to a known part (the
graph, the runtime's numpy work, the batcher, the connection loops, WebSocket framing, ...) and counts 1/200 s; what
a thread's OS CPU time leaves unexplained is its C-level work: uvloop's socket I/O, timers and callbacks on the
event-loop thread, where py-spy cannot tell a wait in C from work (it samples those as `Runner.run`). Prints and
writes loadtest/results/profile_streams.md: each part's share of the workers' CPU and of one core, the top leaf
frames, and the run's latency and CPU (a profile taken while streams were shed describes a server past its capacity,
so the script says so). Needs py-spy (`pip install py-spy`), and the right to trace the workers
(root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path


from streams import (DEFAULT_MODEL, REPO_ROOT, RESULTS_DIR, SAMPLE_RATE, Sampler, Server, StreamRun, cpu_flags,
                     cpu_list, pin_load_generator, tiled_records)

RESULT = RESULTS_DIR / "profile_streams.md"
RATE_HZ = 200
# (category, pattern on "function (file:line)"), tried from the innermost frame outwards; the first part that matches
# names the sample. Order matters only within one frame.
PARTS = [
    ("onnxruntime: the graph (Session.run)", r"onnxruntime_inference_collection\.py"),
    ("runtime: batching rows, splitting results (numpy)", r"msssm_serve/runtime\.py"),
    ("frame decoding and JSON encoding (server/signals.py)", r"server/signals\.py|orjson"),
    ("stream protocol (session, lead map, resampler)", r"server/session\.py|msssm_serve/leads\.py|msssm_serve/resample"),
    ("batcher scheduling (server/batcher.py)", r"server/batcher\.py"),
    ("connection loops (server/streaming.py)", r"server/streaming\.py|server/hub\.py"),
    ("WebSocket framing (websockets, uvicorn, starlette)", r"\b(websockets|uvicorn|starlette|wsproto|httptools|h11)/"),
    ("executor hand-off (thread pool)", r"\bconcurrent/futures/|\bthreading\.py"),
    ("metrics (prometheus_client)", r"\bprometheus_client/"),
    ("asyncio event loop (selectors, callbacks, tasks)", r"\b(asyncio|uvloop)/|selectors\.py"),
]
# Leaves where py-spy cannot tell a wait from work (uvloop's epoll in C; the executor's queue wait): their samples are
# not attributed; the OS's per-thread CPU time minus what was attributed is the thread's C-level work.
WAITS = (r"Runner\.run \(.*asyncio/runners\.py", r"_worker \(.*concurrent/futures/thread\.py")
EVENT_LOOP_C = "event loop in C (uvloop: socket I/O, timers, callbacks)"
INFERENCE_OTHER = "inference thread, not in Python frames"
FRAME = re.compile(r"^(?P<func>.*) \((?P<where>[^()]*)\)$")


def classify(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost last in py-spy's raw format
        for name, pattern in PARTS:
            if re.search(pattern, frame):
                return name
    return "other"


def short(frame: str) -> str:
    """`function (path:line)` with the path cut to what names it (site-packages/... or the repository's)."""
    m = FRAME.match(frame)
    if not m:
        return frame
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", m["where"])
    where = where.replace(str(REPO_ROOT) + "/", "")
    return f"{m['func']} ({where})"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            pass
    return out


def breakdown(stacks: Counter, main_cpu: float, other_cpu: float) -> dict[str, float]:
    """CPU seconds per part. Python-level samples count at 1/RATE_HZ s each; a thread's OS CPU that they do not
    explain is its C-level work (uvloop for the event-loop thread). The inference thread is the one whose stacks run
    through the executor's worker; the event loop is the main thread."""
    parts = {"main": Counter(), "inference": Counter()}
    for stack, n in stacks.items():
        thread = "inference" if any("concurrent/futures/thread.py" in f for f in stack) else "main"
        if stack and any(re.search(w, stack[-1]) for w in WAITS):
            continue
        parts[thread][classify(list(stack))] += n / RATE_HZ
    out: dict[str, float] = {}
    for thread, os_cpu, rest in (("main", main_cpu, EVENT_LOOP_C), ("inference", other_cpu, INFERENCE_OTHER)):
        seen = sum(parts[thread].values())
        scale = min(1.0, os_cpu / seen) if seen else 1.0  # sampling jitter: never more than the OS measured
        for name, sec in parts[thread].items():
            out[name] = out.get(name, 0.0) + sec * scale
        out[rest] = out.get(rest, 0.0) + max(0.0, os_cpu - seen * scale)
    return out


def read_raw(path: Path) -> Counter:
    """py-spy's raw (collapsed) output: `frame;frame;... count` per line, outermost first."""
    stacks: Counter = Counter()
    for line in path.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            frames = [f for f in body.split(";") if not f.startswith(("thread (", "process "))]
            stacks[tuple(frames)] += int(count)
    return stacks


def profile(args, out_dir: Path) -> tuple[Counter, dict, list[int], dict[str, float]]:
    """-> (py-spy's stacks of all workers, the load run's result, the worker pids, OS CPU seconds of their
    event-loop threads ("main") and other threads ("other") over the recorded "wall" seconds)."""
    # on PATH, or beside this interpreter (a virtual environment that is not activated)
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("error: py-spy not found (pip install py-spy)")
    tiled = tiled_records()
    server = Server(args.model, args.workers, extra=["--max-streams", str(args.streams * 2)],
                    log_name="profile-server", cpus=args.server_cpus)
    sampler = Sampler(server)
    hop = int(server.model_info.get("default_hop", 25))
    # with --workers > 1 uvicorn's workers are its spawned children (beside multiprocessing's resource tracker)
    workers = ([p.pid for p in server.procs() if "spawn_main" in " ".join(p.cmdline())] if args.workers > 1
               else [server.process.pid])
    recorded: list[Path] = []
    cpu = {"main": 0.0, "other": 0.0, "wall": 0.0}

    def record() -> None:  # after the warm-up, all workers at once, for the measured span
        time.sleep(args.warmup + 1.0)
        before, t0 = {pid: thread_cpu(pid) for pid in workers}, time.monotonic()
        procs = []
        for pid in workers:
            path = out_dir / f"worker_{pid}.txt"
            recorded.append(path)
            procs.append(subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(int(args.duration) - 2), "--rate",
                 str(RATE_HZ), "--format", "raw", "--nonblocking", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                print(f"py-spy failed: {err.decode(errors='replace')[-400:]}", file=sys.stderr)
        cpu["wall"] = time.monotonic() - t0
        for pid in workers:
            after = thread_cpu(pid)
            for tid, sec in after.items():
                cpu["main" if tid == pid else "other"] += sec - before[pid].get(tid, 0.0)

    try:
        random.seed(args.streams)
        recorder = threading.Thread(target=record, daemon=True)
        run = StreamRun(server.ws_url, args.streams, hop, {"hop": hop}, SAMPLE_RATE, args.warmup, args.duration,
                        args.per_connection)
        recorder.start()
        result = asyncio.run(run.go(tiled, sampler))
        recorder.join(timeout=30)
    finally:
        sampler.stop()
        server.stop()
    stacks: Counter = Counter()
    for path in recorded:
        if path.is_file():
            stacks.update(read_raw(path))
    if not stacks:
        raise SystemExit("error: py-spy recorded nothing (is tracing allowed? run as root or set ptrace_scope 0)")
    return stacks, result, workers, cpu


def report(args, stacks: Counter, result: dict, workers: list, cpu: dict) -> str:
    total = sum(stacks.values())
    parts = breakdown(stacks, cpu["main"], cpu["other"])
    os_total = cpu["main"] + cpu["other"]
    wall = cpu["wall"] or 1.0
    leaves: Counter = Counter()
    for stack, n in stacks.items():
        leaves[short(stack[-1]) if stack else "?"] += n
    over = f", {args.per_connection} per /gateway connection" if args.per_connection > 1 else ""
    lines = [f"{len(workers)} worker(s) serving {args.streams} real-time streams (100 Hz, hop 25{over}), {wall:.1f} s: "
             f"{os_total:.1f} CPU s by the OS ({100 * os_total / wall:.0f} % of one core; event-loop threads "
             f"{100 * cpu['main'] / wall:.0f} %, inference threads {100 * cpu['other'] / wall:.0f} %)",
             f"{'share':>7}  {'% core':>6}  part"]
    lines += [f"{100 * sec / os_total:6.1f} %  {100 * sec / wall:5.1f}  {name}"
              for name, sec in sorted(parts.items(), key=lambda kv: -kv[1])]
    lines += ["", f"top leaf frames (py-spy, {total} samples at {RATE_HZ} Hz, waits included):"]
    lines += [f"{100 * n / total:5.1f} %  {frame}" for frame, n in leaves.most_common(12)]
    shed = result.get("shed", 0) or result.get("refused", 0)
    state = (f"**{shed} streams were shed or refused: the server was past its capacity, and this profile describes "
             "that.**" if shed else "None shed or refused: under capacity.")
    command = " ".join(["python loadtest/profile_streams.py", "--streams", str(args.streams), "--workers",
                        str(args.workers), "--duration", f"{args.duration:g}", *cpu_flags(args),
                        *(["--per-connection", str(args.per_connection)] if args.per_connection > 1 else [])])
    md = ["# Where a stream server's CPU goes\n",
          f"Measured {date.today().isoformat()}: `{command}` ({args.streams} paced real-time streams from "
          "`loadtest/streams.py`; every worker recorded with `py-spy record --format raw --nonblocking`, idle threads "
          "unsampled). Each Python-level sample is classified by its innermost frame that belongs to a known part "
          "and counts 1/200 s; each thread's CPU time from /proc that those samples do not explain is its C-level "
          "work (for the event-loop thread: uvloop's socket I/O, timers and callbacks, where py-spy cannot tell a "
          "wait from work).\n",
          f"The run: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, server CPU "
          f"{result.get('server_cpu_pct', '–')} % (per process {result.get('server_process_cpu_pct', '–')}), "
          f"load generator {result.get('loadgen_cpu_pct', '–')} %, machine {result.get('machine_cpu_pct_of_all_cores', '–')} "
          f"% of all cores. {state}\n",
          "```", *lines, "```", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds (py-spy records 2 s less)")
    parser.add_argument("--server-cpus", type=cpu_list, default=None, help="CPUs the server runs on, e.g. 0")
    parser.add_argument("--loadgen-cpus", type=cpu_list, default=None, help="CPUs the load generator runs on, e.g. 1")
    parser.add_argument("--per-connection", type=int, default=1,
                        help="streams per connection; above 1 they go over /gateway connections")
    args = parser.parse_args(argv)
    pin_load_generator(args)
    if args.duration < 5:
        parser.error("--duration must be at least 5 s")
    with tempfile.TemporaryDirectory(prefix="profile_streams_") as raw_dir:
        stacks, result, workers, cpu = profile(args, Path(raw_dir))
    text = report(args, stacks, result, workers, cpu)
    print(text)
    result = RESULT.with_stem(RESULT.stem + (f"_gateway{args.per_connection}" if args.per_connection > 1 else ""))
    result.write_text(text)
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
