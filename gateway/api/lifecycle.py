"""One request's life at the HTTP edge, owned in one place: its server span, its admission
against the rate limits and the in-flight limit, and its one observation (metrics, budget,
access log, the span's end) however it ends: an answer, a stream's last byte, an error, or
the client leaving."""

from __future__ import annotations

from fastapi import Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from gateway.limits import Admission
from gateway.service import Gateway
from gateway.telemetry.tracing import incoming_context
from gateway.timing import Timings
from gateway.types import Call, Decision


class RequestLife:
    """Created when a request arrives; `end` may be called from every exit and acts once."""

    def __init__(self, request: Request, gateway: Gateway) -> None:
        self.gateway = gateway
        self.request_id: str = request.scope["state"]["request_id"]
        self.timings = _timings(request, gateway)
        self.call: Call | None = None
        self.stream = False
        self.ended = False
        self.limit: Admission | None = None  # what it holds against the rate limits

    def admit(self, call: Call, *, stream: bool) -> None:
        """Count the request in flight (a 429 past the limit); from here it is observed."""
        self.gateway.begin()
        self.call, self.stream = call, stream

    def end(self, status: int, decision: Decision | None = None,
            error: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.limit is not None and self.gateway.limits is not None:
            usage = self.call.usage if self.call is not None else None
            tokens = usage.prompt + usage.completion if usage is not None else 0
            self.gateway.limits.release(self.limit, tokens)
        if self.call is not None:  # observed: the observer ends the span with the route
            self.gateway.finish(self.call, decision or self.call.decision, status,
                                stream=self.stream, tenant=self.call.tenant, error=error)
            return
        # Refused before admission: auth, body, policy or capacity.
        self.gateway.observer.refused(self.request_id, status, error)
        span = self.timings.root_span
        if span is not None and span.is_recording():
            span.set_attribute("http.response.status_code", status)
            span.end()


def _timings(request: Request, gateway: Gateway) -> Timings:
    """The request's timings and, when tracing, its server span (child of a `traceparent`)."""
    timings = Timings(gateway.tracer)
    if gateway.tracer is not None:
        span = gateway.tracer.start_span(
            f"POST {request.url.path}", context=incoming_context(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "url.path": request.url.path},
        )
        timings.root_span, timings.parent = span, trace.set_span_in_context(span)
    return timings
