"""uvicorn's HTTP protocol with a header deadline. uvicorn waits for a request's headers for ever (its keep-alive
timeout only runs between requests), so a client that opens connections and trickles header bytes (slowloris) holds
them open without bound. Here a connection must complete each request's headers within MSSSM_HEADER_TIMEOUT_S
seconds of its first byte (or of connecting), else it is closed. The body has its own deadline in the app (408)."""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = float(os.environ.get("MSSSM_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S))
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.send_400_response("Request headers not received in time.")
