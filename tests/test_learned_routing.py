"""The gateway serving with the router's learned scorers (the shipped default bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.embedding import SharedEmbedding
from gateway.scoring import BundleRegistry
from gateway.types import Route
from router.serving import DEFAULT_BUNDLE
from tests.conftest import script
from tests.test_engine import call, engine_for, policy

pytestmark = pytest.mark.skipif(not (DEFAULT_BUNDLE / "bundle.json").is_file(),
                                reason="no default router bundle in this checkout")


class CountingEmbed:
    """A cheap deterministic embedder that counts what it is asked to embed."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        rows = np.zeros((len(texts), 384), dtype=np.float32)
        for i, text in enumerate(texts):
            rows[i, hash(text) % 384] = 1.0
        return rows


def learned_engine(upstream: str, root: Path, embed: CountingEmbed | None = None):
    engine = engine_for(upstream)
    engine.bundles = BundleRegistry(root)
    engine.embed = SharedEmbedding(lambda: embed or CountingEmbed())
    return engine


async def test_a_low_difficulty_score_skips_the_small_model(upstream: str, tmp_path) -> None:
    # A generous embedding allocation: on a busy machine the worker thread may start late.
    pol = policy(difficulty={"scorer": "learned", "skip_threshold": 1.0},
                 latency_budget={"embedding": 2000})
    engine = learned_engine(upstream, tmp_path)
    _, decision = await engine.complete(call("Prove the Riemann hypothesis." + script(), pol))
    assert 0.0 < decision.difficulty < 1.0
    assert (decision.route, decision.escalation) == (Route.FRONTIER, "difficulty")


async def test_learned_confidence_judges_the_small_answer(upstream: str, tmp_path) -> None:
    pol = policy(confidence={"scorer": "learned", "threshold": 0.0})
    engine = learned_engine(upstream, tmp_path)
    _, decision = await engine.complete(
        call("What is 2+2?" + script(text="2+2=4. The answer is 4."), pol))
    assert decision.route == Route.SMALL
    assert 0.0 <= decision.confidence <= 1.0

    strict = policy(confidence={"scorer": "learned", "threshold": 1.0})
    _, decision = await engine.complete(call("What is 2+2?" + script(text="Maybe 5?"), strict))
    assert (decision.route, decision.escalation) == (Route.ESCALATED, "low_confidence")


async def test_one_embedding_serves_both_scorers(upstream: str, tmp_path) -> None:
    embed = CountingEmbed()
    engine = learned_engine(upstream, tmp_path, embed)
    pol = policy(difficulty={"scorer": "learned"},
                 confidence={"scorer": "learned", "threshold": 0.0})
    prompt = "How many legs has a spider?" + script(text="Eight.")
    await engine.complete(call(prompt, pol))
    assert embed.texts == [prompt]


@pytest.mark.parametrize("mode", ["buffer", "holdback"])
async def test_with_nowhere_to_escalate_the_learned_confidence_is_not_run(
        upstream: str, tmp_path, mode: str) -> None:
    """No frontier: a learned score would cost the prompt's embedding and decide nothing."""
    embed = CountingEmbed()
    engine = learned_engine(upstream, tmp_path, embed)
    engine.frontiers = []
    pol = policy(confidence={"scorer": "learned", "threshold": 1.0},
                 streaming={"mode": mode, "holdback_tokens": 2})
    chunks, decision = await engine.stream(call("Spider legs?" + script(text="Eight legs."), pol))
    async for _ in chunks:
        pass
    assert (decision.route, decision.confidence, decision.note) == (Route.SMALL, None, None)
    assert embed.texts == []


async def test_a_broken_bundle_scores_without_an_opinion(upstream: str, tmp_path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bundle.json").write_text("{}")
    pol = policy(difficulty={"scorer": "learned", "bundle": "broken", "skip_threshold": 0.9},
                 confidence={"scorer": "learned", "bundle": "broken"})
    engine = learned_engine(upstream, tmp_path)
    _, decision = await engine.complete(call("hi" + script(), pol))
    # No difficulty opinion: try the small model; no confidence opinion: do not trust it.
    assert decision.difficulty is None and decision.confidence is None
    assert decision.route == Route.ESCALATED


def test_bundles_are_resolved_against_the_policies_directory(tmp_path) -> None:
    registry = BundleRegistry(tmp_path)
    assert registry.resolve("default") == DEFAULT_BUNDLE
    assert registry.resolve("mine") == tmp_path / "mine"
    assert registry.resolve(str(tmp_path / "abs")) == tmp_path / "abs"
