"""Capacity search without locust: how many real-time ECG streams (or /classify windows per second) one server takes.

    PYTHONPATH=. python loadtest/streams.py --model models/default [--workers 1] [--duration 30]
    PYTHONPATH=. python loadtest/streams.py --classify --model models/default [--workers 1] [--duration 30]
    PYTHONPATH=. python loadtest/streams.py --model models/rhythm --sample-rate 360 --leads II,V1   # a Holter's stream

Stream mode: one asyncio process runs N `websockets` clients. Each sends 25-sample binary float32 frames (one hop) at
the real rate (100 Hz, i.e. a frame every 250 ms) taken from the PTB-XL fixture records (tiled, random start phase in
both the data and the send schedule), and measures the hop-update latency: time from sending the frame that completes
a hop to receiving that hop's prediction. For each N in a step search (then a bisection between the last pass and the
first fail) it runs a warm-up, then `--duration` seconds of measurement, and records p50/p95/p99, failures (errors,
closes, predictions missing), server CPU/RSS (server + worker processes) and the load generator's own pacing lag and CPU.
A step passes when p99 < 100 ms, there are no failures and the generator kept its pacing (send-lag p99 < 50 ms).

Device mode (`--sample-rate`, `--leads`): the same records resampled to the device's rate (scipy's resample_poly) and
cut to the named leads, sent in frames of one hop at that rate (90 samples at 360 Hz); the server resamples them back.
A hop's latency then runs from the frame after which the server's resampler holds the hop's last model-rate sample
(its delay included: the config reply's `resampler_delay_s`), so it measures the server, not the filter's delay.

Classify mode: open-loop POST /classify of real 10 s windows (JSON bodies per the contract, encoded once) at fixed
rates; a rate passes when p99 < 200 ms with no failures and the generator kept its schedule.

This module also holds the helpers run.py and long_stream.py share (records, server process, CPU/RSS sampler).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from msssm_serve.resample import WindowResampler
from msssm_serve.server.launcher import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
RECORDS_DIR = REPO_ROOT / "tests" / "fixtures" / "ptbxl" / "records100"
DEFAULT_MODEL = REPO_ROOT / "models" / "default"
SAMPLE_RATE = 100
PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]  # the records' columns


# ----------------------------------------------------------------------------------------------------------------- helpers
def load_records(limit: int | None = None) -> np.ndarray:
    """Real ECG records [n, 1000, 12] float32 (10 s at 100 Hz, mV) from the PTB-XL fixture."""
    import wfdb

    paths = sorted(RECORDS_DIR.glob("*/*.hea"))[:limit]
    if not paths:
        raise SystemExit(f"no records under {RECORDS_DIR}")
    recs = [wfdb.rdsamp(str(p.with_suffix("")))[0] for p in paths]
    n = min(len(r) for r in recs)
    arr = np.stack([r[:n] for r in recs]).astype(np.float32)
    return np.nan_to_num(arr)


def tiled_records(records_per_signal: int = 6) -> list[np.ndarray]:
    """One long signal [records_per_signal x 1000, 12] per fixture record: it and the records after it, end to end,
    so that a stream can run for minutes on real ECG from any start (what every load test's clients send)."""
    signals = load_records()
    return [np.concatenate([signals[(i + j) % len(signals)] for j in range(records_per_signal)])
            for i in range(len(signals))]


def pct(values, q) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def step_up(values, passes, deadline: float):
    """Try `values` in order until one fails or the monotonic `deadline` passes -> (last passing, first failing);
    None where there is none."""
    last_pass = first_fail = None
    for value in values:
        if passes(value):
            last_pass = value
        else:
            first_fail = value
            break
        if time.monotonic() > deadline:
            break
    return last_pass, first_fail


def latency_summary(ms: list[float]) -> dict:
    return {"count": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99),
            "max_ms": float(max(ms)) if ms else None, "mean_ms": float(np.mean(ms)) if ms else None}


class Server(LocalServer):
    """`python -m server` on a free loopback port (see server/launcher.py), watched with psutil."""

    def __init__(self, model: str | Path, workers: int = 1, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, log_name: str = "server", cpus: set[int] | None = None):
        import httpx

        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        super().__init__(model, RESULTS_DIR / f"{log_name}.log", workers, extra, env, cpus=cpus)
        self.ps = psutil.Process(self.process.pid)
        # uvicorn with --workers > 1 forks its workers right away; give them a moment to be ready too
        if workers > 1:
            time.sleep(3)
        self.model_info = httpx.get(self.url + "/model", timeout=5).json()

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return []

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs()]


def tree_cpu_rss(procs: list[psutil.Process]) -> tuple[float, int]:
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
        except psutil.Error:
            pass
    return cpu, rss


class Sampler:
    """Samples server (process tree) CPU% and RSS every `interval` s in a thread; `window()` summarises a span.

    CPU% is process CPU seconds / wall seconds * 100 (200 % = both cores of this machine). Also samples this process
    (the load generator) and the whole machine, so contention (e.g. a training job) shows."""

    def __init__(self, server: Server, interval: float = 0.5, client_pids: list[int] | None = None):
        self.server, self.interval = server, interval
        self.client = [psutil.Process(pid) for pid in (client_pids or [os.getpid()])]
        self.samples: list[tuple[float, float, int, float, float]] = []  # t, server cpu s, rss, client cpu s, machine%
        self.per_process: list[tuple[float, dict[int, float]]] = []  # t, server pid -> cpu s (workers' balance)
        self._stop = threading.Event()
        psutil.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add_client(self, pid: int) -> None:
        self.client.append(psutil.Process(pid))

    def _sample(self) -> None:
        procs = self.server.procs()
        per_process = {p.pid: tree_cpu_rss([p]) for p in procs}  # each process read once: (cpu s, rss)
        cpu, rss = sum(c for c, _ in per_process.values()), sum(r for _, r in per_process.values())
        self.per_process.append((time.monotonic(), {pid: c for pid, (c, _) in per_process.items()}))
        server_pids = set(per_process) | {self.server.process.pid}
        ccpu, _ = tree_cpu_rss([q for p in self.client for q in self._tree(p) if q.pid not in server_pids])
        self.samples.append((time.monotonic(), cpu, rss, ccpu, psutil.cpu_percent(None)))

    @staticmethod
    def _tree(p: psutil.Process) -> list[psutil.Process]:
        try:
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def window(self, t0: float, t1: float) -> dict:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(s) < 2:
            return {}
        wall = s[-1][0] - s[0][0]
        return {"server_cpu_pct": round(100 * (s[-1][1] - s[0][1]) / wall, 1),
                "server_rss_mb_max": round(max(x[2] for x in s) / 2**20, 1),
                "server_rss_mb_end": round(s[-1][2] / 2**20, 1),
                "loadgen_cpu_pct": round(100 * (s[-1][3] - s[0][3]) / wall, 1),
                "machine_cpu_pct_of_all_cores": round(float(np.mean([x[4] for x in s[1:]])), 1),
                "server_process_cpu_pct": self._per_process(t0, t1)}

    def _per_process(self, t0: float, t1: float) -> list[float]:
        """Each server process's CPU % over the span, busiest first: how evenly the workers share the streams."""
        s = [x for x in self.per_process if t0 <= x[0] <= t1]
        if len(s) < 2:
            return []
        wall = s[-1][0] - s[0][0]
        first, last = s[0][1], s[-1][1]
        return sorted((round(100 * (last[pid] - first[pid]) / wall, 1) for pid in last if pid in first), reverse=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def server_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every load test shares: which model directory the server under test loads, and how many
    uvicorn worker processes it runs."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--server-cpus", type=cpu_list, default=None,
                   help="CPU numbers the server may run on, e.g. 0 (default: any); see --loadgen-cpus")
    p.add_argument("--loadgen-cpus", type=cpu_list, default=None,
                   help="CPU numbers this load generator may run on, e.g. 1 (default: any). Apart from the "
                        "server's, the generator's work is not taken from the server's cores, as with clients on "
                        "other machines")
    return p


def cpu_list(text: str) -> set[int]:
    """'0,2-3' -> {0, 2, 3}."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_text(cpus) -> str:
    """{0, 2, 3} -> '0,2,3' (what cpu_list reads back)."""
    return ",".join(map(str, sorted(cpus)))


def cpu_flags(args) -> list[str]:
    """The --server-cpus / --loadgen-cpus flags given, as arguments for another load test or a report's command."""
    return [part for flag in ("server_cpus", "loadgen_cpus") if getattr(args, flag)
            for part in (f"--{flag.replace('_', '-')}", cpu_text(getattr(args, flag)))]


def pin_load_generator(args) -> None:
    """Keep this process (and the server it starts, unless --server-cpus says otherwise) on --loadgen-cpus."""
    if args.loadgen_cpus:
        os.sched_setaffinity(0, args.loadgen_cpus)


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jp, mp = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    jp.write_text(json.dumps(data, indent=2) + "\n")
    mp.write_text(markdown)
    return jp, mp


def environment() -> dict:
    return {"cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
            "cores": os.cpu_count()}


def fmt(v, nd=1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


# ---------------------------------------------------------------------------------------------------------- stream mode
async def close_quietly(ws) -> None:
    """Close a client connection if there is one, whatever state it is in (the run is over for it)."""
    if ws is not None:
        try:
            await asyncio.wait_for(ws.close(), 5)
        except Exception:
            pass


async def paced(run: "StreamRun", period: float, phase: float):
    """Once every client is connected: yield the loop time every `period` s from the run's start + `phase` until the
    run stops sending, recording how late each tick came (the generator's pacing) while measuring."""
    await run.all_connected.wait()
    loop = asyncio.get_running_loop()
    t_next = run.t_start + phase
    while not run.stop_sending:
        delay = t_next - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time()
        if run.measuring(now):
            run.lag_ms.append((now - t_next) * 1000)
        yield now
        t_next += period


class HopCounter:
    """Which predictions (window, t) a stream's server can make once it holds a given number of device samples:
    the hops whose last model-rate sample its resampler has given out (`msssm_serve.resample` counts them)."""

    def __init__(self, window: int, hop: int, device_rate: float, model_rate: int):
        self.window, self.hop = window, hop
        self.resampler = WindowResampler(device_rate, model_rate, window, 1)

    @classmethod
    def from_config(cls, reply: dict, device_rate: float) -> HopCounter:
        """For the stream a config reply describes."""
        return cls(int(reply["window"]), int(reply["hop"]), device_rate, int(reply["sample_rate"]))

    def available(self, n_device: int) -> tuple[int, int]:
        """(window k, model samples of window k out) after n_device device samples of the stream."""
        rs = self.resampler
        k, n_in = divmod(n_device, rs.device_window)
        if rs.identity:
            return k, n_in
        return k, max(0, min(self.window, (n_in * rs.up - 1 - rs.delay) // rs.down + 1)) if n_in else 0

    def completed(self, before: int, after: int) -> list[tuple[int, int]]:
        """Predictions that the device samples before..after complete: hop points and window ends."""
        (k0, m0), (k1, m1) = self.available(before), self.available(after)
        keys = []
        for k in range(k0, k1 + 1):
            lo = m0 if k == k0 else 0
            hi = m1 if k == k1 else self.window
            keys += [(k, t) for t in range((lo // self.hop + 1) * self.hop, hi + 1, self.hop) if t < self.window]
            if k < k1:
                keys.append((k, self.window))
        return keys


class Client:
    """A load-test connection: opened under the run's limit on connections being opened (`start`: False when the
    server refused it), then its sender and receiver run until the run ends; `failed` accounts for what broke it."""
    url: str
    ws = None

    async def start(self) -> bool:
        raise NotImplementedError

    def failed(self, e: Exception) -> None:
        raise NotImplementedError

    async def sender(self) -> None:
        raise NotImplementedError

    async def receiver(self) -> None:
        raise NotImplementedError

    async def main(self) -> None:
        import websockets

        try:
            async with self.run.connect_sem:
                self.ws = await websockets.connect(self.url, max_size=2**24, ping_interval=None, compression=None,
                                                   open_timeout=30)
                if not await self.start():
                    return
            recv = asyncio.create_task(self.receiver())
            try:
                await self.sender()
            finally:
                recv.cancel()
        except asyncio.CancelledError:
            pass
        except Exception as e:  # connection refused / closed / server error
            self.failed(e)
        finally:
            await close_quietly(self.ws)


class StreamClient(Client):
    """One paced real-time stream over its own /stream connection."""

    def __init__(self, run: "StreamRun", idx: int, signal: np.ndarray, offset: int):
        self.run, self.idx, self.signal, self.pos = run, idx, signal, offset
        self.url = run.ws_url
        self.sent_samples = 0
        self.pending: dict[tuple[int, int], float] = {}  # (window, t) -> send time of completing frame
        self.ws = None
        self.shed = False
        self.latency_ms: list[float] = []

    def mark_shed(self) -> None:
        """The server shed this stream for load (1013 with a retry hint): counted once, its unanswered hops dropped
        from what is expected of the server."""
        if not self.shed:
            self.shed = True
            self.run.shed += 1
            self.run.measured_keys -= {k for k in self.run.measured_keys if k[0] == self.idx}

    async def start(self) -> bool:
        r = self.run
        await self.ws.send(json.dumps(r.config))
        cfg = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        if cfg.get("type") == "error" and "retry_after_s" in cfg:
            r.refused += 1  # admission said no, with a retry hint: not a failure of an accepted stream
            return False
        if cfg.get("type") != "config":
            raise RuntimeError(f"unexpected first message {cfg}")
        self.counter = HopCounter.from_config(cfg, r.device_rate)
        r.connected += 1
        return True

    def failed(self, e: Exception) -> None:
        if getattr(getattr(e, "rcvd", None), "code", None) == 1013 and self.run.connected:  # shed for load, mid-send
            self.mark_shed()
        else:
            self.run.fail(f"{type(e).__name__}: {str(e)[:120]}")

    async def sender(self) -> None:
        r = self.run
        period = r.frame_samples / r.device_rate
        async for now in paced(r, period, random.random() * period):  # a random phase within one frame period
            if self.shed:
                break
            await self.ws.send(self.next_frame(time.perf_counter(), r.measuring(now)).tobytes())

    def next_frame(self, produced_at: float, measuring: bool) -> np.ndarray:
        """The device's next frame from the tiled signal; the hops it completes (model-rate samples the server's
        resampler can give out after it) are expected, timed from `produced_at` (perf_counter)."""
        r, F, n = self.run, self.run.frame_samples, len(self.signal)
        if self.pos + F <= n:
            frame = self.signal[self.pos:self.pos + F]
        else:
            frame = np.concatenate([self.signal[self.pos:], self.signal[:F - (n - self.pos)]])
        self.pos = (self.pos + F) % n
        before, after = self.sent_samples, self.sent_samples + F
        for key in self.counter.completed(before, after):
            self.pending[key] = produced_at
            if measuring:
                r.expected += 1
                r.measured_keys.add((self.idx, key))
        if measuring:
            r.frames_measured += 1
        self.sent_samples = after
        return frame

    def on_prediction(self, m: dict) -> None:
        r = self.run
        key = (m["window"], m["t"])
        t0 = self.pending.pop(key, None)
        if t0 is not None and (self.idx, key) in r.measured_keys:
            r.measured_keys.discard((self.idx, key))
            r.latency_ms.append((time.perf_counter() - t0) * 1000)
            self.latency_ms.append(r.latency_ms[-1])

    async def receiver(self) -> None:
        r = self.run
        async for msg in self.ws:
            if isinstance(msg, bytes):
                continue
            m = json.loads(msg)
            typ = m.get("type")
            if typ == "prediction":
                self.on_prediction(m)
            elif typ == "error" and "retry_after_s" in m:  # shed for load: its missing hops are not failures
                self.mark_shed()
                return
            elif typ == "error":
                r.fail(f"error message: {m.get('detail')}")
        if not self.run.stop_sending and not self.shed:
            r.fail(f"closed by server: {self.ws.close_code} {self.ws.close_reason}")


class GatewayClient(Client):
    """Several paced real-time streams over one /gateway connection, as a gateway forwarding a ward's devices would:
    each device produces a frame per period on its own random phase; every `tick_s` the gateway sends what its
    devices produced since its last send as one binary message, and it reads the server's batched messages. A hop's
    latency runs from when its device produced the completing frame, so the gateway's forwarding delay counts."""

    def __init__(self, run: "StreamRun", streams: list[StreamClient], tick_s: float):
        self.run, self.streams, self.tick_s = run, streams, tick_s
        self.url = run.gateway_url
        self.open: list[StreamClient] = []  # streams the server took

    async def start(self) -> bool:
        r = self.run
        for s in self.streams:
            await self.ws.send(json.dumps({"type": "open", "id": s.idx, **r.config}))
        waiting = {s.idx: s for s in self.streams}
        while waiting:
            for m in json.loads(await asyncio.wait_for(self.ws.recv(), 30))["messages"]:
                s = waiting.pop(m["id"])
                if m["type"] == "config":
                    s.counter = HopCounter.from_config(m, r.device_rate)
                    self.open.append(s)
                    r.connected += 1
                elif m["type"] == "closed" and "retry_after_s" in m:
                    r.refused += 1  # admission said no, with a retry hint
                else:
                    raise RuntimeError(f"unexpected first message {m}")
        return True

    def failed(self, e: Exception) -> None:
        for _ in range(max(1, len(self.streams) - len(self.open))):  # every stream it had not opened yet
            self.run.fail(f"gateway {type(e).__name__}: {str(e)[:120]}")

    async def sender(self) -> None:
        from msssm_serve.client import gateway_frames

        r = self.run
        period = r.frame_samples / r.device_rate
        phases = {s: random.random() * period for s in self.open}  # each device's own
        due: dict[StreamClient, float] = {}
        async for now in paced(r, self.tick_s, random.random() * self.tick_s):
            due = due or {s: r.t_start + phases[s] for s in self.open}
            clock = time.perf_counter()
            frames = {}
            for s in self.open:
                while not s.shed and due[s] <= now:  # what the device produced since the last send
                    frame = s.next_frame(clock - (now - due[s]), r.measuring(due[s]))
                    frames[s.idx] = np.concatenate([frames[s.idx], frame]) if s.idx in frames else frame
                    due[s] += period
            if frames:
                await self.ws.send(gateway_frames(frames))

    async def receiver(self) -> None:
        r = self.run
        by_id = {s.idx: s for s in self.open}
        async for text in self.ws:
            for m in json.loads(text)["messages"]:
                s, typ = by_id[m["id"]], m["type"]
                if typ == "prediction":
                    s.on_prediction(m)
                elif typ == "closed" and "retry_after_s" in m:  # shed for load: its missing hops are not failures
                    s.mark_shed()
                elif typ in ("closed", "error"):
                    r.fail(f"{typ} message: {m.get('detail')}")
        if not r.stop_sending:
            r.fail(f"gateway closed by server: {self.ws.close_code} {self.ws.close_reason}")


class StreamRun:
    def __init__(self, ws_url: str, n: int, frame_samples: int, config: dict, device_rate: float, warmup: float,
                 duration: float, per_connection: int = 1, tick_s: float = 0.02):
        """`per_connection` > 1: the streams go in groups of that many over /gateway connections (`GatewayClient`,
        sending every `tick_s`); 1: each over its own /stream connection."""
        self.ws_url, self.n, self.frame_samples, self.config = ws_url, n, frame_samples, config
        self.gateway_url = ws_url.rsplit("/", 1)[0] + "/gateway"
        self.per_connection, self.tick_s = per_connection, tick_s
        self.frames_measured = 0
        self.device_rate = device_rate
        self.warmup, self.duration = warmup, duration
        self.latency_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.failures: dict[str, int] = {}
        self.expected = 0
        self.measured_keys: set = set()
        self.connected = 0
        self.refused = self.shed = 0  # refused at admission / shed later, each with a retry hint
        self.stop_sending = False
        self.t_start = 0.0
        self.t_measure0 = self.t_measure1 = float("inf")

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def measuring(self, now: float) -> bool:
        return self.t_measure0 <= now < self.t_measure1

    async def go(self, signals: list[np.ndarray], sampler: Sampler) -> dict:
        loop = asyncio.get_running_loop()
        self.connect_sem = asyncio.Semaphore(64)
        self.all_connected = asyncio.Event()
        clients = []
        for i in range(self.n):
            sig = signals[i % len(signals)]
            clients.append(StreamClient(self, i, sig, random.randrange(len(sig))))
        if self.per_connection > 1:
            groups = [clients[i : i + self.per_connection] for i in range(0, self.n, self.per_connection)]
            tasks = [asyncio.create_task(GatewayClient(self, group, self.tick_s).main()) for group in groups]
        else:
            tasks = [asyncio.create_task(c.main()) for c in clients]
        t_conn = loop.time()
        while self.connected + self.refused + sum(self.failures.values()) < self.n and loop.time() - t_conn < 120:
            await asyncio.sleep(0.05)
        connect_s = loop.time() - t_conn
        self.t_start = loop.time() + 0.1
        self.t_measure0 = self.t_start + self.warmup
        self.t_measure1 = self.t_measure0 + self.duration
        self.all_connected.set()
        await asyncio.sleep(self.t_measure0 - loop.time())
        m0 = time.monotonic()
        await asyncio.sleep(self.t_measure1 - loop.time())
        m1 = time.monotonic()
        # let the last measured hops' predictions arrive (keep sending so nothing looks idle), then stop
        await asyncio.sleep(2.0)
        self.stop_sending = True
        lost = len(self.measured_keys)
        if lost:
            self.failures["prediction missing after 2 s"] = lost
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kept = [ms for c in clients if not c.shed for ms in c.latency_ms]
        res = {"streams": self.n, "connected": self.connected, "connect_s": round(connect_s, 2),
               "refused": self.refused, "shed": self.shed, "kept_streams": self.connected - self.shed,
               "kept_p99_ms": pct(kept, 99), "kept_p50_ms": pct(kept, 50),
               "expected_hops": self.expected, "failures": sum(self.failures.values()),
               "failure_kinds": self.failures, **latency_summary(self.latency_ms),
               "send_lag_p50_ms": pct(self.lag_ms, 50), "send_lag_p99_ms": pct(self.lag_ms, 99),
               "send_lag_max_ms": float(max(self.lag_ms)) if self.lag_ms else None,
               "achieved_frames_per_s": round(self.frames_measured / self.duration, 1),
               "target_frames_per_s": round(self.n * self.device_rate / self.frame_samples, 1),
               **sampler.window(m0, m1)}
        return res


def stream_pass(r: dict, p99_limit: float, lag_limit: float) -> bool:
    """Every stream served: none refused or shed (even during the warm-up, where no latency is counted), no
    failure, p99 under the limit, and the generator kept its pacing."""
    return (r["failures"] == 0 and not r.get("refused") and not r.get("shed")
            and r["p99_ms"] is not None and r["p99_ms"] < p99_limit
            and r["send_lag_p99_ms"] is not None and r["send_lag_p99_ms"] < lag_limit)


def device_signals(signals: list[np.ndarray], sample_rate: float | None, leads: str | None) -> list[np.ndarray]:
    """The 100 Hz 12-lead records as a device would send them: resampled to `sample_rate`, cut to `leads`."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    from msssm_serve.leads import canonical

    out = signals
    if leads:
        columns = [canonical(name) for name in leads.split(",")]
        out = [s[:, [PTBXL_LEADS.index(c) for c in columns]] for s in out]
    if sample_rate and sample_rate != SAMPLE_RATE:
        ratio = (Fraction(sample_rate) / SAMPLE_RATE).limit_denominator(1000)
        out = [resample_poly(s, ratio.numerator, ratio.denominator, axis=0).astype(np.float32) for s in out]
    return out


def run_overload(args) -> None:
    """One step of `--overload N` real-time streams (say twice the capacity): how many are refused or shed, and the
    latency of those kept."""
    tiled = tiled_records()
    server = Server(args.model, args.workers, extra=["--max-streams", str(args.overload * 2)],
                    log_name=f"overload-w{args.workers}-server", cpus=args.server_cpus)
    sampler = Sampler(server)
    hop = int(server.model_info.get("default_hop", 25))
    try:
        random.seed(args.overload)
        run = StreamRun(server.ws_url, args.overload, args.frame_samples or hop, {"hop": hop}, SAMPLE_RATE,
                        args.warmup, args.duration)
        r = asyncio.run(run.go(tiled, sampler))
    finally:
        sampler.stop()
        server.stop()
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    md = [f"# Overload: {args.overload} real-time streams try to connect (workers={args.workers})\n",
          f"`python loadtest/streams.py --overload {args.overload} --workers {args.workers}`: model `{args.model}`, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s measured.\n",
          "| tried | refused at admission | shed later | kept | kept p50 ms | kept p99 ms | all p99 ms | failures |",
          "|---|---|---|---|---|---|---|---|",
          f"| {r['streams']} | {r['refused']} | {r['shed']} | {r['kept_streams']} | {fmt(r['kept_p50_ms'])} | "
          f"{fmt(r['kept_p99_ms'])} | {fmt(r['p99_ms'])} | {r['failures']} |"]
    if r["failure_kinds"]:
        md.append(f"\nFailures: `{json.dumps(r['failure_kinds'])[:400]}`")
    jp, mp = write_results(f"overload_w{args.workers}{args.tag}", {**r, "environment": environment()},
                           "\n".join(md) + "\n")
    print(f"wrote {jp} {mp}", flush=True)


def run_streams(args) -> None:
    tiled = device_signals(tiled_records(), args.sample_rate, args.leads)
    device_rate = args.sample_rate or SAMPLE_RATE
    steps = [int(x) for x in args.steps.split(",")]
    results: list[dict] = []
    server = Server(args.model, args.workers, extra=["--max-streams", str(max(steps) * 4)],
                    log_name=f"streams-w{args.workers}-server", cpus=args.server_cpus)
    sampler = Sampler(server)
    print(f"server pid {server.process.pid} on {server.port}, workers {args.workers}", flush=True)
    hop = int(server.model_info.get("default_hop", 25))
    config = {"hop": hop}
    if args.sample_rate:
        config["sample_rate"] = args.sample_rate
    if args.leads:
        config["leads"] = args.leads.split(",")
    # one hop per frame at the device rate unless told otherwise
    frame_samples = args.frame_samples or round(hop * device_rate / int(server.model_info["sample_rate"]))
    t_begin = time.monotonic()

    def one(n: int) -> dict:
        random.seed(n)
        run = StreamRun(server.ws_url, n, frame_samples, config, device_rate, args.warmup, args.duration,
                        args.per_connection, args.tick_ms / 1000)
        r = asyncio.run(run.go(tiled, sampler))
        r["pass"] = stream_pass(r, args.p99_ms, args.lag_ms)
        results.append(r)
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        time.sleep(2)  # let closed streams drain
        return r

    try:
        last_pass, first_fail = step_up(steps, lambda n: one(n)["pass"], t_begin + args.budget_s)
        last_pass = last_pass or 0
        # bisection between last pass and first fail
        while (first_fail is not None and first_fail - last_pass > max(10, last_pass // 10)
               and time.monotonic() - t_begin < args.budget_s):
            mid = (last_pass + first_fail) // 2
            if one(mid)["pass"]:
                last_pass = mid
            else:
                first_fail = mid
    finally:
        sampler.stop()
        server.stop()

    data = {"mode": "streams", "model": str(args.model), "workers": args.workers,
            "msssm_threads_env": os.environ.get("MSSSM_THREADS"), "frame_samples": frame_samples,
            "sample_rate": device_rate, "leads": config.get("leads", "all"), "hop": hop, "warmup_s": args.warmup,
            "duration_s": args.duration, "streams_per_connection": args.per_connection,
            "gateway_tick_ms": args.tick_ms if args.per_connection > 1 else None,
            "criteria": {"p99_ms_below": args.p99_ms, "failures": 0, "send_lag_p99_ms_below": args.lag_ms},
            "capacity_streams": last_pass, "first_failing_streams": first_fail,
            "capacity_note": ("no failing step found within the step list/time budget; capacity is at least this"
                              if first_fail is None else "largest N that passed; first_failing_streams failed"),
            "environment": environment(), "steps": sorted(results, key=lambda r: r["streams"])}
    md = [f"# Real-time stream capacity (workers={args.workers}"
          + (f", MSSSM_THREADS={os.environ['MSSSM_THREADS']}" if os.environ.get("MSSSM_THREADS") else "") + ")\n",
          f"Model `{args.model}`, {frame_samples}-sample binary frames at {device_rate:g} Hz "
          f"(leads {', '.join(config.get('leads', ['all']))}; hop {hop} model-rate samples), "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per step. Pass: p99 < {args.p99_ms:g} ms, no failures, "
          f"load-generator send lag p99 < {args.lag_ms:g} ms.\n",
          *([f"Streams go {args.per_connection} to a `/gateway` connection, each gateway sending what its devices "
             f"produced every {args.tick_ms:g} ms (latency counted from when the device produced the frame).\n"]
            if args.per_connection > 1 else []),
          f"**Capacity: {last_pass} streams** (first failing step: {first_fail}).\n",
          "| streams | hops/s | p50 ms | p95 ms | p99 ms | failures | send lag p99 ms | server CPU % | server RSS MB "
          "| loadgen CPU % | machine CPU % | pass |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["steps"]:
        md.append(f"| {r['streams']} | {r['count'] / args.duration:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                  f"{fmt(r['p99_ms'])} | {r['failures']} | {fmt(r['send_lag_p99_ms'])} | "
                  f"{r.get('server_cpu_pct', '–')} | {r.get('server_rss_mb_max', '–')} | "
                  f"{r.get('loadgen_cpu_pct', '–')} | {r.get('machine_cpu_pct_of_all_cores', '–')} | "
                  f"{'yes' if r['pass'] else 'no'} |")
    for r in data["steps"]:
        if r["failure_kinds"]:
            md.append(f"\nFailures at {r['streams']} streams: `{json.dumps(r['failure_kinds'])[:400]}`")
    device_tag = f"_{device_rate:g}hz_{len(config['leads'])}leads" if args.sample_rate or args.leads else ""
    gateway_tag = f"_gateway{args.per_connection}" if args.per_connection > 1 else ""
    jp, mp = write_results(f"streams_w{args.workers}{device_tag}{gateway_tag}{args.tag}", data, "\n".join(md) + "\n")
    print(f"capacity {last_pass} streams (first fail {first_fail}); wrote {jp} {mp}", flush=True)


# --------------------------------------------------------------------------------------------------------- classify mode
async def classify_rate(url: str, bodies: list[bytes], rate: float, warmup: float, duration: float,
                        path: str = "/classify", content_type: str = "application/json") -> dict:
    import httpx

    lat, lag, fails = [], [], {}
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def one(body: bytes, measured: bool) -> None:
            t0 = time.perf_counter()
            try:
                resp = await client.post(path, content=body, headers={"content-type": content_type})
                ok = resp.status_code == 200
                what = f"HTTP {resp.status_code}"
            except Exception as e:
                ok, what = False, type(e).__name__
            if measured:
                if ok:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    fails[what] = fails.get(what, 0) + 1

        tasks = []
        t_start = loop.time() + 0.05
        t_m0, t_m1 = t_start + warmup, t_start + warmup + duration
        i = 0
        while True:
            t_next = t_start + i / rate
            if t_next >= t_m1:
                break
            d = t_next - loop.time()
            if d > 0:
                await asyncio.sleep(d)
            measured = t_next >= t_m0
            if measured:
                lag.append((loop.time() - t_next) * 1000)
            tasks.append(asyncio.create_task(one(bodies[i % len(bodies)], measured)))
            i += 1
        await asyncio.gather(*tasks)
    return {"rate": rate, "sent": len(lag), "failures": sum(fails.values()), "failure_kinds": fails,
            **latency_summary(lat), "send_lag_p99_ms": pct(lag, 99),
            "achieved_rps": round(len(lat) / duration, 1)}


def run_classify(args) -> None:
    recs = load_records()
    if args.binary:  # what a device would send: float32 little-endian, time-major
        bodies = [np.ascontiguousarray(r, dtype="<f4").tobytes() for r in recs]
        post = (f"/classify?channels={recs.shape[2]}&sample_rate={SAMPLE_RATE}", "application/octet-stream")
        body_kind = "binary float32"
    else:
        bodies = [json.dumps({"signal": r.tolist(), "sample_rate": SAMPLE_RATE}).encode() for r in recs]
        post = ("/classify", "application/json")
        body_kind = "JSON"
    rates = [float(x) for x in args.rates.split(",")]
    server = Server(args.model, args.workers, log_name=f"classify-w{args.workers}-server", cpus=args.server_cpus)
    sampler = Sampler(server)
    print(f"server pid {server.process.pid} on {server.port}, workers {args.workers}", flush=True)
    results = []
    t_begin = time.monotonic()

    def passes(rate: float) -> bool:
        m0 = time.monotonic()
        r = asyncio.run(classify_rate(server.url, bodies, rate, args.warmup, args.duration, *post))
        r.update(sampler.window(m0 + args.warmup, time.monotonic()))
        r["pass"] = (r["failures"] == 0 and r["p99_ms"] is not None and r["p99_ms"] < args.classify_p99_ms
                     and r["send_lag_p99_ms"] < args.lag_ms)
        results.append(r)
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        time.sleep(2)
        return r["pass"]

    try:
        best, first_fail = step_up(rates, passes, t_begin + args.budget_s)
        best = best or 0.0
    finally:
        sampler.stop()
        server.stop()
    data = {"mode": "classify", "model": str(args.model), "workers": args.workers, "warmup_s": args.warmup,
            "duration_s": args.duration, "body": f"{body_kind}, one 10 s 12-lead window (1000 x 12) per request",
            "criteria": {"p99_ms_below": args.classify_p99_ms, "failures": 0, "send_lag_p99_ms_below": args.lag_ms},
            "capacity_windows_per_s": best, "first_failing_rate": first_fail, "environment": environment(),
            "steps": results}
    md = [f"# POST /classify capacity (workers={args.workers})\n",
          f"Model `{args.model}`, open-loop arrivals at fixed rates, one 10 s 12-lead window ({body_kind}) per request, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per rate. Pass: p99 < {args.classify_p99_ms:g} ms, "
          "no failures.\n",
          f"**Capacity: {best:g} windows/s** (first failing rate: {first_fail}).\n",
          "| rate /s | achieved /s | p50 ms | p95 ms | p99 ms | failures | server CPU % | server RSS MB | "
          "loadgen CPU % | machine CPU % | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        md.append(f"| {r['rate']:g} | {r['achieved_rps']} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                  f"{fmt(r['p99_ms'])} | {r['failures']} | {r.get('server_cpu_pct', '–')} | "
                  f"{r.get('server_rss_mb_max', '–')} | {r.get('loadgen_cpu_pct', '–')} | "
                  f"{r.get('machine_cpu_pct_of_all_cores', '–')} | {'yes' if r['pass'] else 'no'} |")
    kind = "_binary" if args.binary else ""
    jp, mp = write_results(f"classify_w{args.workers}{kind}{args.tag}", data, "\n".join(md) + "\n")
    print(f"capacity {best:g} windows/s (first fail {first_fail}); wrote {jp} {mp}", flush=True)


def main(argv=None) -> int:
    p = server_arguments(__doc__)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--classify", action="store_true", help="find the largest /classify rate instead")
    p.add_argument("--binary", action="store_true", help="classify mode: float32 bodies instead of JSON")
    p.add_argument("--steps", default="50,100,200,300,500,700,1000,1400,2000", help="stream counts to try")
    p.add_argument("--rates", default="0.5,1,2,5,10,25,50,100,150", help="/classify windows per second to try")
    p.add_argument("--frame-samples", type=int, default=int(os.environ.get("MSSSM_FRAME_SAMPLES", 0)),
                   help="samples per frame at the device rate (default: one hop, 25 at 100 Hz)")
    p.add_argument("--sample-rate", type=float, default=None, help="stream mode: the device's rate (default: 100)")
    p.add_argument("--leads", default=None, help="stream mode: the device's leads, e.g. II,V1 (default: all 12)")
    p.add_argument("--per-connection", type=int, default=1,
                   help="stream mode: streams per connection; above 1 they go over /gateway connections")
    p.add_argument("--tick-ms", type=float, default=20.0,
                   help="stream mode with --per-connection: how often a gateway sends its devices' frames")
    p.add_argument("--p99-ms", type=float, default=100.0)
    p.add_argument("--classify-p99-ms", type=float, default=200.0)
    p.add_argument("--lag-ms", type=float, default=50.0, help="load generator pacing: send-lag p99 limit")
    p.add_argument("--tag", default="", help="suffix for the result file names, e.g. _threads1")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop searching after this long")
    p.add_argument("--overload", type=int, default=0,
                   help="instead of a search: one step of this many streams (e.g. twice the capacity), reporting "
                        "those refused or shed and the latency of those kept")
    args = p.parse_args(argv)
    pin_load_generator(args)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.classify:
        run_classify(args)
    elif args.overload:
        run_overload(args)
    else:
        run_streams(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
