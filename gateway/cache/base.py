"""What the engine needs from a response cache, and what the cache needs from an exact store.

An answer is stored once, complete (content pieces as they were streamed, tool calls, finish
reason, usage, model), and replayed either as a `chat.completion` or as a chunk stream whose
pieces match the original's, so a cached stream equals the original to the byte in content.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.types import CachedAnswer, CacheHit, CacheRequest


class ResponseCache(Protocol):
    async def lookup(self, request: CacheRequest) -> CacheHit | None:
        """A hit to serve, or None. Must never raise: a broken cache is a miss."""
        ...

    async def lookup_staged(self, request: CacheRequest) -> tuple[CacheHit | None, Any]:
        """An exact hit now, or on a miss the slower layers' search started (or None), for
        `settle` to read: the caller may run other work meanwhile. Must never raise."""
        ...

    async def settle(self, pending: Any) -> CacheHit | None:
        """A started search's hit, waited for until its deadline at most. Never raises."""
        ...

    async def store(self, request: CacheRequest, answer: CachedAnswer) -> None:
        """Remember a complete answer. Must never raise: a broken cache skips the write."""
        ...


class ExactStore(Protocol):
    """Answers by exact key, per tenant and policy: in process or in Redis."""

    async def get(self, tenant: str, policy: str, key: str) -> CachedAnswer | None: ...

    async def put(self, tenant: str, policy: str, key: str, answer: CachedAnswer,
                  ttl_s: float, max_per_tenant: int) -> None: ...

    async def purge(self, tenant: str, policy: str | None = None) -> int: ...

    async def stats(self) -> dict[str, Any]: ...

    async def add_counts(self, counts: dict[str, int]) -> None:
        """Fold this process's hit counters into the shared ones."""
        ...

    async def close(self) -> None: ...
