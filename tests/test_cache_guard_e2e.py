"""The semantic cache's guard over a real cache: Valkey with the search module, the engine, and
the scripted upstream (deterministic) or the real small model (vLLM) as the small model."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from gateway.backends import OpenAIWireBackend
from gateway.cache.layered import LayeredCache, build_cache
from gateway.config import BackendConfig, RetryConfig
from gateway.embedding import SharedEmbedding
from gateway.engine import CascadeEngine
from gateway.policy import Policy
from gateway.telemetry.metrics import Metrics
from gateway.types import CachedAnswer, CacheRequest, Call, Route
from tests.conftest import script
from tests.test_cache_guard import samples

TENANT = "acme"


def policy(name: str = "guarded", **cache: Any) -> Policy:
    return Policy.model_validate({
        "name": name, "route": "small_only", "confidence": {"scorer": "accept_all"},
        "streaming": {"mode": "buffer"},
        "latency_budget": {"small_ttft": 20000, "small_generation": 60000},
        # a shared, busy machine: the lookup deadline is not under test here
        "cache": {"semantic_audit_rate": 1.0, "lookup_deadline_ms": 5000, **cache},
    })


def call(pol: Policy, text: str, *, store: bool = False, **params: Any) -> Call:
    c = Call(request_id=uuid.uuid4().hex[:8], policy=pol, tenant=TENANT,
             params={"messages": [{"role": "user", "content": text}], **params})
    c.write_cache = store  # paraphrases never become entries of their own
    return c


async def plant(cache: LayeredCache, pol: Policy, text: str, answer: str,
                **params: Any) -> None:
    """An entry whose answer is `answer` (for a false hit: the answer to another question)."""
    request = CacheRequest(TENANT, pol.name, pol.name,
                           {"messages": [{"role": "user", "content": text}], **params})
    await cache.store(request, CachedAnswer(model="small", pieces=[answer],
                                            finish_reason="stop"))


async def entry_fields(cache: LayeredCache) -> dict[str, dict[str, str]]:
    """Each semantic entry's audit fields, by the entry's cached question."""
    client, keys = cache.semantic.client, cache.semantic.keys  # type: ignore[union-attr]
    out = {}
    async for name in client.scan_iter(match=f"{keys.semantic_prefix}*"):
        fields = await client.hgetall(name)
        text = fields[b"text"].decode()
        out[text] = {k.decode(): fields[k].decode() for k in
                     (b"audits", b"disagreements", b"min_probability") if k in fields}
    return out


async def guarded_cache(redis_url: str, embed: SharedEmbedding, pol: Policy) -> LayeredCache:
    cache = build_cache(redis_url, lambda name: pol.cache, prefix=f"guard{uuid.uuid4().hex[:6]}",
                        embed=embed)
    await cache.start()
    return cache


# ---- the scripted upstream as the small model ------------------------------------------------

# The directive scripts what the small model answers; both questions carry the same one, so
# the verifier compares questions that differ only in their wording.
SAYS_PARIS = script(text="Paris.", ttft_ms=300)  # the audit's answer comes late
CACHED = "What is the capital of France?" + SAYS_PARIS
SERVED = "What's the capital of France?" + SAYS_PARIS  # verifier: 0.9927
CLOSER = "what is the capital of france" + SAYS_PARIS  # verifier: 0.9993 (threshold 0.984)


def scripted(upstream: str, cache: LayeredCache) -> CascadeEngine:
    small = OpenAIWireBackend(BackendConfig(model="hosted_vllm/small", api_base=f"{upstream}/v1"))
    return CascadeEngine(small, [], RetryConfig(max_attempts=1), cache=cache)


async def test_a_disagreeing_entry_raises_its_bar_then_stops(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    pol = policy()
    cache = await guarded_cache(redis_url, embed, pol)
    eng = scripted(upstream, cache)
    metrics = Metrics(env={})
    eng.audited = metrics.record_cache_audit  # as the gateway wires it
    try:
        await plant(cache, pol, CACHED, "Lyon.")  # a wrong answer: the audit says Paris
        started = time.monotonic()
        response, decision = await eng.complete(call(pol, SERVED))
        served_ms = (time.monotonic() - started) * 1000
        assert decision.route == Route.CACHE_SEMANTIC
        assert response["choices"][0]["message"]["content"] == "Lyon."
        assert response["usage"]["total_tokens"] == 0  # the audit is not the client's
        assert served_ms < 300  # the audit's answer takes 300 ms: the hit did not wait
        await cache.guard.drain()  # type: ignore[union-attr]
        fields = (await entry_fields(cache))[CACHED]
        assert fields["audits"] == "1" and fields["disagreements"] == "1"
        threshold = cache.verifier.threshold_for(pol.cache.semantic_max_false_hit_rate)
        assert threshold < float(fields["min_probability"]) < 0.9995  # SERVED's, not CLOSER's

        # the same rewording is no longer served from this entry; a closer one still is
        _, decision = await eng.complete(call(pol, SERVED))
        assert decision.route == Route.SMALL
        _, decision = await eng.complete(call(pol, CLOSER))
        assert decision.route == Route.CACHE_SEMANTIC
        await cache.guard.drain()  # type: ignore[union-attr]
        fields = (await entry_fields(cache))[CACHED]
        assert fields["disagreements"] == "2"

        # two disagreements: no rewording is served from it; the identical request still is
        for text in (CLOSER, "What is the capital of france?" + SAYS_PARIS):
            _, decision = await eng.complete(call(pol, text))
            assert decision.route == Route.SMALL
        _, decision = await eng.complete(call(pol, CACHED))
        assert decision.route == Route.CACHE_EXACT
        await cache.guard.drain()  # type: ignore[union-attr]

        counts = cache.counts
        assert counts["audit_disagree"] == 2 and counts["audit_entries_stopped"] == 1
        assert counts["audit_withheld"] >= 2 and "audit_agree" not in counts
        await cache._flush_counts()
        stats = await cache.stats()
        assert stats["semantic_audits"]["disagreements"] == 2
        assert stats["semantic_audits"]["entries_stopped"] == 1
        assert stats["process_audits"]["audits"] == 2
        audits = samples(metrics.prometheus_text().decode(), "smallfirst_cache_audits_total")
        assert audits[(("policy", "guarded"), ("result", "disagree"))] == 2.0
    finally:
        metrics.shutdown()
        await cache.close()


async def test_an_agreeing_entry_keeps_being_served(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    pol = policy()
    cache = await guarded_cache(redis_url, embed, pol)
    eng = scripted(upstream, cache)
    try:
        await plant(cache, pol, CACHED, "Paris.")
        for round_ in (1, 2, 3):
            response, decision = await eng.complete(call(pol, SERVED))
            assert decision.route == Route.CACHE_SEMANTIC
            assert response["choices"][0]["message"]["content"] == "Paris."
            await cache.guard.drain()  # type: ignore[union-attr]
            fields = (await entry_fields(cache))[CACHED]
            assert fields == {"audits": str(round_)}  # no disagreement, no bar
        assert cache.counts["audit_agree"] == 3
    finally:
        await cache.close()


async def test_past_the_budget_hits_are_served_unaudited(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    pol = policy(semantic_audits_per_minute=1)
    cache = await guarded_cache(redis_url, embed, pol)
    eng = scripted(upstream, cache)
    try:
        await plant(cache, pol, CACHED, "Lyon.")
        for text in (SERVED, CLOSER):  # the second would have stopped the entry
            assert (await eng.complete(call(pol, text)))[1].route == Route.CACHE_SEMANTIC
        await cache.guard.drain()  # type: ignore[union-attr]
        assert cache.counts["audit_disagree"] == 1 and cache.counts["audit_skipped_budget"] == 1
        assert (await entry_fields(cache))[CACHED]["disagreements"] == "1"
    finally:
        await cache.close()


# ---- the real small model ------------------------------------------------------------------

SMALL = "smollm2-135m-instruct"
# Questions and rewordings the verifier serves: each entry meets a rewording, then one rated
# closer still (after a disagreement an entry serves only pairs rated above the audited one).
STREAM = [
    ("What is the capital of France?",
     ["What's the capital of France?", "what is the capital of france"]),
    ("How tall is Mount Everest?", ["How high is Mount Everest?", "how tall is mount everest"]),
    ("Who wrote Romeo and Juliet?", ["Who wrote Romeo & Juliet?", "who wrote romeo and juliet"]),
    ("What color is the sky?", ["What is the color of the sky?", "What colour is the sky?"]),
    ("How many legs does a spider have?",
     ["How many legs has a spider?", "how many legs does a spider have"]),
]
# Entries planted with another question's answer: false hits the audits must catch.
PLANTED = {"What is the capital of France?": "Spiders have eight legs.",
           "How tall is Mount Everest?": "Romeo and Juliet was written by Shakespeare."}


@pytest.mark.vllm
async def test_real_small_model_audits_and_stops_false_hits(
        vllm_api_base: str, redis_url: str, embed: SharedEmbedding) -> None:
    pol = policy("guarded-vllm")
    cache = await guarded_cache(redis_url, embed, pol)
    small = OpenAIWireBackend(BackendConfig(model=f"hosted_vllm/{SMALL}", api_base=vllm_api_base))
    eng = CascadeEngine(small, [], RetryConfig(max_attempts=1), cache=cache)
    metrics = Metrics(env={})
    eng.audited = metrics.record_cache_audit  # as the gateway wires it
    params = {"temperature": 0, "max_tokens": 24}
    started = time.monotonic()
    try:
        for question, _ in STREAM:  # the real model's answer (cut short or not), or a wrong one
            answer = PLANTED.get(question)
            if answer is None:
                response = await small.complete(
                    {"messages": [{"role": "user", "content": question}], **params}, timeout=60)
                answer = response["choices"][0]["message"]["content"]
            await plant(cache, pol, question, answer, **params)
        served: dict[str, int] = {}
        for round_ in (0, 1):  # each entry's first rewording, then its second
            for question, rewordings in STREAM:
                _, decision = await eng.complete(call(pol, rewordings[round_], **params))
                if decision.route == Route.CACHE_SEMANTIC:
                    served[question] = served.get(question, 0) + 1
                await cache.guard.drain()  # type: ignore[union-attr]
        elapsed = time.monotonic() - started
        fields = await entry_fields(cache)
        counts = cache.counts
        audits = samples(metrics.prometheus_text().decode(), "smallfirst_cache_audits_total")
        report = {"served": served, "entries": fields, "counts": dict(counts),
                  "elapsed_s": round(elapsed, 1)}
        print("guard e2e:", json.dumps(report, sort_keys=True))

        # every semantic hit was audited (rate 1, budget to spare), and nothing failed
        assert sum(served.values()) > 0
        done = counts["audit_agree"] + counts["audit_disagree"]
        assert done == sum(served.values()) and counts["audit_failed"] == 0
        assert sum(int(f.get("audits", 0)) for f in fields.values()) == done
        assert sum(audits.values()) == done
        assert sum(int(f.get("disagreements", 0)) for f in fields.values()) == \
            counts["audit_disagree"]
        # the planted false hits were caught, and an entry disagreed with twice stopped
        for question in PLANTED:
            assert int(fields[question].get("disagreements", 0)) >= 1, question
        stopped = [q for q, f in fields.items() if int(f.get("disagreements", 0)) >= 2]
        assert stopped and counts["audit_entries_stopped"] == len(stopped)
        for question in stopped:
            for text in dict(STREAM)[question]:
                _, decision = await eng.complete(call(pol, text, **params))
                assert decision.route != Route.CACHE_SEMANTIC, text
    finally:
        metrics.shutdown()
        await cache.close()
