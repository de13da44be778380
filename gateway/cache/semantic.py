"""The semantic index on the Redis Query Engine (FT.CREATE HNSW, FT.SEARCH KNN).

One hash per entry under `<prefix>:s:`, indexed with TAG fields for tenant, policy and the
context hash (everything but the final user turn) and an HNSW cosine VECTOR field. Every
search filters by all three tags; the tenant filter is not optional (an empty tenant is an
error), and each returned document's stored tenant is checked again before it is used.

What audits found about an entry (`gateway.cache.guard`) lives on the same hash, as plain
fields the search returns with each candidate (no extra round trip): `audits`,
`disagreements` and `min_probability` (the entry serves only pairs rated above it). They go
when the entry goes (TTL, eviction, purge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.cache.fingerprint import tag
from gateway.cache.redis_exact import Keys, track
from gateway.config import ConfigError
from gateway.types import CachedAnswer
from router import DIM


class QueryEngineMissing(ConfigError):
    """The Redis server has no FT.* commands (no Redis Query Engine / RediSearch)."""


# One audit's outcome, atomically (replicas share the entry): count it, raise the entry's bar
# to the disagreeing pair's probability (never lower it), and return the disagreements so far.
# A hash that expired meanwhile is left alone (no field would bring it back without a TTL).
AUDITED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], 'audits', 1)
if ARGV[1] ~= '1' then
  return tonumber(redis.call('HGET', KEYS[1], 'disagreements') or '0')
end
local bar = tonumber(redis.call('HGET', KEYS[1], 'min_probability') or '0')
if tonumber(ARGV[2]) > bar then redis.call('HSET', KEYS[1], 'min_probability', ARGV[2]) end
return redis.call('HINCRBY', KEYS[1], 'disagreements', 1)
"""


@dataclass(frozen=True)
class Candidate:
    text: str  # the cached request's final user turn
    answer: CachedAnswer
    cosine: float
    entry: str = ""  # the entry's key
    disagreements: int = 0  # audits that disagreed with its answer
    min_probability: float = 0.0  # serves only pairs the verifier rates above this


class SemanticIndex:
    def __init__(self, client: Any, keys: Keys, ef_runtime: int = 10) -> None:
        self.client = client
        self.keys = keys
        self.ef_runtime = ef_runtime
        self._audited = client.register_script(AUDITED)

    async def ensure(self) -> None:
        """Create the index if it is missing; QueryEngineMissing if the server cannot."""
        from redis.exceptions import ResponseError

        try:
            await self.client.execute_command("FT.INFO", self.keys.index)
            return
        except ResponseError as exc:
            message = str(exc).lower()
            if "unknown command" in message:
                raise QueryEngineMissing(
                    "the Redis server has no query engine (FT.* commands), which the semantic "
                    "cache needs: use Redis 8, Redis Stack, or Valkey with the search module, "
                    "or set cache_semantic: false"
                ) from exc
        try:
            await self.client.execute_command(
                "FT.CREATE", self.keys.index, "ON", "HASH",
                "PREFIX", "1", self.keys.semantic_prefix,
                "SCHEMA", "tenant", "TAG", "policy", "TAG", "ctx", "TAG",
                "vec", "VECTOR", "HNSW", "6", "TYPE", "FLOAT32", "DIM", str(DIM),
                "DISTANCE_METRIC", "COSINE",
            )
        except ResponseError as exc:
            if "already exists" not in str(exc).lower():
                raise

    async def put(self, tenant: str, policy: str, key: str, context: str, text: str,
                  vector: np.ndarray, answer: CachedAnswer, ttl_s: float,
                  max_per_tenant: int) -> None:
        """Store an entry, registered with the tenant's others for eviction."""
        name = self.keys.semantic(tenant, policy, key)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(name, mapping={
            "tenant": tag(tenant), "policy": tag(policy), "ctx": context,
            "vec": np.asarray(vector, dtype=np.float32).tobytes(),
            "owner": tenant, "text": text, "answer": json.dumps(answer.to_json()),
        })
        pipe.expire(name, int(ttl_s))
        await track(self.client, self.keys, pipe, tenant, policy, key, ttl_s, max_per_tenant)

    async def search(self, tenant: str, policy: str, context: str, vector: np.ndarray,
                     k: int = 3) -> list[Candidate]:
        """The k nearest entries of this tenant, policy and context, nearest first."""
        if not tenant:
            raise ValueError("a semantic search needs a tenant")
        query = (f"(@tenant:{{{tag(tenant)}}} @policy:{{{tag(policy)}}} @ctx:{{{context}}})"
                 f"=>[KNN {int(k)} @vec $vec EF_RUNTIME {self.ef_runtime} AS dist]")
        reply = await self.client.execute_command(
            "FT.SEARCH", self.keys.index, query,
            "PARAMS", "2", "vec", np.asarray(vector, dtype=np.float32).tobytes(),
            "SORTBY", "dist", "RETURN", "6", "dist", "owner", "text", "answer",
            "disagreements", "min_probability",
            "LIMIT", "0", str(int(k)), "DIALECT", "2",
        )
        return [c for c in (_candidate(name, fields, tenant) for name, fields in _documents(reply))
                if c]

    async def audited(self, entry: str, disagreed: bool, probability: float) -> int | None:
        """Record an audit of `entry`; its disagreements so far, or None if it is gone."""
        if not entry.startswith(self.keys.semantic_prefix):
            raise ValueError(f"not a semantic entry: {entry!r}")
        count = await self._audited(keys=[entry],
                                    args=["1" if disagreed else "0", repr(float(probability))])
        return None if int(count) < 0 else int(count)

    async def drop(self) -> None:
        await self.client.execute_command("FT.DROPINDEX", self.keys.index)


def _documents(reply: Any) -> list[tuple[str, dict[str, bytes]]]:
    """FT.SEARCH's RESP2 reply [total, id, [field, value, ...], ...] as (id, fields)."""
    docs = []
    for name, fields in zip(reply[1::2], reply[2::2], strict=False):
        docs.append((_s(name), {_s(fields[i]): fields[i + 1]
                                for i in range(0, len(fields) - 1, 2)}))
    return docs


def _candidate(name: str, fields: dict[str, Any], tenant: str) -> Candidate | None:
    if _s(fields.get("owner", b"")) != tenant:
        return None  # defence in depth: never serve another tenant's entry
    try:
        answer = CachedAnswer.from_json(json.loads(fields["answer"]))
        return Candidate(_s(fields["text"]), answer, 1.0 - float(fields["dist"]), name,
                         int(fields.get("disagreements") or 0),
                         float(fields.get("min_probability") or 0.0))
    except (KeyError, ValueError, TypeError):
        return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
