"""A per-minute allowance, smoothly refilled: how often background work (shadow calls, cache
audits) may run."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """At most `per_minute` takes a minute, smoothly refilled."""

    def __init__(self, per_minute: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.tokens = per_minute
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.per_minute,
                          self.tokens + (now - self.updated) * self.per_minute / 60)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
