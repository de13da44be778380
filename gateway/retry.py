"""Composable retries for backend calls: a backoff, an attempt count, and Retry-After."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.config import RetryConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter."""

    base_s: float
    cap_s: float

    def compute(self, failures: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** (failures - 1)))


async def call_with_retry(
    do: Callable[[], Awaitable[T]],
    config: RetryConfig,
    *,
    is_retryable: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None],
    deadline: float | None = None,
) -> T:
    """Run `do` until it succeeds, the attempts run out, or waiting would pass `deadline`.

    `deadline` is a `time.monotonic()` instant; an upstream Retry-After is honoured as the
    wait when present, and a Retry-After over `config.max_retry_after_s` is not waited at all.
    """
    backoff = Backoff(config.backoff_base_s, config.backoff_max_s)
    for attempt in range(1, config.max_attempts + 1):
        try:
            return await do()
        except Exception as exc:
            if attempt == config.max_attempts or not is_retryable(exc):
                raise
            asked = retry_after(exc)
            if asked is not None and asked > config.max_retry_after_s:
                raise
            wait = asked if asked is not None else backoff.compute(attempt)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")
