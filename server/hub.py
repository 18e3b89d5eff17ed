"""The open streams of one app: admission (API key, draining, max streams, the latency bound), shedding the newest
streams while a model stays over its bound, and closing them all on shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from starlette.websockets import WebSocket

from .auth import key_matches, missing_key_detail, offered_key
from .batcher import Load
from .metrics import Metrics
from .registry import ServedModel
from .session import Close
from .settings import Settings
from .gateway import Gateway
from .streaming import POLICY, RETRY_AFTER_S, SENDER_DRAIN_S, TRY_LATER, Connection

# Shedding: admission looks at latency, so streams that connect together before their load shows are all admitted.
# While a model is over its latency bound, the shedder asks whether its batcher falls behind: over the last
# LOAD_WINDOW_S, does it compute faster than samples arrive by enough to work off its backlog within CATCH_UP_S?
# If so, the latency is the tail of a transient and nothing is shed. If not, the newest streams are closed (1013,
# after a final snapshot so that they resume elsewhere): as many as leave a load the batcher can carry while it works
# off the kept streams' share of the backlog within CATCH_UP_S (`streams_to_keep`), and then none again for
# SHED_SETTLE_S, until the windows have seen the lighter load.
# Nothing is judged while streams are being admitted, nor for LOAD_WINDOW_S after: handshakes take the event loops'
# CPU from the batcher, so its rate reads low just then. The rule before this one (the share of a 2 s window's
# arrivals computed) shed 99 of 550 streams that started together on 2 workers (the server then used 92 % CPU, under
# half of the two cores), and kept 474 of 1,100 where this one keeps 670 (loadtest/results/overload_w2_*burst*).
# Why throughput and not latency sizes the shed: the backlog keeps latency high for a while after a shed, so a rule on
# latency sheds in steps, each kept stream's backlog growing in between (887 of 1,300 shed, kept p99 2.3 s).
log = logging.getLogger(__name__)

SHED_EVERY_S = 0.25
# How often every connection's idle and send deadlines are looked at (`Connection.enforce_deadlines`): one sweep
# instead of a timer armed and cancelled around each frame and each send, two per hop per stream.
DEADLINE_SWEEP_S = 0.25
LOAD_WINDOW_S = 1.0
CATCH_UP_S = 2.0
SHED_SETTLE_S = 2.0
# Of the rate the batcher computes while behind: what it carries within the latency bound is less, because a batcher
# that is behind computes in the fullest calls (1,100 streams on 2 workers: 34-53 k samples/s per worker computed
# while behind, where about 33 k per worker, 670 streams in all, is what they then held within the bound).
SHED_MARGIN = 0.85


def streams_to_keep(n: int, load: Load, catch_up_s: float = CATCH_UP_S) -> int:
    """Of `n` streams on a batcher over its latency bound: how many it can keep and still work off their share of
    the backlog within `catch_up_s` (all `n` when it already does; never fewer than one)."""
    demand = load.arrived_per_s + load.excess_backlog / catch_up_s  # samples per second the kept streams ask for
    if load.excess_backlog <= 0 or load.computed_per_s >= demand:
        return n
    return max(1, min(n, math.floor(n * SHED_MARGIN * load.computed_per_s / demand)))


class StreamHub:
    """The open connections of one app: admission, shedding, the active-streams gauge, shutdown."""

    def __init__(self, models: dict[str, ServedModel], default: str, settings: Settings, metrics: Metrics):
        self.models, self.default, self.settings, self.metrics = models, default, settings, metrics
        self.connections: dict[Connection, None] = {}  # insertion order: the newest last (shedding takes those)
        self.gateways: dict[Gateway, None] = {}  # /gateway connections (their streams are in `connections` too)
        self.draining = False  # set on SIGTERM: no new streams; open ones get a final snapshot and close 1001
        self._shedder: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._last_admitted = 0.0  # monotonic time of the newest admission: a burst of handshakes may be under way

    def authorized(self, ws: WebSocket, path: str = "/stream") -> bool:
        key = self.settings.api_key
        return key is None or key_matches(offered_key(ws.headers, ws.query_params, path), key)

    def refusal(self) -> Close | None:
        """Why a new stream cannot be taken now (draining, full, at the latency bound); None: it can."""
        if self.draining:
            return Close(TRY_LATER, "server draining for a restart; connect again (another replica takes the "
                                    "stream)")
        if len(self.connections) >= self.settings.max_streams:
            return Close(TRY_LATER, "server full, try later", retry_after_s=RETRY_AFTER_S)
        loaded = [(m.name, p95) for m in self.models.values() if (p95 := m.batcher.overloaded()) is not None]
        if loaded:
            name, p95 = loaded[0]
            return Close(TRY_LATER, f"server at its latency bound (model {name}: p95 {p95 * 1e3:.0f} ms), try later",
                         retry_after_s=RETRY_AFTER_S)
        return None

    def admit(self, conn: Connection) -> None:
        """Count an admitted stream (a connection of /stream, or one stream of a /gateway connection)."""
        self.connections[conn] = None
        self._last_admitted = time.monotonic()
        self.metrics.active_streams.set(len(self.connections))
        self._start_watching()

    def release(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        self.metrics.active_streams.set(len(self.connections))

    def _start_watching(self) -> None:
        loop = asyncio.get_running_loop()
        if self._shedder is None or self._shedder.done():
            self._shedder = loop.create_task(self._shed_while_overloaded(), name="shedder")
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._enforce_deadlines(), name="deadlines")

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()  # a close code and an error message can only be sent on an accepted socket
        conn = Connection(self, ws)
        if not self.authorized(ws):
            return await conn.refuse(Close(POLICY, missing_key_detail("/stream")))
        refused = self.refusal()
        if refused is not None:
            return await conn.refuse(refused)
        self.admit(conn)
        try:
            await conn.run()
        finally:
            self.release(conn)

    async def serve_gateway(self, ws: WebSocket) -> None:
        """WS /gateway: many streams over one connection (server/gateway.py)."""
        await ws.accept()
        gateway = Gateway(self, ws)
        if not self.authorized(ws, "/gateway"):
            return await gateway.refuse(Close(POLICY, missing_key_detail("/gateway")))
        if self.draining:
            return await gateway.refuse(self.refusal())
        if len(self.gateways) >= self.settings.max_streams:  # every gateway may hold one stream at least
            return await gateway.refuse(Close(TRY_LATER, "server full, try later", retry_after_s=RETRY_AFTER_S))
        self.gateways[gateway] = None
        self._start_watching()
        try:
            await gateway.run()
        finally:
            self.gateways.pop(gateway, None)

    async def _enforce_deadlines(self) -> None:
        """While streams are open: every DEADLINE_SWEEP_S, end those idle or stuck beyond the idle timeout."""
        loop = asyncio.get_running_loop()
        while self.connections or self.gateways:
            await asyncio.sleep(DEADLINE_SWEEP_S)
            now = loop.time()
            for conn in [*self.connections, *self.gateways]:
                conn.enforce_deadlines(now)

    async def _shed_while_overloaded(self) -> None:
        """While streams are open: when a model is over its latency bound and its batcher falls behind, close the
        newest streams of that model, keeping those it can catch up with (`streams_to_keep`; the oldest stream is
        never shed), then wait SHED_SETTLE_S."""
        while self.connections and not self.draining:
            await asyncio.sleep(SHED_EVERY_S)
            if time.monotonic() - self._last_admitted < LOAD_WINDOW_S:
                continue  # streams are still connecting: the batcher's rate is not yet what it will be
            for served in self.models.values():
                p95 = served.batcher.overloaded()
                if p95 is None:
                    continue
                mine = [c for c in self.connections if any(r.served is served for r in c.routes)]
                load = served.batcher.load(LOAD_WINDOW_S)
                n = len(mine) - streams_to_keep(len(mine), load)
                if n <= 0:
                    continue
                log.warning("model %s over its latency bound (p95 %.0f ms) and falling behind (%.0f samples/s "
                            "arrive, %.0f computed, %.0f waiting beyond the normal queue): shedding the newest %d of "
                            "%d streams", served.name, p95 * 1e3, load.arrived_per_s, load.computed_per_s,
                            load.excess_backlog, n, len(mine))
                shed = mine[len(mine) - n :]
                await asyncio.gather(*(conn.final_snapshot() for conn in shed))  # each may resume elsewhere
                for conn in shed:
                    conn.send(Close(TRY_LATER, f"server over its latency bound (model {served.name}: p95 "
                                               f"{p95 * 1e3:.0f} ms): the newest streams are shed; reconnect later",
                                    retry_after_s=RETRY_AFTER_S))
                self.metrics.streams_shed.inc(n)
                await asyncio.sleep(SHED_SETTLE_S)

    async def close_all(self, code: int, detail: str) -> None:
        """Graceful shutdown: no new streams; every one-model stream is sent a final snapshot (so that its client
        resumes elsewhere and loses nothing), then every connection is told why and closed, waiting (bounded)."""
        self.draining = True
        for conn in list(self.connections):
            await conn.final_snapshot()
            conn.send(Close(code, detail))
        for gateway in list(self.gateways):  # after their streams' closes
            gateway.send(Close(code, detail))
        deadline = asyncio.get_running_loop().time() + SENDER_DRAIN_S
        while (self.connections or self.gateways) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
