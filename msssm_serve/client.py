"""Streaming clients (torch-free: numpy and websockets). `gateway_frames` packs many streams' frames into one
binary message for WS /gateway (docs/api.md).

`ResumableStream` streams a signal to `/stream`, keeps the latest snapshot token and the frames sent since it, and
when the connection drops (Wi-Fi, a replica killed, a rolling restart) reconnects with backoff and resumes,
re-sending only those frames. Predictions are collected once each, keyed by (model, window, t): the ones recomputed
after a resume replace their first copies, which they equal.

    import asyncio, numpy as np
    from msssm_serve.client import ResumableStream
    stream = ResumableStream("ws://127.0.0.1:8000/stream", {"sample_rate": 360, "leads": ["MLII", "V1"]})
    predictions = asyncio.run(stream.send(signal))   # signal: [T, leads] float32 at the declared rate

Needs `pip install websockets`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

import numpy as np


def gateway_frames(frames: dict[int, np.ndarray]) -> bytes:
    """{stream id: frame [T, C]} -> one binary /gateway message: per stream, a little-endian uint32 id and uint32
    byte count, then the frame as little-endian float32, time-major (int16 counts for a stream configured so)."""
    parts = []
    for stream_id, frame in frames.items():
        data = np.ascontiguousarray(frame, dtype="<i2" if frame.dtype == np.int16 else "<f4").tobytes()
        parts += [np.array([stream_id, len(data)], dtype="<u4").tobytes(), data]
    return b"".join(parts)


class StreamRefused(Exception):
    """The server refused the stream (its error message and close code): retrying would not help."""


# Close codes after which the same request will fail again: the client gives up instead of retrying.
FINAL_CODES = {1003, 1007, 1008, 1009}


class ResumableStream:
    def __init__(self, url: str, config: dict | None = None, *, frame_samples: int = 100,
                 snapshot_every: int = 10, headers: dict | None = None, retries: int = 8, backoff_s: float = 0.25,
                 realtime_rate: float | None = None):
        """`frame_samples`: samples per binary frame; `snapshot_every`: frames between snapshot requests (the most
        a reconnect re-sends); `retries`: reconnections in a row before giving up, waiting `backoff_s`, doubling;
        `realtime_rate`: pace frames at this many samples per second (None: as fast as the server takes them)."""
        self.url, self.config = url, dict(config or {})
        self.frame_samples, self.snapshot_every = frame_samples, snapshot_every
        self.headers, self.retries, self.backoff_s = headers, retries, backoff_s
        self.realtime_rate = realtime_rate
        self.token: str | None = None
        self.predictions: dict[tuple, dict] = {}
        self.reconnects = 0
        self.resent_frames = 0  # frames sent more than once (those after the snapshot a resume started from)
        self._base = self._sent = 0

    async def send(self, signal: np.ndarray) -> list[dict]:
        """Stream the whole signal, flush, and return every prediction in order."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        signal = np.ascontiguousarray(signal, dtype="<f4")
        frames = [signal[i : i + self.frame_samples] for i in range(0, len(signal), self.frame_samples)]
        self._base = 0  # frames before it are inside the latest snapshot: never sent again
        self._sent = 0  # frames sent at least once
        failures = 0
        while True:
            try:
                async with connect(self.url, additional_headers=self.headers, max_size=None) as ws:
                    await ws.send(json.dumps({"resume": self.token} if self.token else self.config))
                    reply = json.loads(await ws.recv())
                    if reply.get("type") == "error":
                        raise StreamRefused(reply["detail"])
                    failures = 0
                    await self._exchange(ws, frames)
                    break
            except StreamRefused:
                raise
            except (ConnectionClosed, ConnectionError, OSError, InvalidHandshake, InvalidStatus,
                    asyncio.TimeoutError) as err:
                code = getattr(getattr(err, "rcvd", None), "code", None)
                if code in FINAL_CODES:
                    raise StreamRefused(f"closed with {code}: {err}") from err
                failures += 1
                if failures > self.retries:
                    raise
                self.reconnects += 1
                await asyncio.sleep(self.backoff_s * 2 ** (failures - 1))
        return sorted(self.predictions.values(), key=lambda m: (m.get("model", ""), m["window"], m["t"]))

    async def _exchange(self, ws, frames: list[np.ndarray]) -> None:
        """Send frames[self._base:] (those already sent once are re-sent), asking for a snapshot every
        `snapshot_every` frames, then a flush and a last snapshot, while receiving. Returns once that last snapshot
        is answered; raises ConnectionError when the connection ends first."""
        asked: deque[int] = deque()  # frame index at each snapshot request still unanswered
        last_request = len(frames)

        async def receive():
            async for text in ws:
                message = json.loads(text)
                kind = message.get("type")
                if kind == "prediction":
                    self.predictions[(message.get("model"), message["window"], message["t"])] = message
                elif kind == "snapshot":
                    self.token, self._base = message["token"], asked.popleft()
                    if self._base == last_request and not asked:
                        return
                elif kind == "error":
                    detail = message["detail"]
                    if "shutting down" not in detail and "try later" not in detail:
                        raise StreamRefused(detail)
            raise ConnectionError("the connection closed before the stream was finished")

        receiver = asyncio.create_task(receive())
        try:
            start = self._base
            self.resent_frames += max(0, self._sent - start)
            for i in range(start, len(frames)):
                if receiver.done():
                    break
                await ws.send(frames[i].tobytes())
                self._sent = max(self._sent, i + 1)
                if (i + 1 - start) % self.snapshot_every == 0 and i + 1 < len(frames):
                    asked.append(i + 1)
                    await ws.send(json.dumps({"type": "snapshot"}))
                if self.realtime_rate:
                    await asyncio.sleep(len(frames[i]) / self.realtime_rate)
            if not receiver.done():
                await ws.send(json.dumps({"type": "flush"}))
                asked.append(last_request)
                await ws.send(json.dumps({"type": "snapshot"}))
            await receiver  # returns once finished; raises what ended it otherwise
        finally:
            receiver.cancel()
