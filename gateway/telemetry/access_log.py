"""One structured JSON line per request on the `smallfirst.access` logger (no prompt text)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("smallfirst.access")


def write(**fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"ts": round(time.time(), 3), **fields}, separators=(",", ":")))
