"""One structured JSON line per request on the `smallfirst.access` logger (no prompt text).

The request only appends its fields to a queue; a writer thread wakes every 100 ms and
encodes and logs what is there, off the event loop, so a slow log sink (a full pipe, a
terminal) never stalls requests and a request never pays for waking a thread. What is still
queued when the process exits is written before it ends.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson

log = logging.getLogger("smallfirst.access")
INTERVAL_S = 0.1
_pending: deque[dict[str, Any]] = deque()
_writer: threading.Thread | None = None
_start_lock = threading.Lock()


def write(**fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        _pending.append({"ts": round(time.time(), 3), **fields})
        if _writer is None:
            _start()


def _start() -> None:
    global _writer
    with _start_lock:
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="access-log", daemon=True)
            _writer.start()
            atexit.register(_flush)


def _write_forever() -> None:
    while True:
        time.sleep(INTERVAL_S)
        _flush()


def _flush() -> None:
    while _pending:
        try:
            log.info(orjson.dumps(_pending.popleft()).decode())
        except IndexError:  # emptied by the other caller (exit) meanwhile
            return
        except Exception:  # one bad line must not end the access log
            logging.getLogger("smallfirst").exception("access log line dropped")
