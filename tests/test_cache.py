"""The response cache: exact keys, bounds, purge, replay, semantic safety, Redis failures.

Redis is a real Valkey server with the query engine module, started by the test session.
Each test uses its own key prefix (and so its own search index) on that server.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest

from gateway.cache.layered import LayeredCache, build_cache
from gateway.cache.memory import MemoryExactStore
from gateway.cache.redis_exact import Keys, RedisExactStore, connect
from gateway.embedding import SharedEmbedding
from gateway.policy import CacheSettings
from gateway.types import CachedAnswer, CacheRequest

ANSWER = CachedAnswer(model="m", pieces=["Hello", " world", "."], finish_reason="stop",
                      usage={"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
BASE = {
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0.0, "top_p": 1.0, "max_tokens": 50, "stop": ["\n\n"], "seed": 7,
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    "tool_choice": "auto", "response_format": {"type": "text"},
}
_prefixes = itertools.count()


def prefix() -> str:
    return f"t{next(_prefixes)}-{uuid.uuid4().hex[:6]}"


def request(tenant: str = "acme", policy: str = "auto", model: str = "auto",
            **params: Any) -> CacheRequest:
    return CacheRequest(tenant, policy, model, {**BASE, **params})


def settings_for(**fields: Any):
    settings = CacheSettings(**fields)
    return lambda name: settings


@pytest.fixture(params=["memory", "redis"])
async def exact_cache(request: pytest.FixtureRequest) -> LayeredCache:
    if request.param == "memory":
        cache = build_cache(None, settings_for())
    else:
        url = request.getfixturevalue("redis_url")
        cache = build_cache(url, settings_for(), prefix=prefix(), semantic=False)
    await cache.start()
    yield cache
    await cache.close()


# ---- exact ---------------------------------------------------------------------------------


async def test_identical_request_hits(exact_cache: LayeredCache) -> None:
    await exact_cache.store(request(), ANSWER)
    hit = await exact_cache.lookup(request())
    assert hit is not None and hit.kind == "exact"
    assert hit.answer == ANSWER


async def test_key_order_does_not_matter(exact_cache: LayeredCache) -> None:
    await exact_cache.store(request(), ANSWER)
    reordered = CacheRequest("acme", "auto", "auto", dict(reversed(list(BASE.items()))))
    assert await exact_cache.lookup(reordered) is not None


CHANGES = {
    "tenant": {"tenant": "other"},
    "policy": {"policy": "chat"},
    "model": {"model": "frontier-a"},
    "system_prompt": {"messages": [{"role": "system", "content": "Be verbose."},
                                   BASE["messages"][1]]},
    "history": {"messages": [BASE["messages"][0], {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, BASE["messages"][1]]},
    "final_turn": {"messages": [BASE["messages"][0],
                                {"role": "user", "content": "What is the capital of Spain?"}]},
    "tools": {"tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}]},
    "tool_choice": {"tool_choice": "none"},
    "response_format": {"response_format": {"type": "json_object"}},
    "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.9},
    "max_tokens": {"max_tokens": 51},
    "stop": {"stop": ["END"]},
    "seed": {"seed": 8},
    "logprobs": {"logprobs": True},
}


@pytest.mark.parametrize("field", list(CHANGES))
async def test_changing_a_fingerprint_field_misses(exact_cache: LayeredCache, field: str) -> None:
    await exact_cache.store(request(), ANSWER)
    change = CHANGES[field]
    who = {k: change[k] for k in ("tenant", "policy", "model") if k in change}
    params = {k: v for k, v in change.items() if k not in who}
    assert await exact_cache.lookup(request(**who, **params)) is None


async def test_requests_with_logprobs_are_never_stored(exact_cache: LayeredCache) -> None:
    await exact_cache.store(request(logprobs=True), ANSWER)
    assert await exact_cache.lookup(request(logprobs=True)) is None


async def test_bound_per_tenant_evicts_oldest(exact_cache: LayeredCache) -> None:
    exact_cache._settings_for = settings_for(max_entries_per_tenant=2)
    for n in range(3):
        await exact_cache.store(request(seed=n), ANSWER)
    await exact_cache.store(request(tenant="b", seed=0), ANSWER)
    assert await exact_cache.lookup(request(seed=0)) is None
    assert await exact_cache.lookup(request(seed=1)) is not None
    assert await exact_cache.lookup(request(seed=2)) is not None
    assert await exact_cache.lookup(request(tenant="b", seed=0)) is not None


async def test_purge_by_tenant_and_policy(exact_cache: LayeredCache) -> None:
    for tenant, policy in (("a", "auto"), ("a", "chat"), ("b", "auto")):
        await exact_cache.store(request(tenant=tenant, policy=policy), ANSWER)
    assert await exact_cache.purge("a", "chat") >= 1
    assert await exact_cache.lookup(request(tenant="a", policy="chat")) is None
    assert await exact_cache.lookup(request(tenant="a", policy="auto")) is not None
    await exact_cache.purge("a")
    assert await exact_cache.lookup(request(tenant="a", policy="auto")) is None
    assert await exact_cache.lookup(request(tenant="b", policy="auto")) is not None


async def test_disabled_policy_neither_reads_nor_writes(exact_cache: LayeredCache) -> None:
    exact_cache._settings_for = settings_for(enabled=False)
    await exact_cache.store(request(), ANSWER)
    exact_cache._settings_for = settings_for()
    assert await exact_cache.lookup(request()) is None


async def test_memory_ttl_expires() -> None:
    now = [0.0]
    store = MemoryExactStore(clock=lambda: now[0])
    await store.put("t", "p", "k", ANSWER, ttl_s=10, max_per_tenant=5)
    assert await store.get("t", "p", "k") == ANSWER
    now[0] = 11
    assert await store.get("t", "p", "k") is None


async def test_redis_ttl_is_set(redis_url: str) -> None:
    keys = Keys(prefix())
    store = RedisExactStore(connect(redis_url), keys)
    await store.put("t", "p", "k", ANSWER, ttl_s=30, max_per_tenant=5)
    assert 0 < await store.client.ttl(keys.exact("t", "p", "k")) <= 30
    await store.close()


def test_tenant_names_cannot_reach_other_keys() -> None:
    keys = Keys("sf")
    assert keys.exact("a:b", "p", "k") != keys.exact("a", "b:p", "k")
    assert all("*" not in k.split(":", 2)[2] for k in [keys.entries("a*", "p")])
    assert keys.patterns("a*", None)[0] == "sf:x:a%2A:*:*"


# ---- semantic ------------------------------------------------------------------------------

LONG_CONTEXT = "Here are our meeting notes:\n" + "\n".join(
    f"- Item {n}: the {w} team will review the budget for project {n} by Friday."
    for n, w in enumerate(["design", "sales", "platform", "data", "support", "legal"] * 5)
)


def user(text: str, tenant: str = "acme", history: list[dict] | None = None) -> CacheRequest:
    messages = [*(history or []), {"role": "user", "content": text}]
    return CacheRequest(tenant, "auto", "auto", {"messages": messages})


@pytest.fixture(scope="module")
async def semantic_cache(redis_url: str, embed: SharedEmbedding) -> LayeredCache:
    # Tests assert behaviour, not speed: a generous deadline, so a miss is the verifier's.
    cache = build_cache(redis_url, settings_for(lookup_deadline_ms=5000), prefix=prefix(),
                        embed=embed)
    await cache.start()
    yield cache
    assert cache.counts["deadline"] == 0 and cache.counts["error"] == 0
    await cache.close()


async def remember(cache: LayeredCache, req: CacheRequest) -> None:
    await cache.store(req, ANSWER)


async def test_semantic_hit_for_a_paraphrase(semantic_cache: LayeredCache) -> None:
    await remember(semantic_cache, user("How do I reverse a string in PHP?"))
    hit = await semantic_cache.lookup(user("how do I reverse a string in PHP"))
    assert hit is not None and hit.kind == "semantic"
    assert hit.answer == ANSWER


NEAR_MISSES = {
    "code_language": ("How do I reverse a string in Ruby?", "How do I reverse a string in Perl?"),
    "number": ("Convert 5 km to miles.", "Convert 50 km to miles."),
    "unit": ("How many miles is it between London and Prague?",
             "How many kilometers is it between London and Prague?"),
    "direction": ("Sort these numbers in ascending order: 5, 3, 9",
                  "Sort these numbers in descending order: 5, 3, 9"),
    "negation": ("Is it safe to give grapes to dogs?", "Is it unsafe to give grapes to dogs?"),
    "from_to": ("How do I migrate my database from MySQL to PostgreSQL?",
                "How do I migrate my database from PostgreSQL to MySQL?"),
    "name": ("Write a thank-you note to Jonas for the book.",
             "Write a thank-you note to Amara for the book."),
    "long_prompt_other_question": (LONG_CONTEXT + "\n\nWho owns the most items?",
                                   LONG_CONTEXT + "\n\nTranslate these notes into French."),
    "long_prompt_other_detail": (LONG_CONTEXT + "\n\nSummarise the notes.",
                                 LONG_CONTEXT.replace("project 7", "project 9")
                                 + "\n\nSummarise the notes."),
}


@pytest.mark.parametrize("kind", list(NEAR_MISSES))
async def test_no_semantic_hit_for_a_near_miss(semantic_cache: LayeredCache, kind: str) -> None:
    cached, new = NEAR_MISSES[kind]
    await remember(semantic_cache, user(cached, tenant=f"near-{kind}"))
    assert await semantic_cache.lookup(user(cached, tenant=f"near-{kind}")) is not None
    assert await semantic_cache.lookup(user(new, tenant=f"near-{kind}")) is None


async def test_a_prompt_too_long_to_compare_is_served_by_exact_repeats_only(
        semantic_cache: LayeredCache) -> None:
    long_prompt = LONG_CONTEXT * (semantic_cache.verifier.max_chars // len(LONG_CONTEXT) + 1)
    before = semantic_cache.counts["semantic_too_long"]
    await remember(semantic_cache, user(long_prompt + "\nSummarise.", tenant="long"))
    assert await semantic_cache.lookup(user(long_prompt + "\nSummarise.", tenant="long"))
    assert await semantic_cache.lookup(user(long_prompt + "\nsummarise", tenant="long")) is None
    assert semantic_cache.counts["semantic_too_long"] - before == 2  # store, reworded lookup


async def test_no_hit_across_tenants(semantic_cache: LayeredCache) -> None:
    await remember(semantic_cache, user("What is the boiling point of water?", tenant="one"))
    assert await semantic_cache.lookup(user("What is the boiling point of water?",
                                            tenant="two")) is None
    assert await semantic_cache.lookup(user("what is the boiling point of water",
                                            tenant="two")) is None


async def test_multi_turn_reuse_needs_identical_context(semantic_cache: LayeredCache) -> None:
    history = [{"role": "user", "content": "Let's talk about Python."},
               {"role": "assistant", "content": "Sure."}]
    other = [{"role": "user", "content": "Let's talk about Java."},
             {"role": "assistant", "content": "Sure."}]
    await remember(semantic_cache, user("How do I sort a list?", "mt", history))
    assert await semantic_cache.lookup(user("how do I sort a list", "mt", history)) is not None
    assert await semantic_cache.lookup(user("how do I sort a list", "mt", other)) is None


async def test_semantic_lookup_past_deadline_is_a_miss(redis_url: str,
                                                      embed: SharedEmbedding) -> None:
    cache = build_cache(redis_url, settings_for(lookup_deadline_ms=0.001), prefix=prefix(),
                        embed=embed)
    await cache.start()
    try:
        await remember(cache, user("How do I parse JSON in Go?"))
        assert await cache.lookup(user("how do I parse JSON in Go")) is None
        assert cache.counts["deadline"] == 1
    finally:
        await cache.close()


async def test_server_without_query_engine_is_a_clear_error(tmp_path,
                                                            embed: SharedEmbedding) -> None:
    from gateway.cache.semantic import QueryEngineMissing
    from tests.conftest import RedisServer

    plain = RedisServer(tmp_path)
    plain.module = None
    plain.start()
    cache = build_cache(plain.url, settings_for(), prefix=prefix(), embed=embed)
    try:
        with pytest.raises(QueryEngineMissing, match="query engine"):
            await cache.start()
    finally:
        await cache.close()
        plain.kill()


async def test_redis_restarted_empty_gets_its_index_back_before_the_next_search(
        tmp_path, embed: SharedEmbedding) -> None:
    """The index used to be recreated only after a search had failed on it; the entry a
    client stored meanwhile was indexed by a background scan that a paraphrase's lookup
    could outrun, and a missed paraphrase is an exact repeat from then on."""
    import asyncio

    import redis.asyncio as aioredis

    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    cache = build_cache(server.url, settings_for(lookup_deadline_ms=5000), prefix=prefix(),
                        embed=embed)
    cache.retry_after_s = 0.05
    await cache.start()
    question = user("How do I zip two lists in Python?")
    try:
        server.kill()
        assert await cache.lookup(question) is None  # refused: the circuit opens
        server.start()  # empty: no entries, no index
        await asyncio.sleep(0.06)
        assert await cache.lookup(question) is None
        probe = aioredis.Redis.from_url(server.url)
        assert await probe.execute_command("FT._LIST") == [cache.semantic.keys.index.encode()]
        await probe.aclose()
        await remember(cache, question)
        hit = await cache.lookup(user("how do i zip two lists in python"))
        assert hit is not None and hit.kind == "semantic"
        assert cache.health() is None
    finally:
        await cache.close()
        server.kill()


async def test_a_burst_of_lookups_past_the_pool_size_waits_for_connections(
        redis_url: str) -> None:
    """redis-py's pool refused the 101st call in flight ("Too many connections"): a burst of
    requests read as a Redis failure and opened the circuit on a healthy Redis."""
    import asyncio

    from gateway.cache.redis_exact import MAX_CONNECTIONS

    cache = build_cache(redis_url, settings_for(lookup_deadline_ms=5000), prefix=prefix())
    await cache.start()
    try:
        burst = [request(seed=n) for n in range(3 * MAX_CONNECTIONS)]
        assert await asyncio.gather(*(cache.lookup(r) for r in burst)) == [None] * len(burst)
        assert cache.counts["error"] == 0 and cache.health() is None
        await asyncio.gather(*(cache.store(r, ANSWER) for r in burst))
        hits = await asyncio.gather(*(cache.lookup(r) for r in burst))
        assert all(hit is not None and hit.kind == "exact" for hit in hits)
    finally:
        await cache.close()


class HeldStore(MemoryExactStore):
    """An exact store whose writes wait for `release` and whose reads fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.release, self.down = None, False

    async def put(self, *args: Any) -> None:
        await self.release.wait()
        await super().put(*args)

    async def get(self, *args: Any) -> CachedAnswer | None:
        if self.down:
            raise ConnectionError("Connection refused")
        return await super().get(*args)


async def test_a_write_begun_before_a_failure_does_not_hide_it() -> None:
    """Redis went away while a write was in flight; the write's late success said nothing
    about Redis now, yet it cleared the failure, and /readyz stopped listing the cache."""
    import asyncio

    store = HeldStore()
    store.release = asyncio.Event()
    cache = LayeredCache(store, settings_for(), retry_after_s=0.05)
    writing = asyncio.create_task(cache.store(request(), ANSWER))
    await asyncio.sleep(0)
    store.down = True
    assert await cache.lookup(request(seed=1)) is None
    assert "Connection refused" in cache.health()
    store.release.set()
    await writing
    assert "Connection refused" in cache.health()  # still down, still listed
    store.down = False
    await asyncio.sleep(0.06)  # past retry_after_s: the next lookup tries Redis again
    assert await cache.lookup(request()) is not None
    assert cache.health() is None  # a call begun after the failure clears it
