"""Per-tenant and per-key rate limits: requests and tokens per minute, concurrent streams.

With Redis the counts are shared by every replica (one atomic script per admission, the clock
is Redis's own); without it they are counted in this process. A limit reached is a 429 with
`Retry-After`.

Windows slide: a scope's requests (and tokens) of the last 60 s are a sorted set of entries
`uid|amount` scored by time, plus their running total, so an admission costs O(1) amortized
and never admits more than the limit in any 60 s. Tokens are known only when a request ends:
a request is refused while the window's tokens are already at the limit, and its own tokens
count from its end. A stream holds a lease (a sorted-set member scored by its expiry),
renewed while it runs: a replica killed mid-stream frees its slots when the lease runs out.

Redis unreachable: each replica enforces the limits on its own counts until Redis answers
again (so at most replicas x limit); logged, never a failed request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import RateLimited

log = logging.getLogger("smallfirst.limits")
WINDOW_S = 60
RETRY_REDIS_S = 1.0  # after a Redis failure, counted in-process this long before retrying

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local uid, window, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function used(log, total)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
  if #old > 0 then
    local gone = 0
    for _, entry in ipairs(old) do gone = gone + tonumber(string.match(entry, '[^|]*$')) end
    redis.call('DECRBY', total, gone)
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
  end
  return tonumber(redis.call('GET', total) or '0')
end

local function wait(log)
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return '1' end
  return tostring(tonumber(oldest[2]) + window - now)
end

local scopes = #KEYS / 5
for i = 0, scopes - 1 do
  local k, a = 5 * i, 4 + 3 * i
  local rpm, tpm, streams = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if rpm >= 0 and used(KEYS[k + 1], KEYS[k + 2]) >= rpm then
    return {i, 'requests', wait(KEYS[k + 1])}
  end
  if tpm >= 0 and used(KEYS[k + 3], KEYS[k + 4]) >= tpm then
    return {i, 'tokens', wait(KEYS[k + 3])}
  end
  if streams >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 5]) >= streams then return {i, 'streams', '1'} end
  end
end
for i = 0, scopes - 1 do
  local k, a = 5 * i, 4 + 3 * i
  if tonumber(ARGV[a]) >= 0 then
    redis.call('ZADD', KEYS[k + 1], now, uid .. '|1')
    redis.call('INCR', KEYS[k + 2])
    redis.call('EXPIRE', KEYS[k + 1], 2 * window)
    redis.call('EXPIRE', KEYS[k + 2], 2 * window)
  end
  if tonumber(ARGV[a + 2]) >= 0 then
    redis.call('ZADD', KEYS[k + 5], now + lease, uid)
    redis.call('EXPIRE', KEYS[k + 5], math.ceil(2 * lease))
  end
end
return {-1, '', '0'}
"""

SPEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, #KEYS, 2 do
  redis.call('ZADD', KEYS[i], now, ARGV[1] .. '|' .. ARGV[2])
  redis.call('INCRBY', KEYS[i + 1], ARGV[2])
  redis.call('EXPIRE', KEYS[i], 2 * tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[i + 1], 2 * tonumber(ARGV[3]))
end
"""


class Limits(BaseModel):
    """Limits of one scope (a tenant, or one API key); unset: no limit."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0,
                                          description="Prompt plus completion tokens.")
    concurrent_streams: int | None = Field(default=None, ge=0)

    def over(self, override: Limits | None) -> Limits:
        """These limits with the fields `override` sets replaced."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_unset=True))

    @property
    def limited(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class RateLimitConfig(BaseModel):
    """Defaults for every tenant and every key; the keys file may override them per tenant."""

    model_config = ConfigDict(extra="forbid")
    tenant: Limits = Field(default_factory=Limits, description="Each tenant, all its keys.")
    key: Limits = Field(default_factory=Limits, description="Each API key on its own.")
    stream_lease_s: float = Field(
        default=60.0, gt=0, description="A stream's slot is renewed while it runs; a replica "
        "killed mid-stream frees it after this long.")


@dataclass
class Scope:
    name: str  # tenant:NAME or key:ID
    limits: Limits


@dataclass
class Admission:
    """What one admitted request holds: its scopes, its stream leases, where it was counted."""

    uid: str
    scopes: list[Scope]
    shared: bool  # counted in Redis (else in this process)
    released: bool = False


class RateLimiter:
    def __init__(self, config: RateLimitConfig, client: Any = None,
                 prefix: str = "smallfirst") -> None:
        self.config = config
        self.client = client
        self.prefix = prefix
        self.local = LocalCounts()
        self._leases: dict[str, Admission] = {}
        self._down_until = 0.0
        self._tasks: set[asyncio.Task] = set()
        # (limit, scope, counted): a refusal, for the metrics the composition root hands in
        self.refused: Callable[[str, str, str], None] | None = None

    def scopes(self, tenant: Any, *, stream: bool) -> list[Scope]:
        """The limited scopes of a request from `tenant` (a gateway.api.auth.Tenant)."""
        scopes = [Scope(f"tenant:{quote(tenant.name, safe='')}",
                        self.config.tenant.over(tenant.limits))]
        if tenant.key_id:
            scopes.append(Scope(f"key:{tenant.key_id}", self.config.key.over(tenant.key_limits)))
        if not stream:  # a stream limit binds only streams
            for scope in scopes:
                scope.limits = scope.limits.model_copy(update={"concurrent_streams": None})
        return [s for s in scopes if s.limits.limited]

    async def admit(self, tenant: Any, *, stream: bool) -> Admission | None:
        """Count one request against its tenant's and key's limits, or raise RateLimited."""
        scopes = self.scopes(tenant, stream=stream)
        if not scopes:
            return None
        admission = Admission(uuid.uuid4().hex, scopes, shared=self._redis_up())
        refusal = None
        if admission.shared:
            try:
                refusal = await self._admit_shared(admission)
            except Exception as exc:
                self._failed(exc)
                admission.shared = False
        if not admission.shared:
            refusal = self.local.admit(admission)
        if refusal is not None:
            scope, kind, _ = refusal
            if self.refused is not None:
                self.refused(kind, scope.name.split(":", 1)[0],
                             "redis" if admission.shared else "process")
            raise _refused(*refusal)
        if stream and admission.shared:
            self._leases[admission.uid] = admission
        return admission

    def release(self, admission: Admission | None, tokens: int) -> None:
        """The request ended: free its stream slot, count its tokens (in the background)."""
        if admission is None or admission.released:
            return
        admission.released = True
        self._leases.pop(admission.uid, None)
        if not admission.shared:
            self.local.release(admission, tokens)
            return
        task = asyncio.ensure_future(self._release_shared(admission, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def renew_forever(self) -> None:
        """Keep this process's stream leases alive (a third of the lease between renewals)."""
        while True:
            await asyncio.sleep(self.config.stream_lease_s / 3)
            if self._leases and self._redis_up():
                try:
                    await self._renew()
                except Exception as exc:
                    self._failed(exc)

    async def close(self) -> None:
        """Finish pending releases, then close the Redis client (the last of its users)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    # ---- Redis -----------------------------------------------------------------------------

    def _keys(self, scope: Scope) -> list[str]:
        base = f"{self.prefix}:rl:{scope.name}"
        return [f"{base}:req", f"{base}:req:n", f"{base}:tok", f"{base}:tok:n",
                f"{base}:streams"]

    async def _admit_shared(self, admission: Admission) -> tuple[Scope, str, float] | None:
        keys: list[str] = []
        args: list[Any] = [admission.uid, WINDOW_S, self.config.stream_lease_s]
        for scope in admission.scopes:
            keys += self._keys(scope)
            limits = scope.limits
            args += [-1 if v is None else v for v in (
                limits.requests_per_minute, limits.tokens_per_minute,
                limits.concurrent_streams)]
        index, kind, wait = await self.client.eval(ADMIT, len(keys), *keys, *args)
        if int(index) < 0:
            return None
        return admission.scopes[int(index)], _text(kind), float(wait)

    async def _release_shared(self, admission: Admission, tokens: int) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            spend = [k for s in admission.scopes if s.limits.tokens_per_minute is not None
                     for k in self._keys(s)[2:4]]
            if spend and tokens > 0:
                pipe.eval(SPEND, len(spend), *spend, admission.uid, tokens, WINDOW_S)
            for scope in admission.scopes:
                if scope.limits.concurrent_streams is not None:
                    pipe.zrem(self._keys(scope)[4], admission.uid)
            await pipe.execute()
        except Exception as exc:
            self._failed(exc)

    async def _renew(self) -> None:
        seconds, micros = await self.client.time()
        expiry = seconds + micros / 1e6 + self.config.stream_lease_s
        pipe = self.client.pipeline(transaction=False)
        for admission in list(self._leases.values()):
            for scope in admission.scopes:
                if scope.limits.concurrent_streams is not None:
                    pipe.zadd(self._keys(scope)[4], {admission.uid: expiry}, xx=True)
        await pipe.execute()

    def _redis_up(self) -> bool:
        return self.client is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("rate limits: Redis unreachable (%s); counting in this process for "
                        "now", exc)
        self._down_until = time.monotonic() + RETRY_REDIS_S


@dataclass
class _Window:
    entries: deque = field(default_factory=deque)  # (time, amount)
    total: int = 0

    def used(self, now: float) -> int:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]
        return self.total

    def add(self, now: float, amount: int) -> None:
        self.entries.append((now, amount))
        self.total += amount

    def wait(self, now: float) -> float:
        return self.entries[0][0] + WINDOW_S - now if self.entries else 1.0


class LocalCounts:
    """The same limits counted in this process: no Redis, or Redis unreachable."""

    def __init__(self) -> None:
        self.requests: dict[str, _Window] = {}
        self.tokens: dict[str, _Window] = {}
        self.streams: dict[str, set[str]] = {}

    def admit(self, admission: Admission) -> tuple[Scope, str, float] | None:
        now = time.monotonic()
        for scope in admission.scopes:
            limits = scope.limits
            requests = self.requests.setdefault(scope.name, _Window())
            tokens = self.tokens.setdefault(scope.name, _Window())
            streams = self.streams.setdefault(scope.name, set())
            if limits.requests_per_minute is not None \
                    and requests.used(now) >= limits.requests_per_minute:
                return scope, "requests", requests.wait(now)
            if limits.tokens_per_minute is not None \
                    and tokens.used(now) >= limits.tokens_per_minute:
                return scope, "tokens", tokens.wait(now)
            if limits.concurrent_streams is not None \
                    and len(streams) >= limits.concurrent_streams:
                return scope, "streams", 1.0
        for scope in admission.scopes:
            if scope.limits.requests_per_minute is not None:
                self.requests[scope.name].add(now, 1)
            if scope.limits.concurrent_streams is not None:
                self.streams[scope.name].add(admission.uid)
        return None

    def release(self, admission: Admission, tokens: int) -> None:
        now = time.monotonic()
        for scope in admission.scopes:
            if scope.limits.tokens_per_minute is not None and tokens > 0:
                self.tokens[scope.name].add(now, tokens)
            self.streams.get(scope.name, set()).discard(admission.uid)


def _refused(scope: Scope, kind: str, wait: float) -> RateLimited:
    limits = scope.limits
    limit = {"requests": f"{limits.requests_per_minute} requests per minute",
             "tokens": f"{limits.tokens_per_minute} tokens per minute",
             "streams": f"{limits.concurrent_streams} concurrent streams"}[kind]
    who = "this API key" if scope.name.startswith("key:") else "this tenant"
    seconds = max(1, math.ceil(wait))
    return RateLimited(f"Rate limit reached for {who}: {limit}. Please try again in "
                       f"{seconds}s.", retry_after=seconds)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
