"""One structured JSON line per request on the `smallfirst.access` logger (no prompt text).

The request only queues its fields: a writer thread encodes and logs them, off the event
loop, so that a slow log sink (a full pipe, a terminal) never stalls requests. What is still
queued when the process exits is written before it ends.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Any

import orjson

log = logging.getLogger("smallfirst.access")
_STOP = object()
_lines: queue.SimpleQueue | None = None
_start_lock = threading.Lock()


def write(**fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        (_lines or _start()).put({"ts": round(time.time(), 3), **fields})


def _start() -> queue.SimpleQueue:
    global _lines
    with _start_lock:
        if _lines is None:
            lines: queue.SimpleQueue = queue.SimpleQueue()
            writer = threading.Thread(target=_drain, args=(lines,), name="access-log",
                                      daemon=True)
            writer.start()
            atexit.register(_flush, lines, writer)
            _lines = lines
    return _lines


def _drain(lines: queue.SimpleQueue) -> None:
    while (fields := lines.get()) is not _STOP:
        try:
            log.info(orjson.dumps(fields).decode())
        except Exception:  # one bad line must not end the access log
            logging.getLogger("smallfirst").exception("access log line dropped")


def _flush(lines: queue.SimpleQueue, writer: threading.Thread) -> None:
    lines.put(_STOP)
    writer.join(timeout=5)
