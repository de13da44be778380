"""The embedded default: an in-process exact cache (no Redis needed).

Bounded LRU with a TTL per entry: at most `max_entries_per_tenant` entries per tenant and
policy (the policy's bound) and `max_entries` in all (the process's bound); the least recently
used entry goes first. Lost on restart and not shared between workers: set `redis_url` for that.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from gateway.types import CachedAnswer

Scope = tuple[str, str]  # (tenant, policy)


class MemoryExactStore:
    """Exact entries in process memory, keyed by (tenant, policy) then fingerprint."""

    def __init__(self, max_entries: int = 10_000, clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._scopes: dict[Scope, OrderedDict[str, tuple[float, CachedAnswer]]] = {}
        self._recency: OrderedDict[tuple[Scope, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recency)

    async def get(self, tenant: str, policy: str, key: str) -> CachedAnswer | None:
        scope = (tenant, policy)
        entries = self._scopes.get(scope)
        found = entries.get(key) if entries else None
        if found is None:
            return None
        expires, answer = found
        if expires <= self._clock():
            self._drop(scope, key)
            return None
        entries.move_to_end(key)
        self._recency.move_to_end((scope, key))
        return answer

    async def put(self, tenant: str, policy: str, key: str, answer: CachedAnswer,
                  ttl_s: float, max_per_tenant: int) -> None:
        scope = (tenant, policy)
        entries = self._scopes.setdefault(scope, OrderedDict())
        entries[key] = (self._clock() + ttl_s, answer)
        entries.move_to_end(key)
        self._recency[(scope, key)] = None
        self._recency.move_to_end((scope, key))
        while len(entries) > max_per_tenant:
            self._drop(scope, next(iter(entries)))
        while len(self._recency) > self.max_entries:
            oldest_scope, oldest_key = next(iter(self._recency))
            self._drop(oldest_scope, oldest_key)

    def _drop(self, scope: Scope, key: str) -> None:
        entries = self._scopes.get(scope)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._scopes[scope]
        self._recency.pop((scope, key), None)

    async def purge(self, tenant: str, policy: str | None = None) -> int:
        scopes = [s for s in self._scopes if s[0] == tenant and policy in (None, s[1])]
        removed = 0
        for scope in scopes:
            for key in list(self._scopes.get(scope, {})):
                self._drop(scope, key)
                removed += 1
        return removed

    async def stats(self) -> dict[str, Any]:
        return {"backend": "memory", "entries": len(self),
                "max_entries": self.max_entries,
                "by_scope": {f"{t}/{p}": len(e) for (t, p), e in self._scopes.items()}}

    async def add_counts(self, counts: dict[str, int]) -> None:
        return None  # one process: its own counters are the whole story

    async def close(self) -> None:
        return None
