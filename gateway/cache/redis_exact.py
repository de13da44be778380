"""The Redis side of the cache: key names, the connection, the exact store and its bounds.

Key layout (prefix `smallfirst` by default; tenant and policy names percent-encoded so that no
name can reach into another's keys or glob patterns):

    <prefix>:x:<tenant>:<policy>:<fingerprint>   exact answer (JSON string, with TTL)
    <prefix>:s:<tenant>:<policy>:<fingerprint>   semantic entry (hash, indexed, with TTL; its
                                                 audit fields too: see gateway.cache.guard)
    <prefix>:n:<tenant>:<policy>                 sorted set of fingerprints by expiry time
    <prefix>:idx                                 the semantic search index
    <prefix>:stats                               hit/miss counters

Each (tenant, policy) holds at most the policy's `max_entries_per_tenant` entries: past it, the
entries closest to expiry (the oldest, for one TTL) are evicted, exact and semantic together.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote, unquote

from gateway.types import CachedAnswer

ENTRY_KINDS = ("x", "s")


def _name(value: str) -> str:
    return quote(value, safe="") or "%00"


class Keys:
    """Every Redis key the cache uses, built from one prefix."""

    def __init__(self, prefix: str = "smallfirst") -> None:
        self.prefix = prefix
        self.index = f"{prefix}:idx"
        self.stats = f"{prefix}:stats"
        self.semantic_prefix = f"{prefix}:s:"

    def _scope(self, kind: str, tenant: str, policy: str) -> str:
        return f"{self.prefix}:{kind}:{_name(tenant)}:{_name(policy)}"

    def exact(self, tenant: str, policy: str, key: str) -> str:
        return f"{self._scope('x', tenant, policy)}:{key}"

    def semantic(self, tenant: str, policy: str, key: str) -> str:
        return f"{self._scope('s', tenant, policy)}:{key}"

    def entries(self, tenant: str, policy: str) -> str:
        return self._scope("n", tenant, policy)

    def of_entry(self, tenant: str, policy: str, key: str) -> list[str]:
        return [f"{self._scope(kind, tenant, policy)}:{key}" for kind in ENTRY_KINDS]

    def patterns(self, tenant: str, policy: str | None) -> list[str]:
        """Glob patterns matching every key of a tenant (and policy)."""
        scope = f"{_name(tenant)}:{'*' if policy is None else _name(policy)}"
        return [f"{self.prefix}:x:{scope}:*", f"{self.prefix}:s:{scope}:*",
                f"{self.prefix}:n:{scope}"]


MAX_CONNECTIONS = 100  # per client; each call holds one for well under a millisecond


def connect(url: str, timeout_s: float = 0.25, max_connections: int = MAX_CONNECTIONS) -> Any:
    """An asyncio Redis client with short timeouts (a slow Redis must not stall requests).

    Past `max_connections` calls in flight, a call waits up to `timeout_s` for a connection
    to come free. redis-py's own pool fails it at once ("Too many connections", 100 by
    default): a burst of requests opened the cache's circuit on a healthy Redis."""
    import redis.asyncio as redis

    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, protocol=2,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0,
        retry_on_timeout=False,
    )
    return redis.Redis.from_pool(pool)


class RedisExactStore:
    """Exact entries in Redis, with per-(tenant, policy) bounds."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def get(self, tenant: str, policy: str, key: str) -> CachedAnswer | None:
        raw = await self.client.get(self.keys.exact(tenant, policy, key))
        return CachedAnswer.from_json(json.loads(raw)) if raw else None

    async def put(self, tenant: str, policy: str, key: str, answer: CachedAnswer,
                  ttl_s: float, max_per_tenant: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.exact(tenant, policy, key), json.dumps(answer.to_json()),
                 ex=int(ttl_s))
        await track(self.client, self.keys, pipe, tenant, policy, key, ttl_s, max_per_tenant)

    async def purge(self, tenant: str, policy: str | None = None) -> int:
        """Delete every entry of a tenant (and policy); returns how many keys went."""
        removed = 0
        for pattern in self.keys.patterns(tenant, policy):
            batch: list[Any] = []
            async for name in self.client.scan_iter(match=pattern, count=500):
                batch.append(name)
                if len(batch) >= 500:
                    removed += await self.client.delete(*batch)
                    batch = []
            if batch:
                removed += await self.client.delete(*batch)
        return removed

    async def stats(self) -> dict[str, Any]:
        counters = await self.client.hgetall(self.keys.stats)
        scopes: dict[str, int] = {}
        async for name in self.client.scan_iter(match=f"{self.keys.prefix}:n:*", count=500):
            tenant, policy = _text(name).split(":n:", 1)[1].split(":", 1)
            scopes[f"{unquote(tenant)}/{unquote(policy)}"] = await self.client.zcard(name)
        info = await self.client.info("memory")
        counts = {_text(k): int(v) for k, v in counters.items()}
        return {"backend": "redis", "entries_by_scope": scopes,
                "entries": sum(scopes.values()), "counters": counts,
                "semantic_audits": audit_summary(counts),
                "used_memory": info.get("used_memory_human")}

    async def add_counts(self, counts: dict[str, int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for field, value in counts.items():
            pipe.hincrby(self.keys.stats, field, value)
        await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()


async def track(client: Any, keys: Keys, pipe: Any, tenant: str, policy: str, key: str,
                ttl_s: float, max_per_tenant: int) -> None:
    """Run `pipe` with the entry registered, then evict past the bound (an entry's exact and
    semantic keys go together)."""
    now = time.time()
    entries = keys.entries(tenant, policy)
    pipe.zadd(entries, {key: now + ttl_s})
    pipe.zremrangebyscore(entries, "-inf", now)
    pipe.expire(entries, int(ttl_s) + 60)
    pipe.zcard(entries)
    size = (await pipe.execute())[-1]
    if size > max_per_tenant:
        evicted = await client.zpopmin(entries, size - max_per_tenant)
        names = [k for member, _ in evicted for k in keys.of_entry(tenant, policy, _text(member))]
        if names:
            await client.delete(*names)


def audit_summary(counters: dict[str, int]) -> dict[str, int]:
    """The semantic-hit audits (`gateway.cache.guard`) in the shared counters, all replicas."""
    agree, disagree = counters.get("audit_agree", 0), counters.get("audit_disagree", 0)
    return {"audits": agree + disagree, "agreements": agree, "disagreements": disagree,
            "skipped_budget": counters.get("audit_skipped_budget", 0),
            "failed": counters.get("audit_failed", 0),
            "entries_stopped": counters.get("audit_entries_stopped", 0),
            "candidates_withheld": counters.get("audit_withheld", 0)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
