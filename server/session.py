"""One stream's protocol state between its WebSocket connection and the batcher.

A `StreamSession` owns the runtime `Stream` (model state, bounded pending samples, window position, which prediction
was last made), the flush in progress and the outbox of messages for the connection's sender. The batcher only asks
it for the next segment to compute and hands back the result; every protocol rule (hops, flushes, backpressure,
non-finite results, failures) is decided here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from msssm_serve.runtime import Prediction, Stream

if TYPE_CHECKING:  # the batcher imports this module
    from .batcher import Batcher

# Prediction messages a connection may owe its client before its stream stops being advanced (and so, once its
# pending buffer is full, before its samples stop being read): a client that never reads holds this much at most.
MAX_OUTBOX = 64
INVALID_DATA, INTERNAL = 1007, 1011


class StreamGone(Exception):
    """The stream ended (connection gone or closed by the server) while its receive loop was waiting."""


class Stalled(Exception):
    """The stream could not take samples for longer than allowed: its client does not read its predictions."""


@dataclass(frozen=True)
class Close:
    """The last message of a stream: an error message with `detail` (and a retry hint, when there is one), then
    the close frame with `code`."""
    code: int
    detail: str
    retry_after_s: float | None = None


def prediction_message(p: Prediction, model: str) -> dict:
    message = {"type": "prediction", "model": model, "window": p.window, "t": p.t,
               "probabilities": p.probabilities.tolist(), "final": p.final}
    if p.scale_weights is not None:
        message["scale_weights"] = p.scale_weights.tolist()
    return message


class StreamSession:
    def __init__(self, stream: Stream, batcher: Batcher, outbox: asyncio.Queue, model_name: str):
        self.stream = stream
        self.model_name = model_name  # what the server calls the model: every prediction message says it
        self.batcher = batcher
        self.outbox = outbox  # dict messages and, last, a Close; the connection's sender is its only reader
        self.in_flight = False  # part of the batch being computed: the batcher must not take from it again
        self.gone = False
        self._room = asyncio.Event()  # set whenever pending samples were taken or the outbox shrank
        self._flush: asyncio.Future | None = None
        self._opened = time.monotonic()
        self._received = 0  # samples fed since the stream opened

    # --- the receive loop's side --------------------------------------------------------------------------------
    async def feed(self, samples: np.ndarray, stall_timeout_s: float) -> None:
        """Queue samples [T, C], as many as fit at a time, so that a frame larger than the free buffer is consumed
        in pieces while the batcher works the buffer down (a full buffer always holds a whole hop to compute)."""
        start = 0
        while start < len(samples):
            await self._wait(lambda: self.stream.free > 0, stall_timeout_s)
            n = min(self.stream.free, len(samples) - start)
            self.stream.feed(samples[start : start + n])
            self._received += n
            self.batcher.arrived_samples(n)
            start += n
            self.batcher.notify(self)

    async def flush(self, stall_timeout_s: float) -> None:
        """Advance whatever is pending (through the batch) and queue the prediction of the partial window; returns
        once it is in the outbox, so later samples cannot slip into the flushed window."""
        if self.gone:  # ended already (a failed batch, a shed): nothing would ever complete the flush
            raise StreamGone()
        self._flush = asyncio.get_running_loop().create_future()
        self.batcher.notify(self)
        try:
            async with asyncio.timeout(stall_timeout_s):  # an outbox its client never reads holds a flush back
                await self._flush
        except TimeoutError:
            raise Stalled() from None
        finally:
            self._flush = None

    async def _wait(self, condition, timeout_s: float) -> None:
        if condition() and not self.gone:  # the usual case: no timer to arm (one per frame is ~10 % of the loop)
            return
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    if self.gone:
                        raise StreamGone()
                    self._room.clear()  # no await between the check and the clear: a set cannot slip in between
                    await self._room.wait()
        except TimeoutError:
            raise Stalled() from None
        if self.gone:
            raise StreamGone()

    # --- the sender's side --------------------------------------------------------------------------------------
    def message_sent(self) -> None:
        """The sender took a message off the outbox: a stream held back by a full outbox may go on."""
        self._room.set()
        if self.has_work():
            self.batcher.notify(self)

    # --- the batcher's side -------------------------------------------------------------------------------------
    def ahead_of_real_time(self) -> bool:
        """The client has sent more than real time allows since the stream opened (a burst, a catch-up, a file
        pushed as fast as possible), with two windows of slack. Such streams are served after those keeping pace."""
        elapsed = time.monotonic() - self._opened
        return self._received > elapsed * self.stream.model.sample_rate + 2 * self.stream.model.window

    def has_work(self) -> bool:
        return not self.gone and (self._flush is not None or self.stream.next_segment_length() > 0)

    def next_segment(self, max_hops: int) -> np.ndarray | None:
        """The samples to advance in this batch: whole hops (at most `max_hops`), or for a flush whatever is
        pending. None: nothing to compute now (a flush with nothing pending then completes at once)."""
        if self.gone or self.outbox.qsize() >= MAX_OUTBOX:
            return None  # message_sent() notifies the batcher again once the client has read
        n = self.stream.next_segment_length(max_hops=max_hops, partial=self._flush is not None)
        if n == 0:
            self._complete_flush()
            return None
        segment = self.stream.take(n)
        self._room.set()
        return segment

    async def settled(self, stall_timeout_s: float) -> None:
        """Returns once no batch holds part of this stream: its state, position and pending samples are then one
        consistent picture (what a snapshot records)."""
        await self._wait(lambda: not self.in_flight, stall_timeout_s)

    def advanced(self, probs: np.ndarray, new_state, weights: np.ndarray | None = None) -> None:
        """The result of advancing by the last `next_segment` (the mixer's weights too, when the batch has them)."""
        self._room.set()  # a snapshot waiting for this batch may go on
        if not np.isfinite(probs).all():
            return self.end(Close(INVALID_DATA, "the model's output is not finite for these samples: values out of "
                                                "the range the model was trained on"))
        self._deliver(self.stream.apply(probs, new_state, weights))
        if self.has_work():
            self.batcher.notify(self)

    def failed(self) -> None:
        """The batch this stream was in failed: the stream ends with 1011, its flush (if any) is released."""
        self.end(Close(INTERNAL, "inference failed; please reconnect"))

    def end(self, close: Close) -> None:
        """Queue the stream's last message and stop it; the connection closes after sending it."""
        if not self.gone:
            self.outbox.put_nowait(close)
        self.stop()

    def stop(self) -> None:
        """Stop advancing; release a receive loop waiting for room or on a flush."""
        self.gone = True
        self._room.set()
        if self._flush is not None and not self._flush.done():
            self._flush.set_exception(StreamGone())

    def _complete_flush(self) -> None:
        if self._flush is None or self._flush.done():
            return
        prediction = self.stream.flush_prediction()
        if prediction is not None:
            self._deliver([prediction])
        self._flush.set_result(None)

    def _deliver(self, predictions: list[Prediction]) -> None:
        for p in predictions:
            self.outbox.put_nowait(prediction_message(p, self.model_name))
