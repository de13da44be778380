"""The response cache the engine calls: exact first, then semantic, never a failure.

Lookup reads the exact store first; on an exact miss, the embedding starts (in a worker
thread) and the semantic index is searched with the tenant, policy and context-hash filter,
and the nearest candidates must pass the pair verifier. The engine runs that semantic stage
alongside the small model's request (`lookup_staged`, then `settle`): the search may go on
while the answer is not ready, but once it is, or once the frontier would be asked, it is
given up past the policy's deadline. On any Redis error the request proceeds as a miss.
After an error (also one that ends a lookup given up at its deadline: a paused or slow
Redis) the circuit opens: the cache stays out of the way for `retry_after_s`, then tries
again, so a dead Redis costs nothing and a returning one is used at once. A Redis restarted
empty loses the search index; the next lookup recreates it. An embedder that fails costs the
semantic layer only.

With a semantic index the cache has a `guard` (`gateway.cache.guard`): the engine hands it
each semantic hit, a sample of which the small model re-answers in the background. A
candidate the audits stopped (two disagreements) is skipped, and one with a raised bar must
be rated above it; both read from the search's own reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.cache.base import ExactStore
from gateway.cache.fingerprint import context_hash, exact_key, final_user_text, is_multi_turn
from gateway.cache.guard import STOP_AFTER, CacheGuard, SemanticHit
from gateway.cache.memory import MemoryExactStore
from gateway.cache.redis_exact import RedisExactStore, audit_summary
from gateway.cache.semantic import Candidate, SemanticIndex
from gateway.policy import CacheSettings
from gateway.types import CachedAnswer, CacheHit, CacheRequest
from router import Embed, PairDiff, PairVerifier, cache_vector, changed_part_cosines, windows

log = logging.getLogger("smallfirst.cache")

SettingsFor = Callable[[str], CacheSettings | None]
PENDING_VECTORS = 1024


@dataclass(frozen=True)
class _Semantic:
    text: str
    context: str


@dataclass(frozen=True)
class PendingLookup:
    """A semantic search under way (`LayeredCache.lookup_staged`); `settle` reads it."""

    search: asyncio.Task  # never raises: a broken cache is a miss
    deadline: float  # the event loop's time past which it may be given up


class LayeredCache:
    """`ResponseCache`: an exact store (memory or Redis) and, with Redis, a semantic index."""

    def __init__(
        self,
        exact: ExactStore,
        settings_for: SettingsFor,
        semantic: SemanticIndex | None = None,
        verifier: PairVerifier | None = None,
        embed: Embed | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self.exact = exact
        self.semantic = semantic if verifier is not None and embed is not None else None
        self.verifier = verifier
        self._settings_for = settings_for
        self._embed = embed
        self.retry_after_s = retry_after_s
        self.counts: Counter[str] = Counter()
        self._flushed: Counter[str] = Counter()
        self._down_until = 0.0
        self._error: str | None = None  # the last Redis failure, until a call succeeds
        self._failed_at = -math.inf  # when it failed (a call begun before says nothing)
        self._index_ready = False
        self._vectors: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.guard = CacheGuard(self._audited, self.counts) if self.semantic is not None else None

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the search index (QueryEngineMissing if impossible).

        An unreachable Redis is not fatal: the gateway serves misses until it answers.
        """
        if self.semantic is not None:
            from redis.exceptions import ConnectionError as Unreachable
            from redis.exceptions import TimeoutError as TooSlow

            try:
                await self.semantic.ensure()
                self._index_ready = True
            except (Unreachable, TooSlow, OSError) as exc:
                log.warning("cache: Redis unreachable at start (%s); serving misses", exc)
                self._error = f"{type(exc).__name__}: {exc}"
        self._spawn(self._flush_counts_forever())

    async def close(self) -> None:
        if self.guard is not None:
            await self.guard.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._flush_counts()
        with contextlib.suppress(Exception):
            await self.exact.close()

    def _spawn(self, work: Any) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- lookup ----------------------------------------------------------------------------

    async def lookup(self, request: CacheRequest) -> CacheHit | None:
        """Both layers, the semantic one after an exact miss, within the deadline."""
        hit, pending = await self.lookup_staged(request)
        return hit if pending is None else await self.settle(pending)

    async def lookup_staged(self, request: CacheRequest
                            ) -> tuple[CacheHit | None, PendingLookup | None]:
        """The exact layer's hit now, and on a miss the semantic search started (None where
        it does not apply), for `settle` to read. The engine runs it alongside the small
        model's request. The deadline counts from this call; nothing here ever raises."""
        settings = self._settings(request)
        if settings is None or self._is_down():
            return None, None
        deadline = asyncio.get_running_loop().time() + settings.lookup_deadline_ms / 1000
        key = exact_key(request)
        if settings.exact:
            found, answer = await self._bounded(
                self.exact.get(request.tenant, request.policy, key), deadline)
            if not found:
                return None, None
            if answer is not None:
                self.counts["hit_exact"] += 1
                return CacheHit("exact", answer), None
        semantic = self._semantic_inputs(request, settings)
        if semantic is None:
            self.counts["miss"] += 1
            return None, None
        search = self._spawn(self._searched(request, settings, key, semantic))
        return None, PendingLookup(search, deadline)

    async def settle(self, pending: PendingLookup) -> CacheHit | None:
        """A started semantic search's hit, waiting for it until its deadline at most (the
        caller may have let it run past the deadline while other work went on)."""
        left = pending.deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({pending.search}, timeout=max(left, 0.0))
        if not done:  # left to end on its own: a hung Redis's failure still opens the circuit
            self.counts["deadline"] += 1
            return None
        hit = pending.search.result()
        self.counts["hit_semantic" if hit else "miss"] += 1
        return hit

    async def _searched(self, request: CacheRequest, settings: CacheSettings, key: str,
                        semantic: _Semantic) -> CacheHit | None:
        began = time.monotonic()
        try:
            hit = await self._semantic_lookup(request, settings, key, semantic)
        except Exception as exc:  # a broken cache is a miss
            self._failed(exc)
            return None
        self._succeeded(began)
        return hit

    async def _bounded(self, work: Awaitable[Any], deadline: float) -> tuple[bool, Any]:
        """(True, result) when `work` ends by `deadline`; (False, None) past it or on an error.

        A task, not asyncio.timeout: redis-py shields its commands from cancellation, so only
        waiting on a separate task holds the deadline whatever Redis does. Past the deadline
        it is left to end on its own (the client's socket timeout bounds it), so that a hung
        Redis's failure is seen and opens the circuit."""
        began = time.monotonic()
        task = asyncio.ensure_future(work)
        left = deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({task}, timeout=max(left, 0.0))
        if not done:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._abandoned)
            self.counts["deadline"] += 1
            return False, None
        try:
            result = task.result()
        except Exception as exc:  # a broken cache is a miss
            self._failed(exc)
            return False, None
        self._succeeded(began)
        return True, result

    async def _semantic_lookup(self, request: CacheRequest, settings: CacheSettings, key: str,
                               semantic: _Semantic) -> CacheHit | None:
        # Embedded only after an exact miss: an exact hit (a Redis GET) must not pay for, or
        # compete with, an embedding it does not need.
        vector = self._vector_future(key, request, semantic.text)
        if not self._index_ready:  # Redis came back empty, or was not there at start
            await self._ensure_index()
            if not self._index_ready:
                return None
        embedding = await self._embedding(vector)
        if embedding is None:
            return None
        candidates = await self.semantic.search(  # type: ignore[union-attr]
            request.tenant, request.policy, semantic.context, embedding,
            k=settings.semantic_candidates)
        candidates = [c for c in candidates if c.cosine >= settings.semantic_min_cosine]
        stopped = sum(c.disagreements >= STOP_AFTER for c in candidates)
        if stopped:  # audits disagreed with these twice: exact repeats only
            self.counts["audit_withheld"] += stopped
            candidates = [c for c in candidates if c.disagreements < STOP_AFTER]
        if not candidates:
            return None
        threshold = settings.semantic_threshold
        if threshold is None:
            threshold = self.verifier.threshold_for(  # type: ignore[union-attr]
                settings.semantic_max_false_hit_rate)
        best = await asyncio.to_thread(self._verify, semantic.text, candidates, threshold)
        if best is None:
            self.counts["semantic_rejected"] += 1
            return None
        found, probability = best
        return SemanticHit("semantic", found.answer, similarity=probability, entry=found.entry,
                           cached_text=found.text, text=semantic.text, cosine=found.cosine)

    def _verify(self, text: str, candidates: list[Candidate], threshold: float
                ) -> tuple[Candidate, float] | None:
        """The first candidate (nearest first) the verifier accepts, if any; one whose bar
        an audit raised must be rated above it."""
        verifier = self.verifier
        assert verifier is not None
        for candidate in candidates:
            diff = PairDiff.of(candidate.text, text)
            bar = threshold
            if candidate.min_probability >= threshold:
                bar = math.nextafter(candidate.min_probability, math.inf)
            probability = verifier.accept(
                diff, candidate.cosine, bar,
                lambda diff=diff: float(changed_part_cosines(self._embed, [diff])[0]))
            if probability is not None:
                return candidate, probability
        return None

    # ---- audits ----------------------------------------------------------------------------

    async def _audited(self, hit: SemanticHit, disagreed: bool) -> None:
        """Keep an audit's outcome on its entry. A disagreement raises the entry's bar to the
        pair's exact probability (the hit's may be a lower bound), computed here, off the
        request path."""
        assert self.semantic is not None
        probability = hit.similarity or 0.0
        if disagreed:
            probability = max(probability, await asyncio.to_thread(self._probability, hit))
        try:
            disagreements = await self.semantic.audited(hit.entry, disagreed, probability)
        except Exception as exc:
            self._failed(exc)
            return
        if disagreed and disagreements == STOP_AFTER:
            self.counts["audit_entries_stopped"] += 1
            log.info("cache: entry %s stopped serving semantically after %d disagreeing "
                     "audits", hit.entry, STOP_AFTER)

    def _probability(self, hit: SemanticHit) -> float:
        assert self.verifier is not None
        diff = PairDiff.of(hit.cached_text, hit.text)
        return self.verifier.probability(
            hit.cached_text, hit.text, hit.cosine,
            float(changed_part_cosines(self._embed, [diff])[0]))

    # ---- store -----------------------------------------------------------------------------

    async def store(self, request: CacheRequest, answer: CachedAnswer) -> None:
        settings = self._settings(request)
        if settings is None or self._is_down():
            return
        key, began = exact_key(request), time.monotonic()
        try:
            if settings.exact:  # written first: it never waits for the embedding
                await self.exact.put(request.tenant, request.policy, key, answer,
                                     settings.ttl_s, settings.max_entries_per_tenant)
            semantic = self._semantic_inputs(request, settings)
            if semantic is not None and self.semantic is not None:
                vector = await self._embedding(
                    self._vector_future(key, request, semantic.text))
                if vector is not None:
                    await self.semantic.put(request.tenant, request.policy, key,
                                            semantic.context, semantic.text, vector, answer,
                                            settings.ttl_s, settings.max_entries_per_tenant)
            self._succeeded(began)
        except Exception as exc:  # a broken cache skips the write
            self._failed(exc)
        finally:
            self._vectors.pop(key, None)

    # ---- helpers ---------------------------------------------------------------------------

    def _settings(self, request: CacheRequest) -> CacheSettings | None:
        """The policy's cache settings, or None when this request is not cached at all."""
        settings = self._settings_for(request.policy) or CacheSettings()
        if not settings.enabled or request.params.get("logprobs"):
            return None  # replays carry no logprobs
        return settings

    def _semantic_inputs(self, request: CacheRequest, settings: CacheSettings
                         ) -> _Semantic | None:
        if self.semantic is None or not settings.semantic:
            return None
        text = final_user_text(request.params)
        if text is None:
            return None
        if settings.multi_turn == "never" and is_multi_turn(request.params):
            return None
        if len(text) > self.verifier.max_chars:  # type: ignore[union-attr]
            self.counts["semantic_too_long"] += 1  # served by exact repeats only
            return None
        return _Semantic(text, context_hash(request))

    def _vector_future(self, key: str, request: CacheRequest, text: str) -> asyncio.Future:
        """This request's embedding, computed once in a worker thread, shared with store."""
        future = self._vectors.get(key)
        if future is None or future.cancelled() or (
                future.done() and future.exception() is not None):
            given = request.embedding
            if given is not None and len(windows(text)) == 1:
                future = asyncio.get_running_loop().create_future()
                future.set_result(np.asarray(given, dtype=np.float32))
            else:
                future = asyncio.ensure_future(
                    asyncio.to_thread(lambda: cache_vector(self._embed, text)))
            self._vectors[key] = future
            while len(self._vectors) > PENDING_VECTORS:
                self._vectors.popitem(last=False)
        return future

    async def _embedding(self, vector: asyncio.Future) -> np.ndarray | None:
        """The awaited embedding, or None when the embedder failed (the exact layer and Redis
        are fine: the circuit stays closed)."""
        try:
            return await asyncio.shield(vector)
        except Exception as exc:
            self.counts["embedding_error"] += 1
            log.warning("cache: embedding failed (%s); semantic layer skipped", exc)
            return None

    def health(self) -> str | None:
        """None when the cache works as configured, else what it is doing without."""
        if self._error is not None:
            return f"{self._error}: serving misses, retrying every {self.retry_after_s:g}s"
        if self.semantic is not None and not self._index_ready:
            return "semantic index unchecked since Redis failed: (re)created on the next lookup"
        return None

    def _is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _abandoned(self, task: asyncio.Task) -> None:
        """A lookup given up at its deadline: its late failure (a hung Redis timing out)
        opens the circuit; its outcome is retrieved so it is never logged as unhandled."""
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    def _succeeded(self, began: float) -> None:
        """A call begun after the last failure clears it. One begun before (a search or a
        write in flight when Redis went away) says nothing about Redis now, and clearing on
        it hid an open circuit from /readyz until the next failure."""
        if began > self._failed_at:
            self._error = None

    def _failed(self, exc: BaseException) -> None:
        self.counts["error"] += 1
        self._index_ready = False  # Redis may come back empty: the next lookup checks first
        if "no such index" in str(exc).lower() or "unknown index" in str(exc).lower():
            return
        self._error, self._failed_at = f"{type(exc).__name__}: {exc}", time.monotonic()
        if not self._is_down():
            log.warning("cache: %s: %s; serving misses for %.1fs", type(exc).__name__, exc,
                        self.retry_after_s)
        self._down_until = time.monotonic() + self.retry_after_s

    async def _ensure_index(self) -> None:
        try:
            await self.semantic.ensure()  # type: ignore[union-attr]
            self._index_ready = True
        except Exception as exc:
            self._failed(exc)

    async def _flush_counts_forever(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await self._flush_counts()

    async def _flush_counts(self) -> None:
        delta = self.counts - self._flushed
        if delta:
            await self.exact.add_counts(dict(delta))
            self._flushed.update(delta)

    async def purge(self, tenant: str, policy: str | None = None) -> int:
        return await self.exact.purge(tenant, policy)

    async def stats(self) -> dict[str, Any]:
        stats = {**await self.exact.stats(), "process_counters": dict(self.counts)}
        if self.guard is not None:
            stats["process_audits"] = audit_summary(self.counts)
        return stats


def build_cache(
    redis_url: str | None,
    settings_for: SettingsFor,
    *,
    prefix: str = "smallfirst",
    semantic: bool = True,
    memory_entries: int = 10_000,
    embed: Embed | None = None,
    timeout_s: float = 0.25,
) -> LayeredCache:
    """In-process exact cache without Redis; Redis exact (+ semantic, with `embed`) with it."""
    if not redis_url:
        return LayeredCache(MemoryExactStore(memory_entries), settings_for)
    from gateway.cache.redis_exact import Keys, connect

    client, keys = connect(redis_url, timeout_s), Keys(prefix)
    index = verifier = None
    if semantic and embed is not None:
        index, verifier = SemanticIndex(client, keys), PairVerifier.load()
    return LayeredCache(RedisExactStore(client, keys), settings_for, index, verifier, embed)
