"""A per-minute allowance, smoothly refilled: how often background work (shadow calls, cache
audits) may run; shared by replicas through Redis where one is configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("smallfirst.ratelimit")


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


SHARED_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local per_minute = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or per_minute
local at = tonumber(state[2]) or now
tokens = math.min(per_minute, tokens + math.max(0, now - at) * per_minute / 60)
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at',
           string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], 120)
return taken
"""


class Allowances:
    """Named per-minute allowances: in Redis when given a client, so that every replica draws
    from one bucket; in this process without one, or while Redis does not answer (each
    replica then spends its own allowance: a budget overrun bounded by the replica count)."""

    def __init__(self, client: Any = None, prefix: str = "smallfirst") -> None:
        self.client = client
        self.prefix = prefix
        self._local: dict[str, TokenBucket] = {}
        self._warned = -60.0

    async def take(self, name: str, per_minute: float) -> bool:
        if self.client is not None:
            try:
                return bool(await self.client.eval(
                    SHARED_TAKE, 1, f"{self.prefix}:allowance:{name}", per_minute))
            except Exception as exc:
                if time.monotonic() - self._warned >= 60:  # once a minute, not per request
                    self._warned = time.monotonic()
                    log.warning("allowances: Redis unreachable (%s); counted in this process",
                                exc)
        bucket = self._local.get(name)
        if bucket is None or bucket.per_minute != per_minute:
            bucket = self._local[name] = TokenBucket(per_minute)
        return bucket.take()
