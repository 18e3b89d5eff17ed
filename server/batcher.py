"""Cross-stream batching: one consumer task advances every stream that has work in one onnxruntime call per
distinct segment length, so a stream's state is never advanced by two calls at once. Calls run on a single
inference thread, so the event loop never blocks on the model; or, for a worker whose graph runs on one thread
(`streams_on_loop`), streams' calls run on the event loop's thread one call's rows at a time, with the sockets served
between calls.

The batcher schedules and nothing else. Streams that have work notify it and wait in an ordered set (never scanned
whole); each turn asks every waiting `StreamSession` for its next segment (at most MAX_HOPS_PER_BATCH hops: a burst
is worked off in bounded slices, so other streams keep their latency), computes them together and hands each its
result. Every protocol rule lives in the session (`server/session.py`). `/classify` requests queue here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from msssm_serve.runtime import OnnxModel, StatePool, merge_windows

from .metrics import Metrics
from .session import StreamSession

log = logging.getLogger(__name__)

MAX_HOPS_PER_BATCH = 4  # hops a stream may advance per batch: bounds one call's latency for everyone in it
# Samples one turn computes at most (~40 ms on one core for the bundled model): streams keeping pace with real time
# go first, streams whose clients send faster than real time share the rest, oldest first, and the others wait for
# the next turn. So a client that pushes faster than real time slows itself, not everyone else.
SAMPLES_PER_TURN = 2048
# /classify windows advanced together in one call: rows share a call's fixed costs (18 vs 27 us/sample for 4 rows
# vs 1, benchmarks/runtime.py section 4), and the bound keeps a queue of requests from holding streams back for long.
MAX_CLASSIFY_WINDOWS_PER_CALL = 8
# Under load a /classify request may wait this many times `batch_wait_s` for others to share its call: a window costs
# ~15 ms alone (one core), so only a wait of several arrivals gathers any at the rates that load a core (60 windows/s:
# one every 17 ms), and its answer is allowed more time than a stream's hop (200 against 100 ms p99 in the load tests).
CLASSIFY_WAIT_FACTOR = 2.5
# Admission: the server-side latency of streams keeping real time (ready -> computed) over the last LATENCY_WINDOW_S;
# while its 95th percentile exceeds the bound, new streams and /classify requests are refused (retry after the window)
# instead of every accepted stream slowing down. Completed latencies lag a sudden load by up to the window, so how long
# the oldest real-time stream has waited so far counts too: it grows the moment the batcher falls behind.
LATENCY_WINDOW_S = 2.0
MIN_LATENCY_SAMPLES = 20
OLDEST_LOOKED_AT = 32  # ready streams looked at for the oldest real-time one (those ahead of real time are skipped)


class LatencyWindow:
    """Recent latencies (seconds) over a sliding window of time: what admission decides on."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, latency: float) -> None:
        self._samples.append((now, latency))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def p95(self, now: float) -> float | None:
        recent = [lat for t, lat in self._samples if t >= now - self.window_s]
        if len(recent) < MIN_LATENCY_SAMPLES:
            return None
        return float(np.percentile(recent, 95))


class RateWindow:
    """Samples counted over a sliding window of time: what arrives and what is computed, so that shedding knows
    whether the batcher keeps up with the arriving load."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S):
        self.window_s = window_s
        self._counts: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, now: float, n: int) -> None:
        self._counts.append((now, n))
        self._total += n
        self.total(now)  # drop what left the window, so that the window's memory stays bounded

    def total(self, now: float) -> int:
        while self._counts and self._counts[0][0] < now - self.window_s:
            self._total -= self._counts.popleft()[1]
        return self._total

    def total_since(self, now: float, since: float) -> int:
        """Samples counted from `since` on (within the window)."""
        self.total(now)
        return sum(n for t, n in self._counts if t >= since)

    def span(self, now: float) -> float:
        """Seconds the window's counts cover: the window, or less while it is filling."""
        self.total(now)
        return min(self.window_s, max(now - self._counts[0][0], 1e-3)) if self._counts else self.window_s


class ClassifyPiece(NamedTuple):
    """One queued piece of a /classify request (a long signal is several, queued together, oldest first)."""
    signal: np.ndarray
    future: asyncio.Future
    scale_weights: bool  # whether the request asked for the scale mixer's weights
    queued_at: float
    windows: int  # model windows in the piece (an empty signal counts as one: it is sent to get the model's error)
    last: bool  # the request's last piece: a request's pieces leave the queue in order, so these count the requests


@dataclass(frozen=True)
class Load:
    """The batcher's recent work, for deciding whether it falls behind (`Batcher.load`)."""
    arrived_per_s: float  # samples the streams sent
    computed_per_s: float  # samples the batcher advanced: its capacity while it is behind
    excess_backlog: float  # samples waiting beyond the normal queue, over the streams keeping real time


class Batcher:
    def __init__(self, model: OnnxModel, metrics: Metrics, batch_wait_ms: float, latency_bound_ms: float = 50.0,
                 streams_on_loop: bool = False):
        self.model = model
        # Streams' calls on the event loop's own thread, one call's rows per turn, the loop reading and writing
        # sockets between calls: for a worker whose graph runs on one thread (`streams_on_loop_for`), where a hand-off
        # to the inference thread cost a thread switch at every socket wake-up during a call (docs/performance.md:
        # one core took 280 streams instead of 220). /classify calls (up to 8 windows: far longer than a hop's
        # budget) stay on the inference thread.
        self.streams_on_loop = streams_on_loop and model.on_cpu
        self.latency_bound_s = latency_bound_ms / 1000
        self.latency = LatencyWindow()
        self.arrived, self.computed = RateWindow(), RateWindow()  # samples: does the batcher keep up?
        self.became_ready = RateWindow()  # streams becoming ready: how soon a fuller batch would form
        self.classify_arrived = RateWindow()  # /classify requests queued: how soon a fuller call would form
        # /classify requests asked for and not yet answered, and (when, how many) at each arrival: the most that were
        # outstanding together lately is the most a call can expect to gather (clients that wait for each answer
        # before the next request never bring more than themselves, and the pieces of one long request none)
        self._classify_outstanding = 0
        self._classify_peaks: deque[tuple[float, int]] = deque()
        self._timed: dict[StreamSession, float] = {}
        self.metrics = metrics
        self.batch_wait_s = batch_wait_ms / 1000
        self.sessions: set[StreamSession] = set()
        self.states = StatePool(model)  # every open stream's model state, one row each (batches gather and scatter)
        self._ready: dict[StreamSession, float] = {}  # session -> when it became ready; insertion order: oldest first
        # One thread: one inference at a time per process, all its intra-op threads on that call.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._work = asyncio.Event()
        # what a gathering wait waits for (`_gather`), checked as streams become ready and requests come in
        self._gathering: Callable[[], bool] | None = None
        self._gathered = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._classify_queue: deque[ClassifyPiece] = deque()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- what sessions and requests call ------------------------------------------------------------------------
    def open(self, stream, outbox: asyncio.Queue, model_name: str = "default") -> StreamSession:
        stream.use_pool(self.states)
        session = StreamSession(stream, self, outbox, model_name)
        self.sessions.add(session)
        return session

    def close(self, session: StreamSession) -> None:
        """Forget the stream at once; a batch it is in still completes, its result is dropped and its state row is
        given back then (the inference thread writes the row until the batch is back)."""
        self.sessions.discard(session)
        self._ready.pop(session, None)
        session.stop()
        if not session.in_flight:
            session.stream.leave_pool()

    def arrived_samples(self, n: int) -> None:
        self.arrived.add(time.monotonic(), n)

    def notify(self, session: StreamSession) -> None:
        """The session may have work. One in flight is looked at again when its result comes back."""
        if not session.in_flight and not session.gone and session not in self._ready:
            now = time.monotonic()
            self._ready[session] = now
            self.became_ready.add(now, 1)
            self._work.set()
            self._wake_if_gathered()

    async def classify(self, signal: np.ndarray, scale_weights: bool = False) -> dict:
        """`OnnxModel.classify(signal, scale_weights)`, batched by the consumer with other requests waiting at the same
        time. A long signal is queued as pieces of at most MAX_CLASSIFY_WINDOWS_PER_CALL windows, so that streams
        advance between its calls (an hour-long recording is ~360 windows: seconds of compute that would stall every
        stream)."""
        piece = MAX_CLASSIFY_WINDOWS_PER_CALL * self.model.window
        loop = asyncio.get_running_loop()
        starts = range(0, max(len(signal), 1), piece)  # an empty signal still goes in, to get the model's error
        now = time.monotonic()
        pieces = [ClassifyPiece(part, loop.create_future(), scale_weights, now,
                                windows=max(1, -(-len(part) // self.model.window)), last=start == starts[-1])
                  for start in starts for part in [signal[start : start + piece]]]
        self._classify_queue.extend(pieces)
        self.classify_arrived.add(now, 1)
        self._classify_outstanding += 1
        self._classify_peaks.append((now, self._classify_outstanding))
        self._work.set()
        self._wake_if_gathered()
        try:
            # cancelled with the request: the batcher then skips what is left
            parts = await asyncio.gather(*(p.future for p in pieces))
        finally:
            self._classify_outstanding -= 1
        return merge_windows([{**w, "start": start + w["start"]} for start, part in zip(starts, parts)
                              for w in part["windows"]])

    # --- the consumer -------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            if self._classify_queue:
                wait = self._classify_fill_wait()
                if wait > 0 and not self._ready:  # nothing else to do meanwhile
                    if await self._gather(lambda: bool(self._ready) or self._classify_fill_wait() <= 0, wait):
                        wait = self._classify_fill_wait()  # gathered, or streams came: they go first
                    else:
                        wait = 0.0  # waited the whole time: classify what is there
                if wait <= 0:
                    await self._classify_some()
                # else: the streams' turn goes first, and the queue is looked at again after it
            if not self._ready:
                continue
            await self._let_batch_fill()
            jobs = self._take_turn()
            if jobs:
                await self._advance(jobs)
                if self.streams_on_loop:
                    await asyncio.sleep(0)  # the sockets' turn: frames in, predictions out, before the next call
            if self._ready or self._classify_queue:
                self._work.set()

    async def _let_batch_fill(self) -> None:
        """Under load, wait for a fuller call: its rows share the graph's cost per call (bundled model, one core:
        1 stream x 25 samples 18 k samples/s, 16 x 25 29 k). Waits only while fewer streams are ready than a call is
        best given (`OnnxModel.rows_per_call`), at most `batch_wait_s` from when the oldest became ready, and only if
        the rate at which streams have been becoming ready brings at least one more in that time: a quiet server
        answers at once."""
        if self.batch_wait_s <= 0 or not self._ready:
            return
        oldest, since = next(iter(self._ready.items()))
        missing = min(self.model.rows_per_call(oldest.stream.hop), len(self.sessions)) - len(self._ready)
        now = time.monotonic()
        left = since + self.batch_wait_s - now
        # over the span the window has seen: a load that began a moment ago is at its rate at once (over the whole
        # window it reads low for its first seconds, and batches stay small just when a burst of streams begins)
        per_s = self.became_ready.total(now) / self.became_ready.span(now)
        if missing > 0 and left > 0 and per_s * left >= 1:
            full = len(self._ready) + missing
            await self._gather(lambda: len(self._ready) >= full, min(left, missing / per_s))

    async def _gather(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until `done()` or `timeout` s: -> whether it was done. A wait for a fuller call ends the moment the
        call is full, not when the wait estimated from the arrival rate runs out: the streams or requests it waits for
        may come sooner (under load, the frames that came in during the last call are read a few loop turns after
        it), and a fixed sleep left the core idle meanwhile (docs/performance.md)."""
        self._gathering = done
        self._gathered.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._gathered.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._gathering = None

    def _wake_if_gathered(self) -> None:
        if self._gathering is not None and self._gathering():
            self._gathered.set()

    def _classify_fill_wait(self) -> float:
        """Seconds to let /classify requests gather before the next call: its rows share the graph's cost per call
        (bundled model, one core: 1 row x 250 samples 66 k samples/s, 4 x 100 89 k; benchmarks/results/
        efficiency_pinned.md). As for streams (`_let_batch_fill`): only while fewer than MAX_CLASSIFY_WINDOWS_PER_CALL
        windows wait and fewer requests than were outstanding together over the last LATENCY_WINDOW_S (clients that send
        one request at a time are not waited for, nor the rest of a long one), at most CLASSIFY_WAIT_FACTOR x
        `batch_wait_s` from when the oldest was queued, and only if the rate at which requests arrived over that window
        brings at least one more in that time: a quiet server answers at once (the rate is taken over the whole window,
        so one request reads as a slow rate, and a sudden load is batched once it has lasted)."""
        if self.batch_wait_s <= 0 or not self._classify_queue:
            return 0.0
        queued = sum(p.windows for p in self._classify_queue)
        requests = sum(p.last for p in self._classify_queue)
        now = time.monotonic()
        while self._classify_peaks and self._classify_peaks[0][0] < now - LATENCY_WINDOW_S:
            self._classify_peaks.popleft()
        peak = max((n for _, n in self._classify_peaks), default=0)
        missing = peak - requests  # requests that may yet come to share the call
        left = self._classify_queue[0].queued_at + CLASSIFY_WAIT_FACTOR * self.batch_wait_s - now
        per_s = self.classify_arrived.total(now) / self.classify_arrived.window_s
        if queued < MAX_CLASSIFY_WINDOWS_PER_CALL and missing > 0 and left > 0 and per_s * left >= 1:
            return min(left, missing / per_s)
        return 0.0

    def overloaded(self) -> float | None:
        """The recent p95 latency (s), or the wait so far of the oldest real-time stream if longer, when it exceeds
        the admission bound; else None."""
        now = time.monotonic()
        worst = max(self.latency.p95(now) or 0.0, self._oldest_wait(now))
        return worst if worst > self.latency_bound_s else None

    def load(self, over_s: float) -> Load:
        """What the last `over_s` seconds say about keeping up: samples arrived and computed per second, and the
        samples that streams keeping real time have ready and waiting beyond what arrives within the latency bound
        (the queue every batch needs). A backlog that stays or grows is a batcher falling behind; one worked off fast
        enough is the tail of a transient (a burst of connections, a slow call)."""
        now = time.monotonic()
        arrived = self.arrived.total_since(now, now - over_s) / over_s
        computed = self.computed.total_since(now, now - over_s) / over_s
        waiting = sum(s.stream.pending for s in self._ready if not s.ahead_of_real_time())
        return Load(arrived_per_s=arrived, computed_per_s=computed,
                    excess_backlog=max(0.0, waiting - arrived * self.latency_bound_s))

    def _oldest_wait(self, now: float) -> float:
        for i, (session, since) in enumerate(self._ready.items()):  # oldest first
            if i == OLDEST_LOOKED_AT:
                break
            if not session.ahead_of_real_time():
                return now - since
        return 0.0

    def _take_turn(self) -> list[tuple[StreamSession, np.ndarray]]:
        """The segments to compute this turn, within SAMPLES_PER_TURN; sessions not reached stay ready."""
        on_time, ahead = [], []
        for s in self._ready:
            (ahead if s.ahead_of_real_time() else on_time).append(s)
        self._timed = {}  # on-time sessions of this turn -> when they became ready (their latency is measured)
        keeping_pace = set(on_time)
        jobs, budget = [], SAMPLES_PER_TURN
        if self.streams_on_loop and (on_time or ahead):  # one call's worth: the loop is blocked while it runs
            hop = (on_time or ahead)[0].stream.hop
            budget = min(budget, self.model.rows_per_call(hop) * hop)
        for session in on_time + ahead:
            if budget <= 0:
                break
            ready_since = self._ready.pop(session)
            segment = session.next_segment(MAX_HOPS_PER_BATCH)
            if segment is not None:
                jobs.append((session, segment))
                budget -= len(segment)
                if session in keeping_pace:
                    self._timed[session] = ready_since
        return jobs

    async def _classify_some(self) -> None:
        """Classify waiting requests, oldest first, up to MAX_CLASSIFY_WINDOWS_PER_CALL windows in one call."""
        taken, windows = [], 0
        while self._classify_queue:
            if taken and windows + self._classify_queue[0].windows > MAX_CLASSIFY_WINDOWS_PER_CALL:
                break
            taken.append(self._classify_queue.popleft())
            windows += taken[-1].windows
        self._work.set()  # the rest, and any streams, on the next turn
        taken = [piece for piece in taken if not piece.future.done()]  # clients gone: skip
        if not taken:
            return
        try:
            await self._classify_batch(taken)
        except Exception as err:
            if len(taken) == 1:
                return self._answer(taken[0].future, error=err)
            for piece in taken:  # one bad request must not fail those batched with it: each alone
                try:
                    await self._classify_batch([piece])
                except Exception as own_err:  # the request answers with its own error; the server goes on
                    self._answer(piece.future, error=own_err)

    async def _classify_batch(self, pieces: list[ClassifyPiece]) -> None:
        # The mixer's weights come out of the same call (they cost a copy): fetched for all if one asked.
        results = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.model.classify_many, [p.signal for p in pieces], any(p.scale_weights for p in pieces))
        for piece, result in zip(pieces, results):
            self._answer(piece.future, result if piece.scale_weights else _without_scale_weights(result))

    @staticmethod
    def _answer(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
        if future.done():  # the client went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    async def _advance(self, jobs: list[tuple[StreamSession, np.ndarray]]) -> None:
        sessions, segments = [s for s, _ in jobs], [seg for _, seg in jobs]
        for s in sessions:
            s.in_flight = True
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.samples.labels("stream").inc(sum(map(len, segments)))
        scale_weights = any(s.stream.scale_weights for s in sessions)
        slots = [s.stream.slot for s in sessions]
        try:
            if self.streams_on_loop:
                results = self._compute(segments, slots, scale_weights)
            else:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._compute, segments, slots, scale_weights)
        except Exception:  # keep serving the other streams; these are told and closed (1011)
            log.exception("batched inference failed")
            results = None
        now = time.monotonic()
        self.computed.add(now, sum(map(len, segments)))
        for s in sessions:  # streams keeping real time: how long their samples waited and were computed
            if s in self._timed:
                self.latency.add(now, now - self._timed[s])
        for i, s in enumerate(sessions):
            s.in_flight = False
            if s.gone:
                s.stream.leave_pool()  # closed while in this batch: its row is free now
                continue
            if results is None:
                s.failed()
                continue
            try:
                s.advanced(*results[i])
            except Exception:  # a bug in one stream's bookkeeping must not stall the others
                log.exception("stream result could not be applied")
                s.failed()

    def _compute(self, segments, slots, scale_weights: bool):
        """On the inference thread, or on the event loop's with `streams_on_loop`."""
        started = time.perf_counter()
        results = self.model.advance_pooled(segments, self.states, slots, scale_weights)
        self.metrics.inference_seconds.labels("stream").observe(time.perf_counter() - started)
        return results


def _without_scale_weights(result: dict) -> dict:
    """A classify result as asked for without the mixer's weights (computed for a request batched with it)."""
    windows = [{k: v for k, v in w.items() if k not in ("scale_weights", "samples")} for w in result["windows"]]
    return {"windows": windows, "probabilities": result["probabilities"]}
