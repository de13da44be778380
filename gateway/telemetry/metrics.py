"""OpenTelemetry metrics, exported as Prometheus text on `/metrics` and, when configured, OTLP.

Labels stay low-cardinality: policy, route, component, cache kind, reason, model. Never
tenants, users or prompts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CollectorRegistry, generate_latest

from gateway.policy import LatencyBudget
from gateway.telemetry.budget import ALLOCATIONS, allocation_ms
from gateway.telemetry.tracing import otlp_protocol, resource
from gateway.telemetry.worker_metrics import WorkerExposition

# Seconds, fit for 1 ms cache hits up to 60 s frontier answers.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0, 20.0, 30.0, 60.0)

BudgetSource = Callable[[], Mapping[str, LatencyBudget]]
QualitySource = Callable[[], list[dict[str, Any]]]  # `QualityTargets.snapshot`
QUALITY_FIGURES = ("target", "estimated_quality", "quality_bound", "threshold", "small_share",
                   "labels", "shadow_labels", "lost_labels", "skip_threshold", "skips")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float

    def cost(self, usage: Mapping[str, Any]) -> float:
        return ((usage.get("prompt_tokens") or 0) * self.input
                + (usage.get("completion_tokens") or 0) * self.output) / 1e6


def litellm_price(model: str) -> Price | None:
    """The frontier's list price from litellm's bundled price map, when it knows the model."""
    try:
        import litellm
    except ImportError:
        return None
    entry = litellm.model_cost.get(model) or litellm.model_cost.get(model.split("/", 1)[-1])
    if not entry or "input_cost_per_token" not in entry:
        return None
    return Price(entry["input_cost_per_token"] * 1e6, entry.get("output_cost_per_token", 0) * 1e6)


class Metrics:
    """The gateway's instruments. `budgets` returns the loaded policies' latency budgets; their
    allocations are published as a gauge so dashboards compare spend with data, not copies."""

    def __init__(
        self, env: Mapping[str, str] | None = None, budgets: BudgetSource | None = None,
        quality: QualitySource | None = None,
    ) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        env = os.environ if env is None else env
        self.registry = CollectorRegistry()
        readers: list[Any] = [PrometheusMetricReader(registry=self.registry)]
        protocol = otlp_protocol(env, "metrics")
        if protocol is not None:
            readers.append(_otlp_reader(protocol))
        self.provider = MeterProvider(
            resource=resource(),
            shutdown_on_exit=False,  # shut down by its owner, within a bound
            metric_readers=readers,
            views=[View(instrument_type=Histogram,
                        aggregation=ExplicitBucketHistogramAggregation(BUCKETS_S))],
        )
        meter = self.provider.get_meter("smallfirst")
        self.requests = Tally(meter, "smallfirst.requests", "Requests")
        self.duration = meter.create_histogram(
            "smallfirst.request.duration", unit="s", description="Request duration")
        self.ttft = meter.create_histogram(
            "smallfirst.request.time_to_first_token", unit="s",
            description="Time to the first byte of the answer")
        self.component = meter.create_histogram(
            "smallfirst.component.duration", unit="s", description="Time per component")
        self.overhead = meter.create_histogram(
            "smallfirst.gateway.overhead", unit="s",
            description="Request time not spent waiting on models")
        self.budget_spend = meter.create_histogram(
            "smallfirst.budget.spend", unit="s",
            description="Time per request against each latency-budget allocation")
        self.cache_lookups = Tally(meter, "smallfirst.cache.lookups",
                                   "Response-cache lookups by result")
        self.cache_hits = Tally(meter, "smallfirst.cache.hits", "Response-cache hits by kind")
        self.cache_audits = Tally(
            meter, "smallfirst.cache.audits",
            "Semantic hits audited against the small model, by result (agree, "
            "disagree, skipped_budget, failed)")
        self.rate_limited = Tally(
            meter, "smallfirst.rate_limited", "Requests refused by a rate limit, by limit "
            "(requests, tokens, streams), scope (tenant, key) and where they were counted "
            "(redis, process)")
        self.escalations = Tally(meter, "smallfirst.escalations",
                                 "Requests sent on to the frontier, by reason")
        self.tokens = Tally(meter, "smallfirst.tokens", "Tokens by model and type (input, output)")
        self.cost = Tally(meter, "smallfirst.cost.usd", "Estimated model cost by model")
        self.saved = Tally(meter, "smallfirst.saved.usd", "Cost avoided against the frontier alone")
        self.in_flight = Tally(meter, "smallfirst.requests.in_flight", "Requests being served",
                               monotonic=False)
        self._budgets = budgets
        self._quality_source = quality
        if quality is not None:
            meter.create_observable_gauge(
                "smallfirst.quality", callbacks=[self._quality],
                description="Quality targets held online, per policy and segment: the target, "
                "estimated quality and its lower bound (served / frontier), the threshold, the "
                "small share, labels, shadow labels and lost labels, the learned difficulty "
                "skip threshold and the requests it skipped")
        # Component -> what is wrong (gateway.health); set by the composition root.
        self.degraded: Callable[[], Mapping[str, str]] = dict
        meter.create_observable_gauge(
            "smallfirst.degraded", callbacks=[self._degraded],
            description="1 for each dependency the gateway is doing without (see /readyz)")
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        self.workers: WorkerExposition | None = None  # set in each of several workers
        meter.create_observable_gauge(
            "smallfirst.asyncio.tasks", callbacks=[self._tasks],
            description="Asyncio tasks alive in the serving loop (a leak grows it)")
        if budgets is not None:
            meter.create_observable_gauge(
                "smallfirst.budget.allocation", callbacks=[self._allocations], unit="s",
                description="Each policy's latency-budget allocation (total: the p99 target)")

    def _quality(self, options: CallbackOptions) -> Iterable[Observation]:
        assert self._quality_source is not None
        for segment in self._quality_source():
            labels = {"policy": segment["policy"], "segment": segment["segment"]}
            for figure in QUALITY_FIGURES:
                if segment.get(figure) is not None:
                    yield Observation(float(segment[figure]), {**labels, "figure": figure})

    def _allocations(self, options: CallbackOptions) -> Iterable[Observation]:
        assert self._budgets is not None
        for policy, budget in self._budgets().items():
            for component in ALLOCATIONS:
                yield Observation(allocation_ms(budget, component) / 1000,
                                  {"policy": policy, "component": component})

    def _tasks(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.loop is not None:
            yield Observation(len(asyncio.all_tasks(self.loop)))

    def _degraded(self, options: CallbackOptions) -> Iterable[Observation]:
        for component in self.degraded():
            yield Observation(1, {"component": component.split(":", 1)[0]})

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """What `/metrics` serves: this process's text, or every worker's when one of several."""
        if self.workers is not None:
            return await self.workers.merged()
        return self.prometheus_text()

    def record_rate_limited(self, limit: str, scope: str, counted: str) -> None:
        self.rate_limited.add(1, {"limit": limit, "scope": scope, "counted": counted})

    def record_cache_audit(self, policy: str, result: str, model: str | None = None,
                           response: Mapping[str, Any] | None = None) -> None:
        """A semantic-hit audit's result, and the small model's tokens it spent, counted as a
        background call's (never the client's usage). Audits end after their request has been
        reported, so they come here from the engine rather than through the Observer."""
        usage = (response or {}).get("usage") or {}
        self.cache_audits.add(1, {"policy": policy, "result": result})
        if model and usage:
            self.tokens.add(usage.get("prompt_tokens") or 0, {"model": model, "type": "input"})
            self.tokens.add(usage.get("completion_tokens") or 0,
                            {"model": model, "type": "output"})

    def shutdown(self) -> None:
        self.provider.shutdown()


class Tally:
    """A counter kept by the gateway itself and read by the SDK only at collection (an
    observable instrument): adding is a dict update, about a tenth of the SDK's per-call work
    for a synchronous counter. Same name, labels and exported type as a counter."""

    def __init__(self, meter: Any, name: str, description: str, *,
                 monotonic: bool = True) -> None:
        self.totals: dict[tuple[tuple[str, str], ...], float] = {}
        create = meter.create_observable_counter if monotonic else \
            meter.create_observable_up_down_counter
        create(name, callbacks=[self._observe], description=description)

    def add(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        self.totals[key] = self.totals.get(key, 0) + amount

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        # A copy: an exporter thread may collect while the event loop adds.
        return [Observation(total, dict(key)) for key, total in list(self.totals.items())]


def _otlp_reader(protocol: str) -> Any:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return PeriodicExportingMetricReader(OTLPMetricExporter())
