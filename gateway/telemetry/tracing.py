"""Tracer set-up from the standard `OTEL_*` environment; tracing off costs (almost) nothing.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_TRACES_EXPORTER` is not `none`; the
protocol follows `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

SERVICE_NAME = "smallfirst"


def otlp_protocol(env: Mapping[str, str], signal: str) -> str | None:
    """The OTLP protocol for a signal ('traces' or 'metrics'), or None when not exported."""
    if env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").lower() == "none":
        return None
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint:
        return None
    return env.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL",
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    )


def resource():  # noqa: ANN201 - the SDK type is imported lazily
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})


def setup_tracing(env: Mapping[str, str] | None = None) -> Tracer | None:
    """A tracer exporting over OTLP, or None when tracing is off."""
    provider = tracer_provider(env)
    return provider.get_tracer("smallfirst") if provider is not None else None


def tracer_provider(env: Mapping[str, str] | None = None):  # noqa: ANN201 - lazy SDK type
    """The provider exporting spans over OTLP, or None when tracing is off. Its owner shuts it
    down (`gateway.telemetry.shutdown`), not an exit hook that would wait on the collector."""
    env = os.environ if env is None else env
    protocol = otlp_protocol(env, "traces")
    if protocol is None:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=resource(), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def incoming_context(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from a W3C `traceparent` header (empty when absent)."""
    return propagate.extract(headers)


def outgoing_headers() -> dict[str, str]:
    """`traceparent` (and friends) for the current span, to pass on to a backend."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    return carrier
