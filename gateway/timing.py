"""Per-request component durations, reported in the `Server-Timing` header."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    """Accumulates wall time per component (a component that runs twice adds up)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.durations_ms: dict[str, float] = {}

    @contextmanager
    def measure(self, component: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(component, (time.perf_counter() - start) * 1000)

    def add(self, component: str, ms: float) -> None:
        self.durations_ms[component] = self.durations_ms.get(component, 0.0) + ms

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def server_timing(self) -> str:
        parts = [f"{name};dur={ms:.1f}" for name, ms in self.durations_ms.items()]
        parts.append(f"total;dur={self.elapsed_ms():.1f}")
        return ", ".join(parts)
