"""Quality-target evidence pooled across processes through Redis (a real Valkey): another
process, or one started later, sets the same threshold from the same traffic, and the shadow
share follows the whole traffic's rate."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from gateway.cache.redis_exact import connect
from gateway.quality_pool import QualityPool
from router import QualityTargets
from router.quality import ESCALATE_ALL, QualityTarget

SPEC = QualityTarget(target=0.9, min_labels=50, refresh_every=10, shadow_rate=0.5,
                     shadow_per_minute=1e6)
BUDGETED = QualityTarget(target=0.9, shadow_rate=0.1, shadow_per_minute=30)
SPECS = {"qt": SPEC, "budgeted": BUDGETED}


def process(redis_url: str, key: str, seed: int) -> tuple[QualityTargets, QualityPool]:
    """One gateway process's calibrators and its pool."""
    rng = random.Random(seed)
    targets = QualityTargets(rng=rng.random)
    return targets, QualityPool(connect(redis_url, 1.0), key, targets, SPECS.get)


def serve(targets: QualityTargets, pool: QualityPool, policy: str, n: int, seed: int) -> None:
    """What the traffic learner does for `n` scored requests: the small answer is right when
    its confidence is high; escalated and shadow-drawn requests get their label."""
    rng, spec = random.Random(seed), SPECS[policy]
    calibrator = targets.calibrator(policy, "all", spec)
    for _ in range(n):
        confidence = rng.random()
        escalated = confidence < calibrator.threshold
        entry, shadow = calibrator.record(confidence, escalated)
        pool.entered(policy, "all", entry)
        if escalated or shadow:
            right = rng.random() < (0.98 if confidence > 0.5 else 0.3)
            calibrator.label(entry, 1.0 if right else 0.0, 1.0, shadow)
            pool.labelled(entry, shadow, False)


async def until(condition, seconds: float = 20.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


@pytest.fixture
async def key() -> str:
    return f"quality-{uuid.uuid4().hex[:8]}"


async def test_another_process_sets_the_same_threshold_from_pooled_evidence(
        redis_url: str, key: str) -> None:
    a_targets, a = process(redis_url, key, 1)
    b_targets, b = process(redis_url, key, 2)
    tasks = [asyncio.create_task(p.run()) for p in (a, b)]
    try:
        serve(a_targets, a, "qt", 1500, seed=3)
        mine = a_targets.calibrator("qt", "all", SPEC)
        assert mine.threshold != ESCALATE_ALL  # the labels were enough to accept some
        theirs = b_targets.calibrator("qt", "all", SPEC)
        assert await until(lambda: theirs.labels == mine.labels)
        assert (theirs.requests, theirs.threshold) == (mine.requests, mine.threshold)
        a.skipped("qt", "all", 0.05, 0.05)  # a request A sent straight to the frontier
        assert await until(lambda: theirs.requests == mine.requests + 1)
        assert theirs.snapshot()["window"] == mine.snapshot()["window"] + 1
        # ...and a process started later catches up from what the stream holds.
        c_targets, c = process(redis_url, key, 4)
        tasks.append(asyncio.create_task(c.run()))
        late = c_targets.calibrator("qt", "all", SPEC)
        assert await until(lambda: late.labels == mine.labels
                           and late.requests == mine.requests + 1)
        assert late.threshold == mine.threshold
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_shadow_share_follows_the_whole_traffic(redis_url: str, key: str) -> None:
    a_targets, a = process(redis_url, key, 1)
    b_targets, b = process(redis_url, key, 2)
    alone, _ = process(redis_url, f"{key}-alone", 2)
    tasks = [asyncio.create_task(p.run()) for p in (a, b)]
    try:
        serve(a_targets, a, "budgeted", 600, seed=5)  # far above 30 a minute
        pooled = b_targets.calibrator("budgeted", "all", BUDGETED)
        assert await until(lambda: pooled.requests == 600)
        entry, _ = pooled.record(0.9, escalated=False)
        solo, _ = alone.calibrator("budgeted", "all", BUDGETED).record(0.9, escalated=False)
        assert solo.probability == BUDGETED.shadow_rate  # alone it sees one request a minute
        assert entry.probability < BUDGETED.shadow_rate / 5  # pooled: the fleet's rate
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_redis_away_keeps_the_evidence_local_and_bounded(
        key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import quality_pool
    from tooling.smallmodel import free_port

    monkeypatch.setattr(quality_pool, "OUTBOX", 50)
    targets, pool = process(f"redis://127.0.0.1:{free_port()}/0", key, 1)
    task = asyncio.create_task(pool.run())
    serve(targets, pool, "qt", 200, seed=3)
    assert await until(lambda: pool.dropped > 0)
    assert not task.done()  # retrying, not failed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert targets.calibrator("qt", "all", SPEC).requests == 200
    assert len(pool._outbox) <= 50


def test_a_gateway_with_redis_and_a_frontier_pools(redis_url: str) -> None:
    from gateway.config import Settings
    from gateway.service import Gateway

    gateway = Gateway.from_settings(Settings(
        auth="off", metrics=False, redis_url=redis_url, cache_semantic=False,
        frontier_model="openai/frontier", frontier_api_base="http://127.0.0.1:9/v1"))
    assert gateway.engine.learner.pool is not None
    assert gateway.engine.learner.pool.key == "smallfirst:quality"


async def test_cancelling_the_exchange_never_hangs(redis_url: str, key: str) -> None:
    """Shutdown cancels the pool's loop, often in the middle of a Redis command; redis-py
    could take for ever to unwind that, and the gateway's shutdown waited with it."""
    writer_targets, writer = process(redis_url, key, 1)
    for round_no in range(20):
        serve(writer_targets, writer, "qt", 300, seed=round_no)
        reader_targets, reader = process(redis_url, key, 2)
        tasks = [asyncio.create_task(p.run()) for p in (writer, reader)]
        await asyncio.sleep(0.02 * (round_no % 5))
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
