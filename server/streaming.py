"""WS /stream: one connection = one `Stream` registered with the batcher (server/hub.py admits and sheds them).

Two tasks per connection (`Peer`, shared with /gateway's connections): the receive loop (parses frames, feeds its
`StreamSession`, which waits for room when the stream's buffer is full) and the sender (the only writer on the
socket: config, predictions, errors and the close, in order, from the session's outbox). `Connection` is one
stream's protocol; a /gateway connection (server/gateway.py) holds many of them without sockets of their own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from msssm_serve.leads import LeadError, LeadMap, parse_lead_list
from msssm_serve.resample import WindowResampler
from msssm_serve.runtime import Stream

from .registry import ServedModel
from . import snapshot
from .session import Close, Stalled, StreamGone, StreamSession
from .signals import (InvalidJSON, InvalidSignal, encode_json, parse_binary_format, parse_json, parse_sample_rate,
                      samples_from_bytes, samples_from_json)


UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1003, 1007, 1008, 1009, 1011, 1013
NORMAL, GOING_AWAY = 1000, 1001
SENDER_DRAIN_S = 5.0  # how long a closing connection may take to deliver what it still owes
RETRY_AFTER_S = 2  # the hint given with a refusal for load: the admission window's length


class StreamError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.close = Close(code, detail)


def close_message(close: Close) -> dict:
    """The error message that goes before a close frame (with the retry hint, when there is one)."""
    hint = {} if close.retry_after_s is None else {"retry_after_s": close.retry_after_s}
    return {"type": "error", "detail": close.detail, **hint}


def idle_close(idle_s: float) -> Close:
    return Close(NORMAL, f"idle for {idle_s:g} s, closing")


def unread_close(idle_s: float) -> Close:
    return Close(POLICY, f"predictions unread for {idle_s:g} s: the client must read what it is sent")


def close_reason(detail: str) -> str:
    """A close frame's reason is at most 123 bytes of UTF-8: cut there, never inside a character."""
    return detail.encode()[:123].decode(errors="ignore")


@dataclass
class Route:
    """One model a connection streams to: its session, the resampler from the device's rate to the model's, and how
    the client's leads map to the model's (resampled first, on the leads sent, as /classify does)."""
    served: ServedModel
    session: StreamSession
    resampler: WindowResampler
    leads: LeadMap

    def model_samples(self, samples: np.ndarray) -> np.ndarray:
        return self.leads(self.resampler.push(samples))


def parse_text_frame(text: str) -> dict:
    try:
        body = parse_json(text, "text frame")
    except InvalidJSON as err:
        raise StreamError(INVALID_DATA, str(err)) from err
    if not isinstance(body, dict):
        raise StreamError(INVALID_DATA, "text frames must be JSON objects")
    return body


class Peer:
    """One WebSocket connection's two loops, whatever it carries: the receive loop (hands each message to `_handle`)
    and the sender (`_send_loop`, the only writer on the socket), with the idle and stuck-send deadlines that the
    hub's sweep enforces (`enforce_deadlines`). `Connection` carries one stream; `Gateway` (server/gateway.py) many."""

    def __init__(self, hub: StreamHub, ws: WebSocket):
        self.hub, self.ws = hub, ws
        # Deadlines, enforced by the hub's sweep (`enforce_deadlines`) rather than by a timer armed and cancelled
        # around every frame and every send: since when (loop time) the receive loop has waited for a frame, and the
        # sender for the client to take a message; None while not waiting.
        self._receiving_since: float | None = None
        self._sending_since: float | None = None
        self._receiver: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._went_idle = False

    # what a kind of connection defines
    def send(self, item) -> None:
        raise NotImplementedError

    async def feed_bytes(self, data) -> None:
        """A binary message."""
        raise NotImplementedError

    async def handle_body(self, body: dict, first: bool) -> None:
        """A text message's JSON object."""
        raise NotImplementedError

    async def _send_loop(self) -> None:
        raise NotImplementedError

    def _end_stream(self) -> None:
        raise NotImplementedError

    async def refuse(self, close: Close) -> None:
        """Turn the connection away before it carries anything: the error message (with the retry hint), the close."""
        await self._close(close)

    async def _close(self, close: Close) -> None:
        self.hub.metrics.stream_closes.labels(str(close.code)).inc()
        await self.ws.send_text(encode_json(close_message(close)))
        await self.ws.close(close.code, close_reason(close.detail))

    def enforce_deadlines(self, now: float) -> None:
        """End a connection whose client sent nothing for the idle timeout (closed 1000 with the reason), or whose
        client has not taken a message for as long (it stopped reading; the stream ends)."""
        idle_s = self.hub.settings.idle_timeout_s
        if self._receiving_since is not None and now - self._receiving_since > idle_s and not self._went_idle:
            self._went_idle = True
            self._receiver.cancel()
        if self._sending_since is not None and now - self._sending_since > idle_s:
            self._sending_since = None
            self._sender.cancel()

    async def run(self) -> None:
        self._receiver = asyncio.current_task()
        self._sender = sender = asyncio.create_task(self._send_loop())
        close = None
        try:
            close = await self._receive_loop()
        finally:
            self._end_stream()  # state freed now, whatever the sender still does
            if close is None:  # the client went away, or receiving failed: nothing more to send
                sender.cancel()
        if close is not None:
            self.send(close)
        await asyncio.wait([sender], timeout=SENDER_DRAIN_S)
        sender.cancel()

    # --- receiving ----------------------------------------------------------------------------------------------
    def _check_size(self, message: dict) -> None:
        limit = self.hub.settings.max_frame_bytes
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len(text.encode()) if text is not None else 0
        if size > limit:
            raise StreamError(TOO_BIG, f"frame of {size} bytes exceeds the {limit}-byte limit")

    async def _handle(self, message: dict, first: bool) -> None:
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            return await self.feed_bytes(data)
        if text is None:
            raise StreamError(UNSUPPORTED, "unsupported frame")
        return await self.handle_body(parse_text_frame(text), first)

    async def _receive_loop(self) -> Close | None:
        first = True
        idle_s = self.hub.settings.idle_timeout_s
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._receiving_since = loop.time()
                try:
                    message = await self.ws.receive()
                except asyncio.CancelledError:
                    # the hub's sweep found it idle (`enforce_deadlines`), and nothing else cancelled it
                    if self._went_idle and self._receiver.uncancel() == 0:
                        return idle_close(idle_s)
                    raise
                finally:
                    self._receiving_since = None
                if message["type"] == "websocket.disconnect":
                    return None
                self._check_size(message)
                await self._handle(message, first)
                first = False
        except StreamError as err:
            return err.close
        except Stalled:
            return unread_close(idle_s)
        except (StreamGone, WebSocketDisconnect):
            return None


class Connection(Peer):
    def __init__(self, hub: StreamHub, ws: WebSocket):
        super().__init__(hub, ws)
        self.routes: list[Route] = []  # empty until the stream's config (or first samples) arrived
        self.n_channels = 0  # columns of the client's frames
        self.dtype, self.gain = "float32", 1.0  # how its binary frames are to be read (the config may say int16)
        self.config: dict = {}  # the stream's config message, as given (a snapshot carries it)
        self._since_snapshot = 0  # device samples received since the last unprompted snapshot
        self._device_per_model = 1.0  # device samples per model-rate sample
        # What the sender is to write, in order; once the stream exists its session adds predictions to it.
        self.outbox: asyncio.Queue = asyncio.Queue()

    def send(self, item: dict | Close) -> None:
        self.outbox.put_nowait(item)

    def _end_stream(self) -> None:
        for route in self.routes:
            route.served.batcher.close(route.session)

    async def feed_bytes(self, data) -> None:
        """A binary frame: samples, little-endian, time-major, in the stream's dtype."""
        self._ensure_stream({})
        await self._feed(self._decode(
            lambda: samples_from_bytes(data, self.n_channels, "frame", self.dtype, self.gain)))

    async def handle_body(self, body: dict, first: bool) -> None:
        """A text frame's JSON object: samples, a flush or snapshot request, the first message's config or resume."""
        if "samples" in body:
            self._ensure_stream({})
            signal = self._decode(lambda: samples_from_json(body["samples"], self.n_channels, "samples"))
            return await self._feed(signal)
        if "resume" in body:
            if not first:
                raise StreamError(UNSUPPORTED, "'resume' must be the first message of a connection")
            self._resume(body)
            return self.send(self._config_reply(self.config))
        kind = body.get("type", "config" if first else None)
        if kind == "snapshot":
            self._ensure_stream({})
            return self.send(await self._snapshot())
        if kind == "config" and first:
            self._ensure_stream(body)
            return self.send(self._config_reply(body))
        if kind == "flush":
            self._ensure_stream({})
            for route in self.routes:
                await route.session.flush(stall_timeout_s=self.hub.settings.idle_timeout_s)
            return
        if kind == "config":
            raise StreamError(UNSUPPORTED, "the config message must be the first message of a stream")
        raise StreamError(UNSUPPORTED, f"unknown message type {kind!r} (expected samples, flush, snapshot or a first "
                                       "config)")

    def _decode(self, parse) -> np.ndarray:
        try:
            return parse()
        except InvalidSignal as err:
            raise StreamError(INVALID_DATA, str(err)) from err

    def _ensure_stream(self, config: dict) -> None:
        if self.routes:
            return
        self.config = config
        served = self._chosen_models(config)
        try:
            leads = parse_lead_list(config.get("leads"))
            maps = [LeadMap(leads, m.model.leads, m.model.lead_subsets) for m in served]
        except LeadError as err:
            raise StreamError(INVALID_DATA, str(err)) from err
        resamplers = []
        for m, lead_map in zip(served, maps):
            model = m.model
            try:
                rate = parse_sample_rate(config.get("sample_rate"), model.sample_rate)
            except InvalidSignal as err:
                raise StreamError(INVALID_DATA, str(err)) from err
            resamplers.append(WindowResampler(rate, model.sample_rate, model.window, lead_map.n_given))
            hop = config.get("hop", model.default_hop)
            if isinstance(hop, bool) or not isinstance(hop, int) or not 1 <= hop <= model.window:
                raise StreamError(INVALID_DATA, f"'hop' must be an integer in 1..{model.window}, got {hop!r}")
        self.n_channels = maps[0].n_given
        every = config.get("snapshot_every")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1
                                  or len(served) != 1):
            raise StreamError(INVALID_DATA, f"'snapshot_every' must be a positive number of hops, for a one-model "
                                            f"stream; got {every!r}")
        self._device_per_model = resamplers[0].down / resamplers[0].up if not resamplers[0].identity else 1.0
        try:
            self.dtype, self.gain = parse_binary_format(config.get("dtype"), config.get("gain"))
        except InvalidSignal as err:
            raise StreamError(INVALID_DATA, str(err)) from err
        scale_weights = config.get("scale_weights", False)
        if not isinstance(scale_weights, bool):
            raise StreamError(INVALID_DATA, f"'scale_weights' must be true or false, got {scale_weights!r}")
        lacking = [m.name for m in served if scale_weights and not m.model.has_scale_weights]
        if lacking:
            raise StreamError(INVALID_DATA, f"model {lacking} has no scale-mixer output (a graph exported before it "
                                            "was one): stream without 'scale_weights'")
        hop = config.get("hop")
        self.routes = [Route(m, m.batcher.open(Stream(m.model, hop=hop or m.model.default_hop,
                                                      scale_weights=scale_weights), self.outbox, m.name),
                             resampler, lead_map) for m, resampler, lead_map in zip(served, resamplers, maps)]

    async def final_snapshot(self) -> None:
        """A last snapshot message, when this stream can have one (bounded wait; a stream that cannot is closed
        all the same)."""
        if len(self.routes) != 1 or self.routes[0].session.gone:
            return
        try:
            async with asyncio.timeout(SENDER_DRAIN_S):
                self.send(await self._snapshot())
        except (TimeoutError, StreamError, Stalled, StreamGone):
            pass

    # --- snapshot and resume -----------------------------------------------------------------------------------
    async def _snapshot(self) -> dict:
        """The stream's whole state as a sealed token (see server/snapshot.py), once no batch holds part of it."""
        if len(self.routes) != 1:
            raise StreamError(UNSUPPORTED, "snapshots are for one-model streams (open one stream per model)")
        route = self.routes[0]
        await route.session.settled(self.hub.settings.idle_timeout_s)
        header, arrays = snapshot.capture(route.session.stream, route.resampler, route.served, self.config)
        token = snapshot.seal(header, arrays, snapshot.server_secret())
        return {"type": "snapshot", "token": token, "window": header["window"], "t": header["t"],
                "pending": len(arrays["pending"])}

    def _resume(self, body: dict) -> None:
        try:
            header, arrays = snapshot.open_token(body["resume"], snapshot.server_secret())
            name = header.get("model")
            if name not in self.hub.models:
                raise snapshot.BadToken(1008, f"the resume token is for model {name!r}, which this server does not "
                                              f"hold ({sorted(self.hub.models)})")
            model = self.hub.models[name].model
            if header.get("version") != snapshot.model_version(model):
                raise snapshot.BadToken(1008, f"the resume token is for another version of model {name!r}: resume "
                                              "on a replica serving the version that issued it")
            config = header.get("config")
            if not isinstance(config, dict):
                raise snapshot.BadToken(1007, "the resume token has no stream config")
            self._ensure_stream({**config, "model": name})
            route = self.routes[0]
            snapshot.restore(route.session.stream, route.resampler, header, arrays)
            if route.session.stream.pending:
                route.served.batcher.notify(route.session)
        except snapshot.BadToken as err:
            raise StreamError(err.code, str(err)) from err

    def _chosen_models(self, config: dict) -> list[ServedModel]:
        """The config's `model` (one name) or `models` (a list of names); the server's default model if neither."""
        models = self.hub.models
        if "model" in config and "models" in config:
            raise StreamError(INVALID_DATA, "give 'model' or 'models', not both")
        names = config.get("models", [config["model"]] if "model" in config else [self.hub.default])
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
                or len(set(names)) != len(names)):
            raise StreamError(INVALID_DATA, f"'models' must be a non-empty list of distinct model names, got {names!r}")
        unknown = [n for n in names if n not in models]
        if unknown:
            raise StreamError(INVALID_DATA, f"no model named {unknown}; this server holds {sorted(models)}")
        return [models[n] for n in names]

    def _config_reply(self, config: dict) -> dict:
        first = self.routes[0]
        # `window`, `hop` and `t` count samples at the model's rate (`sample_rate`); the device's own rate is
        # `device_rate`, a window being `device_window` of its samples.
        per_model = [{"model": r.served.name, "labels": r.served.model.labels, "window": r.served.model.window,
                      "hop": r.session.stream.hop, "sample_rate": r.served.model.sample_rate,
                      "device_window": r.resampler.device_window, "resampler_delay_s": r.resampler.delay_seconds,
                      "leads": r.served.model.leads, "missing_leads": r.leads.missing,
                      **({"scales": r.served.model.scales} if r.session.stream.scale_weights else {})}
                     for r in self.routes]
        rate = config.get("sample_rate", first.served.model.sample_rate)
        return {"type": "config", "model": first.served.name, "labels": first.served.model.labels,
                "window": first.served.model.window, "hop": first.session.stream.hop,
                "sample_rate": first.served.model.sample_rate, "device_rate": rate,
                "counted_in": "model-rate samples", "dtype": self.dtype,
                **({"gain": self.gain} if self.dtype != "float32" else {}),
                "leads": config.get("leads") or first.served.model.leads,
                "scale_weights": first.session.stream.scale_weights,
                **({"scales": first.served.model.scales} if first.session.stream.scale_weights else {}),
                "models": per_model}

    async def _feed(self, samples: np.ndarray) -> None:
        for route in self.routes:
            await route.session.feed(route.model_samples(samples), stall_timeout_s=self.hub.settings.idle_timeout_s)
        every = self.config.get("snapshot_every")
        if every is not None and len(self.routes) == 1:
            # asked for in the config: a snapshot every `every` hops of samples received, unprompted
            self._since_snapshot += len(samples)
            if self._since_snapshot >= every * self.routes[0].session.stream.hop * self._device_per_model:
                self._since_snapshot = 0
                self.send(await self._snapshot())

    # --- sending ------------------------------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await self.outbox.get()
                for route in self.routes:
                    route.session.message_sent()
                if isinstance(item, Close):
                    return await self._close(item)
                self._sending_since = loop.time()  # a client that stopped reading: `enforce_deadlines`
                await self.ws.send_text(encode_json(item))
                self._sending_since = None
        except Exception:  # the socket is gone or stuck: stop
            pass
        finally:
            # Whatever ended the sender (socket gone, a close the session queued), the stream is over: this frees
            # its state and releases a receive loop waiting for room or on a flush.
            self._end_stream()
