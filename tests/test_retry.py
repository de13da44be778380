"""Retries: jittered backoff, retryable errors, Retry-After and the deadline."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import retry
from gateway.config import RetryConfig
from gateway.retry import Backoff, call_with_retry


def test_backoff_stays_within_its_bounds() -> None:
    backoff = Backoff(base_s=0.1, cap_s=1.0)
    rng_state = random.getstate()
    try:
        random.seed(1234)
        for failures in range(1, 10):
            bound = min(1.0, 0.1 * 2 ** (failures - 1))
            samples = [backoff.compute(failures) for _ in range(300)]
            assert all(0 <= s <= bound for s in samples)
            assert max(samples) > bound / 2  # full jitter spreads over the whole range
            assert len(set(samples)) > 250
    finally:
        random.setstate(rng_state)


class Flaky(Exception):
    def __init__(self, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retryable = retryable
        self.retry_after = retry_after


async def run_retry(
    monkeypatch: pytest.MonkeyPatch,
    failures: list[Flaky],
    config: RetryConfig,
    deadline: float | None = None,
) -> tuple[int, list[float], Any]:
    """Calls made, waits slept, and the result (or the exception raised)."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(retry, "asyncio", SimpleNamespace(sleep=sleep))
    calls = 0

    async def do() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "ok"

    try:
        result: Any = await call_with_retry(
            do, config,
            is_retryable=lambda e: isinstance(e, Flaky) and e.retryable,
            retry_after=lambda e: getattr(e, "retry_after", None),
            deadline=deadline,
        )
    except Flaky as exc:
        result = exc
    return calls, waits, result


CONFIG = RetryConfig(max_attempts=3, backoff_base_s=0.5, backoff_max_s=0.8, max_retry_after_s=5)


async def test_retries_until_success(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(), Flaky()], CONFIG)
    assert (calls, result) == (3, "ok")
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 0.8


async def test_gives_up_after_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky() for _ in range(5)], CONFIG)
    assert calls == 3 and len(waits) == 2 and isinstance(result, Flaky)


async def test_non_retryable_errors_are_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retryable=False)], CONFIG)
    assert calls == 1 and waits == [] and isinstance(result, Flaky)


async def test_retry_after_is_honoured_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=2.5)], CONFIG)
    assert (calls, waits, result) == (2, [2.5], "ok")
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=30)], CONFIG)
    assert calls == 1 and waits == [] and result.retry_after == 30


async def test_no_wait_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    soon = time.monotonic() + 1.0
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=2)], CONFIG, soon)
    assert calls == 1 and waits == [] and isinstance(result, Flaky)
