"""WS /gateway: many streams over one connection, for a gateway that forwards a ward's devices (a central station,
an edge box, a telemetry receiver).

Each stream keeps the whole protocol of a /stream connection (config, samples, flush, snapshot, resume, predictions,
errors, admission and shedding), named by an integer `id` the client picks. What the connection saves is the cost of
a WebSocket message (framing, the event loop's wake-ups, a system call, the ASGI hand-offs): it is paid once per
binary message of frames and once per batch turn's predictions, not once per frame and once per prediction, which on
one stream per connection is about a third of the server's CPU (docs/performance.md).

Client -> server:
- text `{"type": "open", "id": N, ...a /stream config...}` or `{"type": "open", "id": N, "resume": TOKEN}`;
  `{"type": "flush" | "snapshot" | "close", "id": N}`; `{"id": N, "samples": [[...], ...]}`.
- binary: one or more records, each a little-endian uint32 stream id, a uint32 byte count, then that many bytes: the
  stream's frame (little-endian, time-major, in its dtype), as a /stream binary frame.
Server -> client: text `{"type": "messages", "messages": [...]}`, every message a /stream message with its stream's
`id` added; a stream's end is `{"type": "closed", "id": N, "code": C, "detail": ...}` (`retry_after_s` with 1013),
with the code a /stream connection would close with. A fault in one stream's messages ends that stream only; one in
the connection's own framing (not JSON, no id, a broken record) closes the connection with its code.

Messages are read in order: a stream whose buffer is full (its client sends faster than real time) holds the
connection's later frames until it has room, as one TCP connection would.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from .session import Close, Stalled, StreamGone
from .signals import encode_json
from .streaming import (INVALID_DATA, NORMAL, POLICY, Connection, Peer, StreamError, close_message, idle_close,
                        unread_close)

if TYPE_CHECKING:  # the hub imports this module
    from .hub import StreamHub

RECORD_HEADER = struct.Struct("<II")  # stream id, frame bytes
# Answers about ids with no open stream that a connection may owe at once (about 1 MB): records for streams the
# server just shed or closed are answered once per id and message, and a client that keeps sending such records
# without reading is closed (1008) before they pile up.
MAX_NOTES_OWED = 4096


class StreamOutbox:
    """A gateway stream's outbox (what its session queues predictions and its close on): counted per stream, so
    that the session's bound on unread messages holds per stream, and queued on the gateway's one sender."""

    def __init__(self, gateway: Gateway, stream: GatewayStream):
        self.gateway, self.stream = gateway, stream
        self.owed = 0

    def put_nowait(self, item: dict | Close) -> None:
        self.owed += 1
        self.gateway.queue(self.stream, item)

    def qsize(self) -> int:
        return self.owed


class GatewayStream(Connection):
    """One stream of a gateway connection: a /stream connection's protocol without a socket of its own."""

    def __init__(self, gateway: Gateway, stream_id: int):
        super().__init__(gateway.hub, gateway.ws)
        self.gateway, self.id = gateway, stream_id
        self.outbox = StreamOutbox(gateway, self)
        self.last_message = asyncio.get_running_loop().time()
        self.closed = False  # dropped from its gateway: its state is freed, its id free again
        self.close_sent = False  # its close message went out: nothing more is sent for it

    def end(self, close: Close) -> None:
        """Stop the stream now (its state freed) and queue its close after what it already owes."""
        if not self.closed:
            self.gateway.drop(self)
            self.send(close)

    def enforce_deadlines(self, now: float) -> None:
        """A stream of a gateway that sent nothing for it for the idle timeout is closed (1000 with the reason); a
        gateway that stops reading is its connection's business (`Gateway.enforce_deadlines`)."""
        idle_s = self.hub.settings.idle_timeout_s
        if now - self.last_message > idle_s:
            self.end(idle_close(idle_s))


class Gateway(Peer):
    def __init__(self, hub: StreamHub, ws: WebSocket):
        super().__init__(hub, ws)
        self.streams: dict[int, GatewayStream] = {}
        # (stream, message or its Close) in order; (None, message) for a message about no open stream, (None, Close)
        # for the connection's own close
        self._queue: list[tuple[GatewayStream | None, dict | Close]] = []
        self._queued = asyncio.Event()
        self._notes_owed = 0  # `note` messages queued and not yet sent

    def queue(self, stream: GatewayStream | None, item: dict | Close) -> None:
        self._queue.append((stream, item))
        self._queued.set()

    def note(self, message: dict) -> None:
        """A message about an id that has no open stream. Bounded: a client that keeps sending for ids it has not
        opened while not reading the answers is closed, instead of the answers piling up."""
        if self._notes_owed >= MAX_NOTES_OWED:
            raise StreamError(POLICY, f"{MAX_NOTES_OWED} answers about streams that are not open are unread: the "
                                      "client must read what it is sent")
        self._notes_owed += 1
        self.queue(None, message)

    def send(self, close: Close) -> None:
        """Close the connection after what is queued (what `Peer.run` and the hub's shutdown call)."""
        self.queue(None, close)

    def drop(self, stream: GatewayStream) -> None:
        """Forget a stream at once: its state is freed and its id may be opened again."""
        stream.closed = True
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        stream._end_stream()
        self.hub.release(stream)

    def _end_stream(self) -> None:
        for stream in list(self.streams.values()):
            self.drop(stream)

    # --- receiving ----------------------------------------------------------------------------------------------
    async def handle_body(self, body: dict, first: bool) -> None:
        """A text message: an open, or a message for one open stream (named by its `id`)."""
        stream_id = body.pop("id", None)
        if isinstance(stream_id, bool) or not isinstance(stream_id, int) or not 0 <= stream_id < 2**32:
            raise StreamError(INVALID_DATA, "every gateway text message names its stream: 'id', an integer in "
                                            f"0..{2**32 - 1}; got {stream_id!r}")
        kind = body.get("type")
        if kind == "open":
            return await self._open(stream_id, body)
        stream = self._stream(stream_id)
        if stream is None:
            return
        if kind == "close":
            return stream.end(Close(NORMAL, "closed at the client's request"))
        await self._for_stream(stream, stream.handle_body(body, first=False))

    async def feed_bytes(self, data) -> None:
        """A binary message: records of frames, each for one open stream."""
        view, at, unknown = memoryview(data), 0, set()
        while at < len(view):
            if len(view) - at < RECORD_HEADER.size:
                raise StreamError(INVALID_DATA, f"binary record at byte {at}: {len(view) - at} bytes left, a record "
                                                f"header is {RECORD_HEADER.size} (uint32 stream id, uint32 bytes)")
            stream_id, size = RECORD_HEADER.unpack_from(view, at)
            at += RECORD_HEADER.size
            if size > len(view) - at:
                raise StreamError(INVALID_DATA, f"binary record for stream {stream_id} says {size} bytes, "
                                                f"{len(view) - at} follow")
            stream = self.streams.get(stream_id)
            if stream is None:
                unknown.add(stream_id)  # answered once, after the message
            else:
                stream.last_message = asyncio.get_running_loop().time()
                await self._for_stream(stream, stream.feed_bytes(view[at : at + size]))
            at += size
        for stream_id in sorted(unknown):
            self.note(no_stream(stream_id))

    async def _open(self, stream_id: int, body: dict) -> None:
        if stream_id in self.streams:
            return self.note({"type": "error", "id": stream_id, "detail": f"stream {stream_id} is already open on "
                              "this connection (close it first, or pick another id)"})
        refused = self.hub.refusal()
        if refused is not None:
            return self.note(closed_message(stream_id, refused))
        stream = self.streams[stream_id] = GatewayStream(self, stream_id)
        self.hub.admit(stream)
        del body["type"]
        await self._for_stream(stream, stream.handle_body(body, first=True))

    def _stream(self, stream_id: int) -> GatewayStream | None:
        """The open stream `stream_id`; None (and an error message saying so) when there is none."""
        stream = self.streams.get(stream_id)
        if stream is None:
            self.note(no_stream(stream_id))
        else:
            stream.last_message = asyncio.get_running_loop().time()
        return stream

    async def _for_stream(self, stream: GatewayStream, handled) -> None:
        """Await one stream's handling of a message; what would close a /stream connection closes this stream."""
        try:
            await handled
        except StreamError as err:
            stream.end(err.close)
        except Stalled:
            stream.end(unread_close(self.hub.settings.idle_timeout_s))
        except StreamGone:
            pass

    # --- sending ------------------------------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        """Everything queued since the last send goes out as one message (a batch turn's predictions for all the
        connection's streams); the connection's own close last."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._queued.clear()
                    await self._queued.wait()
                items, self._queue = self._queue, []
                messages, close = [], None
                for stream, item in items:
                    if stream is None:
                        if isinstance(item, Close):
                            close = item
                            break
                        self._notes_owed -= 1
                        messages.append(item)
                        continue
                    stream.outbox.owed -= 1
                    for route in stream.routes:
                        route.session.message_sent()
                    if stream.close_sent:
                        continue  # its close went out: a later close, or what a batch still delivered, is not sent
                    if isinstance(item, Close):
                        self.drop(stream)
                        stream.close_sent = True
                        messages.append(closed_message(stream.id, item))
                    else:
                        messages.append({"id": stream.id, **item})
                if messages:
                    self._sending_since = loop.time()  # a client that stopped reading: `enforce_deadlines`
                    await self.ws.send_text(encode_json({"type": "messages", "messages": messages}))
                    self._sending_since = None
                if close is not None:
                    return await self._close(close)
        except Exception:  # the socket is gone or stuck: stop
            pass
        finally:
            self._end_stream()


def no_stream(stream_id: int) -> dict:
    return {"type": "error", "id": stream_id, "detail": f"no open stream {stream_id} on this connection: open it "
                                                        "first ({\"type\": \"open\", \"id\": ...}), or it was closed"}


def closed_message(stream_id: int, close: Close) -> dict:
    """A gateway stream's end: what a /stream connection says in its error message and close frame, in one."""
    message = close_message(close)
    return {**message, "type": "closed", "id": stream_id, "code": close.code}
