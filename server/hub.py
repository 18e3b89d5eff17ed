"""The open streams of one app: admission (API key, draining, max streams, the latency bound), shedding the newest
streams while a model stays over its bound, and closing them all on shutdown."""

from __future__ import annotations

import asyncio
import math
import time

from starlette.websockets import WebSocket

from .auth import key_matches, missing_key_detail, offered_key
from .metrics import Metrics
from .registry import ServedModel
from .session import Close
from .settings import Settings
from .streaming import POLICY, RETRY_AFTER_S, SENDER_DRAIN_S, TRY_LATER, Connection

# Shedding: admission looks at latency, so streams that connect together before their load shows are all admitted.
# While a model stays over its bound, the newest streams are closed (1013, after a final snapshot so that they resume
# elsewhere): as many as leave the load the batcher kept up with over the last window times SHED_TARGET_LOAD (the
# headroom in which the backlog of those kept drains), and then none again until the window has seen the lighter
# load. Sized by throughput rather than by how far latency is over the bound: the backlog keeps latency high for a
# while after a shed, so a rule on latency sheds in steps, each kept stream's backlog growing in between (887 of
# 1,300 shed, kept p99 2.3 s). One shed on throughput errs the other way: past capacity the receive path takes CPU
# from the batcher, so the share kept up with reads low (256 of 1,300 kept where ~650 fit, kept p99 21 ms). Shedding
# in halves instead measured worse (kept p99 664 ms): a short transient beats a long one.
# Over the bound while keeping up with KEPT_UP_ENOUGH of the load or more, a model sheds only after SUSTAINED_S: a
# burst of connections or one slow call lifts latency for a moment while throughput keeps up (700 streams that
# connected together on 2 workers: p99 40 ms after the burst, yet 44 were shed at once under the rule without it),
# and admission alone holds new streams off until it passes. Past capacity the share falls at once and shedding
# starts; just past it (the share near 1, backlog growing slowly) the latency stays over the bound and it starts
# after SUSTAINED_S.
SHED_EVERY_S = 0.25
SHED_SETTLE_S = 2.0  # after a shed: the batcher's latency and rate windows, so that they have seen the lighter load
SHED_TARGET_LOAD = 0.85
KEPT_UP_ENOUGH = 0.97
SUSTAINED_S = 4.0


class StreamHub:
    """The open connections of one app: admission, shedding, the active-streams gauge, shutdown."""

    def __init__(self, models: dict[str, ServedModel], default: str, settings: Settings, metrics: Metrics):
        self.models, self.default, self.settings, self.metrics = models, default, settings, metrics
        self.connections: dict[Connection, None] = {}  # insertion order: the newest last (shedding takes those)
        self.draining = False  # set on SIGTERM: no new streams; open ones get a final snapshot and close 1001
        self._shedder: asyncio.Task | None = None

    def authorized(self, ws: WebSocket) -> bool:
        key = self.settings.api_key
        return key is None or key_matches(offered_key(ws.headers, ws.query_params, "/stream"), key)

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()  # a close code and an error message can only be sent on an accepted socket
        conn = Connection(self, ws)
        if not self.authorized(ws):
            return await conn.refuse(Close(POLICY, missing_key_detail("/stream")))
        if self.draining:
            return await conn.refuse(Close(TRY_LATER, "server draining for a restart; connect again (another replica "
                                                      "takes the stream)"))
        if len(self.connections) >= self.settings.max_streams:
            return await conn.refuse(Close(TRY_LATER, "server full, try later"), retry_after_s=RETRY_AFTER_S)
        loaded = [(m.name, p95) for m in self.models.values() if (p95 := m.batcher.overloaded()) is not None]
        if loaded:
            name, p95 = loaded[0]
            return await conn.refuse(Close(TRY_LATER, f"server at its latency bound (model {name}: p95 "
                                                      f"{p95 * 1e3:.0f} ms), try later"), retry_after_s=RETRY_AFTER_S)
        self.connections[conn] = None
        self.metrics.active_streams.set(len(self.connections))
        if self._shedder is None or self._shedder.done():
            self._shedder = asyncio.get_running_loop().create_task(self._shed_while_overloaded(), name="shedder")
        try:
            await conn.run()
        finally:
            self.connections.pop(conn, None)
            self.metrics.active_streams.set(len(self.connections))

    async def _shed_while_overloaded(self) -> None:
        """While streams are open: when a model is over its latency bound and falling behind (or over it for
        SUSTAINED_S), close the newest streams of that model, keeping SHED_TARGET_LOAD times the share of the load it
        kept up with (the oldest stream is never shed), then wait a window."""
        over_since: dict[str, float] = {}  # model -> since when it has been over its bound without a break
        while self.connections and not self.draining:
            await asyncio.sleep(SHED_EVERY_S)
            for served in self.models.values():
                p95 = served.batcher.overloaded()
                if p95 is None:
                    over_since.pop(served.name, None)
                    continue
                now = time.monotonic()
                share = served.batcher.kept_up_share()
                if share >= KEPT_UP_ENOUGH and now - over_since.setdefault(served.name, now) < SUSTAINED_S:
                    continue
                mine = [c for c in self.connections if any(r.served is served for r in c.routes)]
                keep = max(1, math.floor(len(mine) * SHED_TARGET_LOAD * share))
                n = len(mine) - keep
                if n <= 0:
                    continue
                shed = mine[len(mine) - n :]
                await asyncio.gather(*(conn.final_snapshot() for conn in shed))  # each may resume elsewhere
                for conn in shed:
                    conn.send(Close(TRY_LATER, f"server over its latency bound (model {served.name}: p95 "
                                               f"{p95 * 1e3:.0f} ms): the newest streams are shed; reconnect later",
                                    retry_after_s=RETRY_AFTER_S))
                self.metrics.streams_shed.inc(n)
                await asyncio.sleep(SHED_SETTLE_S)
                over_since.pop(served.name, None)

    async def close_all(self, code: int, detail: str) -> None:
        """Graceful shutdown: no new streams; every one-model stream is sent a final snapshot (so that its client
        resumes elsewhere and loses nothing), then every connection is told why and closed, waiting (bounded)."""
        self.draining = True
        for conn in list(self.connections):
            await conn.final_snapshot()
            conn.send(Close(code, detail))
        deadline = asyncio.get_running_loop().time() + SENDER_DRAIN_S
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
