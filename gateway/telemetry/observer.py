"""What happens when a request ends: metrics, the latency budget, the access log, the span."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.trace import Span, Status, StatusCode

from gateway.telemetry import access_log
from gateway.telemetry.budget import BudgetTracker, model_wait_ms, spends
from gateway.telemetry.metrics import Metrics, Price
from gateway.types import Call, Decision, Route

FREE = Price(0.0, 0.0)


class Pricing:
    """USD per model: configured prices first, else litellm's list price, else free."""

    def __init__(self, prices: Mapping[str, Price], reference: str | None) -> None:
        self.prices = dict(prices)
        self.reference = reference  # the frontier everything would go to without the cascade

    def of(self, model: str) -> Price:
        return self.prices.get(model, FREE)

    def saved(self, call: Call, decision: Decision) -> float:
        """Cost avoided against sending this request to the reference frontier.

        Only cache hits and accepted small answers save; what an escalated request spent on
        its small attempt shows in the cost by model instead.
        """
        if self.reference is None or self.reference not in self.prices:
            return 0.0
        if decision.route in (Route.CACHE_EXACT, Route.CACHE_SEMANTIC):
            answer = call.served_from_cache or {}
        elif decision.route == Route.SMALL:
            answer = call.usage.as_dict()
        else:
            return 0.0
        spent = sum(self.of(m).cost(u) for m, u in call.usage.by_model.items())
        return max(0.0, self.prices[self.reference].cost(answer) - spent)


class Observer:
    def __init__(self, metrics: Metrics | None, budgets: BudgetTracker, pricing: Pricing) -> None:
        self.metrics = metrics
        self.budgets = budgets
        self.pricing = pricing

    def started(self) -> None:
        if self.metrics:
            self.metrics.in_flight.add(1)

    def finished(
        self, call: Call, decision: Decision | None, status: int, *, stream: bool,
        tenant: str, error: str | None = None,
    ) -> None:
        timings = call.timings
        total_ms = timings.elapsed_ms()
        route = decision.route.value if decision else "none"
        policy = call.policy.name
        spent = spends(timings.durations_ms, total_ms)
        if decision is not None and status < 400:
            self.budgets.observe_spends(policy, spent)
        if self.metrics:
            self._record_metrics(call, decision, status, route, total_ms, stream, spent)
        _end_span(timings.root_span, route, policy, status, error)
        access_log.write(
            request_id=call.request_id, tenant=tenant, policy=policy, route=route,
            status=status, stream=stream, escalation=decision.escalation if decision else None,
            cache=decision.cache if decision else None, total_ms=round(total_ms, 2),
            first_byte_ms=_round(timings.first_byte_ms),
            durations_ms={k: round(v, 2) for k, v in timings.durations_ms.items()},
            tokens=call.usage.as_dict(), error=error,
        )

    def refused(self, request_id: str, status: int, error: str | None) -> None:
        """A request turned away before it was admitted (auth, body, policy, capacity): it
        still counts, in the metrics and the access log, so both match what clients sent."""
        if self.metrics:
            self.metrics.requests.add(1, {"policy": "none", "route": "none",
                                          "status": str(status), "stream": "unknown"})
        access_log.write(request_id=request_id, tenant=None, policy=None, route="none",
                         status=status, error=error)

    def _record_metrics(
        self, call: Call, decision: Decision | None, status: int, route: str, total_ms: float,
        stream: bool, spent: dict[str, float],
    ) -> None:
        m = self.metrics
        assert m is not None
        policy = call.policy.name
        labels = {"policy": policy, "route": route}
        m.in_flight.add(-1)
        m.requests.add(1, {**labels, "status": str(status), "stream": str(stream).lower()})
        if status >= 400:
            return
        m.duration.record(total_ms / 1000, labels)
        if call.timings.first_byte_ms is not None:
            m.ttft.record(call.timings.first_byte_ms / 1000, labels)
        durations = call.timings.durations_ms
        for component, ms in durations.items():
            m.component.record(ms / 1000, {"policy": policy, "component": component})
        for allocation, ms in spent.items():
            m.budget_spend.record(ms / 1000, {"policy": policy, "component": allocation})
        m.overhead.record(max(0.0, total_ms - model_wait_ms(durations)) / 1000, labels)
        assert decision is not None
        if decision.cache is not None:
            m.cache_lookups.add(1, {"policy": policy,
                                    "result": "miss" if decision.cache == "miss" else "hit"})
            if decision.cache != "miss":
                m.cache_hits.add(1, {"policy": policy, "kind": decision.cache})
        if decision.escalation:
            m.escalations.add(1, {"policy": policy, "reason": decision.escalation})
        for model, usage in call.usage.by_model.items():
            m.tokens.add(usage["prompt_tokens"], {"model": model, "type": "input"})
            m.tokens.add(usage["completion_tokens"], {"model": model, "type": "output"})
            m.cost.add(self.pricing.of(model).cost(usage), {"model": model})
        m.saved.add(self.pricing.saved(call, decision), {"policy": policy})


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _end_span(span: Span | None, route: str, policy: str, status: int, error: str | None) -> None:
    if span is None:
        return
    if span.is_recording():
        span.set_attribute("smallfirst.route", route)
        span.set_attribute("smallfirst.policy", policy)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, error or str(status)))
    span.end()

