"""Cross-stream batching: one consumer task advances every stream that has work in one onnxruntime call per
distinct segment length, on a single inference thread, so the event loop never blocks on the model and a stream's
state is never advanced by two calls at once.

A `Slot` is one registered stream: its runtime `Stream` (state + bounded pending buffer), the outbox its connection
drains, and the `room` event the connection's receive loop waits on when the buffer or the outbox is full. Nothing
is buffered without bound and nothing is dropped: a client that sends faster than the model runs is simply not read
until there is room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from msssm_serve.runtime import OnnxModel, Prediction, Stream

from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_HOPS_PER_BATCH = 4  # hops a stream may advance per batch: bounds one call's latency for everyone in it
MAX_OUTBOX = 16  # undelivered batches of predictions a connection may owe before its samples stop being read
# /classify windows advanced together in one call: rows share a call's fixed costs (18 vs 27 us/sample for 4 rows
# vs 1, benchmarks/runtime.py section 4), and the bound keeps a queue of requests from holding streams back for long.
MAX_CLASSIFY_WINDOWS_PER_CALL = 8


class StreamGone(Exception):
    """The connection behind a slot went away while its receive loop was waiting for room."""


class Slot:
    def __init__(self, stream: Stream, outbox: asyncio.Queue):
        self.stream = stream
        # Items for the connection's sender: lists of Predictions here, plus whatever else the connection queues.
        self.outbox = outbox
        self.room = asyncio.Event()
        self.in_flight = False  # part of the batch being computed: not to be taken from or flushed again
        self.flush_waiter: asyncio.Future | None = None
        self.gone = False
        self.last_sent: tuple[int, int] | None = None  # (window, t) of the last prediction queued

    def has_room(self, n: int) -> bool:
        return self.stream.free >= n and self.outbox.qsize() < MAX_OUTBOX

    def wake(self) -> None:
        self.room.set()

    def settle_flush(self, error: Exception | None = None) -> None:
        """Release a connection waiting on its flush: done, or failed with `error` (it then stops reading)."""
        if self.flush_waiter is not None and not self.flush_waiter.done():
            if error is None:
                self.flush_waiter.set_result(None)
            else:
                self.flush_waiter.set_exception(error)


class Batcher:
    def __init__(self, model: OnnxModel, metrics: Metrics, batch_wait_ms: float):
        self.model = model
        self.metrics = metrics
        self.batch_wait_s = batch_wait_ms / 1000
        self.slots: set[Slot] = set()
        # One thread: one inference at a time per process, all its intra-op threads on that call.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._classify_queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()

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

    # --- what connections call ----------------------------------------------------------------------------------
    def register(self, stream: Stream, outbox: asyncio.Queue) -> Slot:
        slot = Slot(stream, outbox)
        self.slots.add(slot)
        return slot

    def unregister(self, slot: Slot) -> None:
        """Forget the stream at once; a batch it is in still completes, and its result is dropped."""
        self.slots.discard(slot)
        slot.gone = True
        slot.wake()
        slot.settle_flush(StreamGone())  # an exception the receive loop handles, where a cancel would escape it

    async def feed(self, slot: Slot, samples: np.ndarray) -> None:
        """Queue samples [T, C] for the stream, waiting for room as the batcher works the buffer down."""
        chunk = slot.stream.max_pending
        for start in range(0, len(samples), chunk):
            part = samples[start : start + chunk]
            while not slot.has_room(len(part)):
                if slot.gone:
                    raise StreamGone()
                # No await between the check and the clear, so a wake() cannot slip in between.
                slot.room.clear()
                await slot.room.wait()
            slot.stream.feed(part)
            self._work.set()

    async def flush(self, slot: Slot) -> None:
        """Advance whatever the stream has pending and queue the prediction of its partial window; returns once
        the predictions are in the outbox, so later samples cannot slip into the flushed window."""
        slot.flush_waiter = asyncio.get_running_loop().create_future()
        self._work.set()
        try:
            await slot.flush_waiter
        finally:
            slot.flush_waiter = None

    async def classify(self, signal: np.ndarray) -> dict:
        """`OnnxModel.classify(signal)`, batched by the consumer with other requests waiting at the same time. A long
        signal is queued as pieces of at most MAX_CLASSIFY_WINDOWS_PER_CALL windows, so that streams advance between
        its calls (an hour-long recording is ~360 windows: seconds of compute that would stall every stream)."""
        piece = MAX_CLASSIFY_WINDOWS_PER_CALL * self.model.window
        loop = asyncio.get_running_loop()
        starts = range(0, max(len(signal), 1), piece)  # an empty signal still goes in, to get the model's error
        futures = [loop.create_future() for _ in starts]
        self._classify_queue.extend((signal[start : start + piece], f) for start, f in zip(starts, futures))
        self._work.set()
        parts = await asyncio.gather(*futures)  # cancelled with the request: the batcher then skips what is left
        windows = [{**w, "start": start + w["start"]} for start, part in zip(starts, parts) for w in part["windows"]]
        return {"windows": windows, "probabilities": np.max([w["probabilities"] for w in windows], axis=0)}

    # --- the consumer -------------------------------------------------------------------------------------------
    def _wants_flush(self, slot: Slot) -> bool:
        return slot.flush_waiter is not None and not slot.flush_waiter.done() and not slot.in_flight

    def _ready(self) -> list[Slot]:
        return [s for s in self.slots if not s.in_flight and not s.gone and (
            self._wants_flush(s) or s.stream.next_segment_length(max_hops=MAX_HOPS_PER_BATCH) > 0)]

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            if self._classify_queue:
                await self._classify_some()
            ready = self._ready()
            if not ready:
                continue
            if len(ready) < len(self.slots) and self.batch_wait_s > 0:
                # Other streams may be a frame away from work: a short wait lets them share this call.
                await asyncio.sleep(self.batch_wait_s)
                ready = self._ready()
            try:
                await self._advance(ready)
            except Exception:  # keep serving the other streams; the failed ones are told and closed
                log.exception("batched inference failed")
            # Streams may have more than MAX_HOPS_PER_BATCH hops pending: look again.
            self._work.set()

    async def _classify_some(self) -> None:
        """Classify waiting requests, oldest first, up to MAX_CLASSIFY_WINDOWS_PER_CALL windows in one call."""
        taken, windows = [], 0
        while self._classify_queue:
            n_windows = -(-len(self._classify_queue[0][0]) // self.model.window)
            if taken and windows + n_windows > MAX_CLASSIFY_WINDOWS_PER_CALL:
                break
            taken.append(self._classify_queue.popleft())
            windows += n_windows
        self._work.set()  # the rest, and any streams, on the next turn
        taken = [(signal, future) for signal, future in taken if not future.done()]  # clients gone: skip
        if not taken:
            return
        try:
            await self._classify_batch(taken)
        except Exception as err:
            if len(taken) == 1:
                return self._answer(taken[0][1], error=err)
            for request in taken:  # one bad request must not fail those batched with it: each alone
                try:
                    await self._classify_batch([request])
                except Exception as own_err:  # the request answers with its own error; the server goes on
                    self._answer(request[1], error=own_err)

    async def _classify_batch(self, requests: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        results = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.model.classify_many, [signal for signal, _ in requests])
        for (_, future), result in zip(requests, results):
            self._answer(future, result)

    @staticmethod
    def _answer(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
        if future.done():  # the client went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    async def _advance(self, ready: list[Slot]) -> None:
        flushing = [s for s in ready if self._wants_flush(s)]
        stepping = [s for s in ready if s not in flushing]
        segments = [s.stream.take(s.stream.next_segment_length(max_hops=MAX_HOPS_PER_BATCH)) for s in stepping]
        states = [s.stream.state for s in stepping]
        for s in ready:
            s.in_flight = True
        self.metrics.batch_size.observe(len(ready))
        self.metrics.samples.labels("stream").inc(sum(map(len, segments)) + sum(s.stream.pending for s in flushing))
        try:
            results, flushed = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._compute, segments, states, [s.stream for s in flushing])
        except Exception as err:
            for s in ready:
                s.in_flight = False
                s.outbox.put_nowait(err)  # its connection closes with 1011
                s.settle_flush(StreamGone())
            raise
        try:
            for slot, (probs, new_state) in zip(stepping, results):
                if not slot.gone:
                    self._deliver(slot, slot.stream.apply(probs, new_state))
            for slot, predictions in zip(flushing, flushed):
                if not slot.gone:
                    self._deliver(slot, predictions)
                    slot.settle_flush()
        finally:  # whatever failed above, no stream of this batch may stay marked in flight (it would stall)
            for s in ready:
                s.in_flight = False

    def _compute(self, segments, states, flushing: list[Stream]):
        """On the inference thread. Flushes are rare and partial, so each runs its own (small) calls."""
        started = time.perf_counter()
        results = self.model.advance_streams(segments, states) if segments else []
        flushed = [stream.flush() for stream in flushing]
        self.metrics.inference_seconds.labels("stream").observe(time.perf_counter() - started)
        return results, flushed

    @staticmethod
    def _deliver(slot: Slot, predictions: list[Prediction]) -> None:
        # A flush that lands on a hop boundary would repeat the prediction just made there, or not, depending on
        # whether that hop was advanced before the flush or by it; never repeating keeps the messages deterministic.
        predictions = [p for p in predictions if (p.window, p.t) != slot.last_sent]
        if predictions:
            slot.last_sent = (predictions[-1].window, predictions[-1].t)
            slot.outbox.put_nowait(predictions)
        slot.wake()
