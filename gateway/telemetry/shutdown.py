"""Telemetry ends within a bound: a collector that is down or hung must not hold up exit.

The SDK's providers flush on shutdown and wait for their exporters, each up to its own
timeout (10 s by default, 30 s and more when configured). Shutting down runs here in a daemon
thread, waited on for `timeout_s` at most; what has not been exported by then is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("smallfirst.telemetry")
SHUTDOWN_S = 2.0


def shutdown_within(providers: Iterable[Any], timeout_s: float = SHUTDOWN_S) -> bool:
    """Shut the providers down (flushing what they hold); False if that took too long."""
    providers = list(providers)
    if not providers:
        return True
    thread = threading.Thread(target=lambda: [p.shutdown() for p in providers],
                              name="telemetry-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("telemetry: the collector did not take the last export within %.0f s; "
                    "dropped", timeout_s)
        return False
    return True
