"""Per-request component durations (the `Server-Timing` header) and their trace spans.

One object per request: every `measure(component)` adds to that component's duration and,
when tracing is on, is a child span of the request's span.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, Tracer


class Timings:
    """Accumulates wall time per component (a component that runs twice adds up)."""

    def __init__(self, tracer: Tracer | None = None, parent: Context | None = None) -> None:
        self.started = time.perf_counter()
        self.durations_ms: dict[str, float] = {}
        self.tracer = tracer
        self.parent = parent  # the request span's context, for spans opened outside it
        self.root_span: Span | None = None  # the request's span, ended when the request ends
        self.first_byte_ms: float | None = None

    @contextmanager
    def measure(self, component: str, **attributes: Any) -> Iterator[Span]:
        start = time.perf_counter()
        try:
            with self.span(component, attributes) as span:
                yield span
        finally:
            self.add(component, (time.perf_counter() - start) * 1000)

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
        """A child span of whatever is current (else of the request span); no-op untraced."""
        if self.tracer is None:
            yield INVALID_SPAN
            return
        with self.tracer.start_as_current_span(
            name, context=self._context(), attributes=attributes
        ) as span:
            yield span

    def start_span(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        """A span the caller ends itself (e.g. one that lives as long as a stream)."""
        if self.tracer is None:
            return INVALID_SPAN
        return self.tracer.start_span(name, context=self._context(), attributes=attributes)

    def _context(self) -> Context | None:
        # Streams are read in another task, where the request span is no longer current.
        return None if trace.get_current_span().get_span_context().is_valid else self.parent

    def add(self, component: str, ms: float) -> None:
        self.durations_ms[component] = self.durations_ms.get(component, 0.0) + ms

    def mark_first_byte(self) -> None:
        if self.first_byte_ms is None:
            self.first_byte_ms = self.elapsed_ms()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def server_timing(self) -> str:
        parts = [f"{name};dur={ms:.1f}" for name, ms in self.durations_ms.items()]
        parts.append(f"total;dur={self.elapsed_ms():.1f}")
        return ", ".join(parts)
