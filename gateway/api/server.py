"""The HTTP server: uvicorn, with a drain on SIGTERM.

On SIGTERM the gateway first says it is not ready (`/readyz` 503) for `shutdown_drain_s` while
still serving, so that a load balancer (or Kubernetes' endpoints) routes new requests away;
then uvicorn's graceful shutdown stops accepting connections and waits for the requests and
streams in flight to finish. A second SIGTERM (or Ctrl-C) skips what is left of the drain.
A worker of several (`gateway.api.workers`) stops so, drain included, when its supervisor is
gone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import FrameType

import uvicorn

from gateway.api.protocol import guarded_protocol
from gateway.service import Gateway

log = logging.getLogger("smallfirst")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_s: float,
                 supervisor: int | None = None) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_s = drain_s
        self.drain_until: float | None = None
        self.supervisor = supervisor

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and self.drain_until is None:
            self.gateway.draining = True
            self.drain_until = time.monotonic() + self.drain_s
            log.info("SIGTERM: draining for %.1f s (/readyz says not ready), then finishing "
                     "the requests in flight", self.drain_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.supervisor is not None and os.getppid() != self.supervisor \
                and self.drain_until is None and not self.should_exit:
            log.warning("the supervisor is gone: stopping")
            self.handle_exit(signal.SIGTERM, None)
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: object, gateway: Gateway, sockets: list[socket.socket] | None = None,
          supervisor: int | None = None) -> None:
    """Serve on `host:port`, or on inherited `sockets` (a worker of `supervisor`'s pid)."""
    settings = gateway.settings
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            timeout_keep_alive=settings.keep_alive_s,
                            http=guarded_protocol(settings.header_timeout_s,
                                                  settings.max_header_bytes))
    DrainingServer(config, gateway, settings.shutdown_drain_s, supervisor).run(sockets)
