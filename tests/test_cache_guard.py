"""The semantic cache's guard on its own: sampling, the per-minute budget, the decision rule."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.backends import BackendFailure
from gateway.cache.guard import CacheGuard, SemanticHit, answer_text, disagrees
from gateway.cache.redis_exact import audit_summary
from gateway.policy import CacheSettings
from gateway.telemetry.metrics import Metrics
from gateway.types import CachedAnswer, CacheHit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Kept:
    """The cache's side of an audit: what it was asked to keep on the entry."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, bool]] = []

    async def __call__(self, hit: SemanticHit, disagreed: bool) -> None:
        self.outcomes.append((hit.entry, disagreed))


def settings(rate: float = 1.0, per_minute: float = 30) -> CacheSettings:
    return CacheSettings(semantic_audit_rate=rate, semantic_audits_per_minute=per_minute)


def hit(text: str = "Paris.", entry: str = "p:s:acme:pol:abc") -> SemanticHit:
    answer = CachedAnswer(model="small", pieces=[text], finish_reason="stop")
    return SemanticHit("semantic", answer, similarity=0.99, entry=entry,
                       cached_text="What is the capital of France?",
                       text="what is the capital of france", cosine=0.95)


def answering(text: str | None = None, fail: bool = False) -> Any:
    async def ask() -> dict[str, Any]:
        if fail:
            raise BackendFailure("small", "connection refused")
        return {"choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
    return ask


def test_defaults_audit_a_twentieth_within_thirty_a_minute() -> None:
    defaults = CacheSettings()
    assert defaults.semantic_audit_rate == 0.05
    assert defaults.semantic_audits_per_minute == 30


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_rate_zero_never_audits_and_rate_one_always_does(draw: float) -> None:
    guard = CacheGuard(Kept(), rng=lambda: draw)
    assert guard.sample("p", settings(rate=0.0)) is None
    assert guard.sample("p", settings(rate=1.0)) == "audit"


def test_rate_draws_that_share() -> None:
    draws = iter([0.04, 0.06, 0.5, 0.01])
    guard = CacheGuard(Kept(), rng=lambda: next(draws))
    assert [guard.sample("p", settings(rate=0.05)) for _ in range(4)] == \
        ["audit", None, None, "audit"]


def test_per_minute_budget_then_refill() -> None:
    clock = Clock()
    guard = CacheGuard(Kept(), rng=lambda: 0.0, clock=clock)
    drawn = [guard.sample("p", settings(per_minute=3)) for _ in range(5)]
    assert drawn == ["audit"] * 3 + ["skipped_budget"] * 2
    assert guard.sample("other", settings(per_minute=3)) == "audit"  # per policy
    clock.now += 20  # a third of a minute: one audit back
    assert guard.sample("p", settings(per_minute=3)) == "audit"
    assert guard.sample("p", settings(per_minute=3)) == "skipped_budget"
    clock.now += 3600  # never more than a minute's worth
    assert [guard.sample("p", settings(per_minute=3)) for _ in range(4)].count("audit") == 3
    assert guard.sample("q", settings(per_minute=0)) == "skipped_budget"


def test_the_decision_rule() -> None:
    assert not disagrees("Paris.", "Paris.")
    assert not disagrees("The capital of France is Paris.", "Paris is the capital of France.")
    assert disagrees("Lyon.", "Paris.")
    assert disagrees("The capital of France is Paris.", "I like turtles very much.")
    assert disagrees("The answer is 42.", "The answer is 41.")  # final answers differ
    assert not disagrees("So the answer is 12.", "Adding them up, the answer is 12")
    calls = [{"id": "x", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert answer_text(None, calls) == 'weather {"city": "Oslo"}'
    other = [{"id": "y", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]
    assert not disagrees(answer_text(None, calls), answer_text(None, calls))
    assert answer_text(None, other) != answer_text(None, calls)


async def test_audits_run_in_the_background_and_report() -> None:
    kept, reports = Kept(), []
    guard = CacheGuard(kept, rng=lambda: 0.0)
    report = lambda result, response: reports.append((result, response and response["usage"]))  # noqa: E731
    started = asyncio.Event()

    async def slow() -> dict[str, Any]:
        started.set()
        await asyncio.sleep(0.05)
        return await answering("Berlin.")()

    task = guard.after_hit(hit("Paris."), "p", settings(), slow, report)
    assert task is not None and not task.done()  # the caller went on at once
    await guard.drain()
    assert task.result() == "disagree" and kept.outcomes == [("p:s:acme:pol:abc", True)]
    guard.after_hit(hit("Paris."), "p", settings(), answering("Paris."), report)
    guard.after_hit(hit("Paris."), "p", settings(), answering(fail=True), report)
    guard.after_hit(hit("Paris."), "p", settings(), answering(""), report)
    await guard.drain()
    assert [r for r, _ in reports] == ["disagree", "agree", "failed", "failed"]
    assert reports[0][1]["completion_tokens"] == 2
    assert kept.outcomes[1:] == [("p:s:acme:pol:abc", False)]  # failures decide nothing
    assert guard.counts == {"audit_disagree": 1, "audit_agree": 1, "audit_failed": 2}


async def test_only_semantic_hits_within_budget_are_audited() -> None:
    kept, reports = Kept(), []
    guard = CacheGuard(kept, rng=lambda: 0.0)
    exact = CacheHit("exact", hit().answer)
    assert guard.after_hit(exact, "p", settings(), answering("x")) is None
    assert guard.after_hit(hit(), "p", settings(rate=0.0), answering("x")) is None
    tight = settings(per_minute=1)
    assert guard.after_hit(hit(), "p", tight, answering("Paris."),
                           lambda r, _: reports.append(r)) is not None
    assert guard.after_hit(hit(), "p", tight, answering("Paris."),
                           lambda r, _: reports.append(r)) is None
    await guard.drain()
    assert sorted(reports) == ["agree", "skipped_budget"]
    assert audit_summary(dict(guard.counts)) == {
        "audits": 1, "agreements": 1, "disagreements": 0, "skipped_budget": 1, "failed": 0,
        "entries_stopped": 0, "candidates_withheld": 0}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A metric's values by their labels (OTel's scope labels left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted((k, v) for k, v in sample.labels.items()
                         if not k.startswith("otel_"))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name}


def test_audit_results_reach_the_metrics() -> None:
    metrics = Metrics(env={})
    try:
        metrics.record_cache_audit("pol", "disagree", "small",
                                   {"usage": {"prompt_tokens": 7, "completion_tokens": 2}})
        metrics.record_cache_audit("pol", "skipped_budget")
        text = metrics.prometheus_text().decode()
    finally:
        metrics.shutdown()
    assert samples(text, "smallfirst_cache_audits_total") == {
        (("policy", "pol"), ("result", "disagree")): 1.0,
        (("policy", "pol"), ("result", "skipped_budget")): 1.0}
    assert samples(text, "smallfirst_tokens_total")[(("model", "small"), ("type", "output"))] \
        == 2.0
