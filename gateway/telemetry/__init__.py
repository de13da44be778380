"""Observability: OpenTelemetry traces and metrics, latency budgets, the access log."""
