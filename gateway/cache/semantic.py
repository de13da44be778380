"""The semantic index on the Redis Query Engine (FT.CREATE HNSW, FT.SEARCH KNN).

One hash per entry under `<prefix>:s:`, indexed with TAG fields for tenant, policy and the
context hash (everything but the final user turn) and an HNSW cosine VECTOR field. Every
search filters by all three tags; the tenant filter is not optional (an empty tenant is an
error), and each returned document's stored tenant is checked again before it is used.
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


@dataclass(frozen=True)
class Candidate:
    text: str  # the cached request's final user turn
    answer: CachedAnswer
    cosine: float


class SemanticIndex:
    def __init__(self, client: Any, keys: Keys, ef_runtime: int = 10) -> None:
        self.client = client
        self.keys = keys
        self.ef_runtime = ef_runtime

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
            "SORTBY", "dist", "RETURN", "4", "dist", "owner", "text", "answer",
            "LIMIT", "0", str(int(k)), "DIALECT", "2",
        )
        return [c for c in (_candidate(fields, tenant) for fields in _documents(reply)) if c]

    async def drop(self) -> None:
        await self.client.execute_command("FT.DROPINDEX", self.keys.index)


def _documents(reply: Any) -> list[dict[str, bytes]]:
    """FT.SEARCH's RESP2 reply [total, id, [field, value, ...], ...] as field dicts."""
    docs = []
    for fields in reply[2::2]:
        docs.append({_s(fields[i]): fields[i + 1] for i in range(0, len(fields) - 1, 2)})
    return docs


def _candidate(fields: dict[str, Any], tenant: str) -> Candidate | None:
    if _s(fields.get("owner", b"")) != tenant:
        return None  # defence in depth: never serve another tenant's entry
    try:
        answer = CachedAnswer.from_json(json.loads(fields["answer"]))
        return Candidate(_s(fields["text"]), answer, 1.0 - float(fields["dist"]))
    except (KeyError, ValueError, TypeError):
        return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
