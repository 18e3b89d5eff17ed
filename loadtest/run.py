"""One-command locust run: start the server, run locust headless against it, sample server CPU/RSS, summarise.

    PYTHONPATH=. python loadtest/run.py --model models/default --users 20 --spawn-rate 5 --duration 30s \
        [--workers 1] [--user-class ClassifyUser|StreamUser]

Writes loadtest/results/locust_<class>_u<users>_w<workers>.{json,md} (requests/s, p50/p95/p99 per request name,
failures, server CPU% and RSS) next to locust's own CSVs (…_stats.csv, …_failures.csv, …_stats_history.csv).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from streams import (REPO_ROOT, RESULTS_DIR, Sampler, Server, environment, pin_load_generator, server_arguments,
    write_results)


def parse_duration(text: str) -> float:
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def num(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main(argv=None) -> int:
    p = server_arguments(__doc__)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--spawn-rate", type=float, default=5)
    p.add_argument("--duration", default="30s", help="locust -t, e.g. 30s, 2m")
    p.add_argument("--user-class", default="", help="ClassifyUser or StreamUser (default: both)")
    args = p.parse_args(argv)
    pin_load_generator(args)

    tag = f"locust_{args.user_class or 'all'}_u{args.users}_w{args.workers}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    prefix = RESULTS_DIR / tag
    server = Server(args.model, args.workers, log_name=f"{tag}-server", cpus=args.server_cpus)
    sampler = Sampler(server)
    print(f"server pid {server.process.pid} at {server.url} (workers {args.workers})", flush=True)
    locust_bin = Path(sys.executable).with_name("locust")
    cmd = [str(locust_bin) if locust_bin.exists() else "locust", "-f", str(REPO_ROOT / "loadtest/locustfile.py"),
           "--headless", "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
           "--host", server.url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5"]
    if args.user_class:
        cmd.append(args.user_class)
    try:
        t0 = time.monotonic()
        log = open(RESULTS_DIR / f"{tag}-locust.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            sampler.add_client(proc.pid)
        except Exception:
            pass
        rc = proc.wait(timeout=parse_duration(args.duration) + 120)
        t1 = time.monotonic()
        log.close()
    finally:
        sampler.stop()
        server.stop()

    rows = []
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            rows.append({"type": row["Type"], "name": row["Name"], "requests": int(row["Request Count"]),
                         "failures": int(row["Failure Count"]), "requests_per_s": num(row["Requests/s"]),
                         "failures_per_s": num(row["Failures/s"]), "avg_ms": num(row["Average Response Time"]),
                         "p50_ms": num(row["50%"]), "p95_ms": num(row["95%"]), "p99_ms": num(row["99%"]),
                         "max_ms": num(row["Max Response Time"])})
    # whole run minus the first ~5 s of start-up/spawning
    res = sampler.window(t0 + min(5.0, (t1 - t0) / 4), t1)
    data = {"mode": "locust", "model": str(args.model), "workers": args.workers, "users": args.users,
            "spawn_rate": args.spawn_rate, "duration": args.duration, "user_class": args.user_class or "all",
            "locust_exit_code": rc, "locust_command": " ".join(cmd), "stats": rows,
            "server": {k: v for k, v in res.items() if k.startswith("server")},
            "loadgen_cpu_pct": res.get("loadgen_cpu_pct"),
            "machine_cpu_pct_of_all_cores": res.get("machine_cpu_pct_of_all_cores"), "environment": environment()}
    md = [f"# Locust: {args.user_class or 'all users'}, {args.users} users, {args.duration}, workers={args.workers}\n",
          f"Model `{args.model}`. Server CPU {res.get('server_cpu_pct')} % (200 % = both cores), "
          f"RSS max {res.get('server_rss_mb_max')} MB; locust CPU {res.get('loadgen_cpu_pct')} %; "
          f"machine {res.get('machine_cpu_pct_of_all_cores')} % of all cores.\n",
          "| type | name | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['type']} | {r['name']} | {r['requests']} | {r['failures']} | {r['requests_per_s']:.1f} | "
                  f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    jp, mp = write_results(tag, data, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {jp} {mp}")
    return 0 if rc in (0, 1) else rc


if __name__ == "__main__":
    sys.exit(main())
