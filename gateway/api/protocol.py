"""The HTTP/1.1 protocol the gateway serves on: uvicorn's httptools one, with the two limits
it lacks against slow or endless request heads (slowloris). Uvicorn's keep-alive timer is
reset by every byte, so a client trickling a header a byte at a time would hold its
connection forever, and it buffers header lines without bound. Here each request head must
arrive whole within `header_timeout_s` of the connection opening (or, on a kept-alive
connection, of the next request's first byte), in at most `max_header_bytes`; otherwise the
client gets a 408 or 431 and the connection is closed. Between requests, uvicorn's keep-alive
timer (`keep_alive_s`) closes an idle connection silently: a 408 written to an idle
connection would be read as the answer to the request a client is just sending on it. The
request body's own deadline is the ASGI guard's (`RequestGuard`)."""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("smallfirst.http")
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """The protocol class to hand uvicorn (`http=`), with these limits."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _idle = False  # between a response and the next request's first byte

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_done()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._idle:  # the next request on a kept-alive connection begins
                self._idle = False
                self._await_head()
            waiting = self._timer is not None
            super().data_received(data)
            if waiting and self._timer is not None:  # the head is still incomplete
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, f"Request headers exceed {max_header_bytes} bytes.")

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle = True  # keep-alive bounds the wait; the head's timer starts with it

        def _await_head(self) -> None:
            self._head_done()
            self._head_bytes = 0
            self._timer = self.loop.call_later(header_timeout_s, self._refuse, 408,
                                               "The request headers did not arrive in time.")

        def _head_done(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, status: int, message: str) -> None:
            self._head_done()
            if self.transport.is_closing():
                return
            log.info("closing a connection from %s: %s", self.client, message)
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                         "param": None, "code": None}}).encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
            self.transport.close()

    return GuardedHttpProtocol
