"""Latency budgets: rolling p50/p95/p99 per policy and component against the allocation.

Each (policy, component) keeps the last `window` samples (bounded memory); the report flags a
component whose p99 exceeds what the policy allocates to it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from gateway.policy import LatencyBudget

# Which measured components spend which allocation of the budget. A streamed frontier answer
# records both `frontier_ttft` and `frontier`, and `frontier` already includes its first
# token: the escalation spend is the larger of the two, never their sum.
SPENDS = {
    "queueing": ("auth", "policy"),
    "cache": ("cache",),
    "embedding": ("embedding",),
    "routing": ("difficulty", "confidence"),
    "small_ttft": ("small_ttft",),
    "small_generation": ("small_generation",),
    "escalation": ("frontier", "frontier_ttft"),
}
OVERLAPPING = frozenset({"escalation"})  # allocations whose components nest: max, not sum
ALLOCATIONS = ("total", *SPENDS)  # every row of a report; `total` is held to `p99_ms`


def spends(durations_ms: Mapping[str, float], total_ms: float) -> dict[str, float]:
    """Milliseconds one request spent against each allocation it touched (and `total`)."""
    out = {"total": total_ms}
    for allocation, components in SPENDS.items():
        spent = [durations_ms[c] for c in components if c in durations_ms]
        if spent:
            out[allocation] = max(spent) if allocation in OVERLAPPING else sum(spent)
    return out


def allocation_ms(budget: LatencyBudget, component: str) -> float:
    return budget.p99_ms if component == "total" else getattr(budget, component)


def model_wait_ms(durations_ms: Mapping[str, float]) -> float:
    """Time a request spent waiting on models: what the gateway's overhead excludes."""
    small = durations_ms.get("small_ttft", 0.0) + durations_ms.get("small_generation", 0.0)
    return small + max(durations_ms.get("frontier", 0.0), durations_ms.get("frontier_ttft", 0.0))


def quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class BudgetTracker:
    def __init__(self, window: int = 2048) -> None:
        self.window = window
        self._samples: dict[tuple[str, str], deque[float]] = {}

    def observe(self, policy: str, durations_ms: Mapping[str, float], total_ms: float) -> None:
        """Record one request: its total and each budget component it spent time in."""
        self.observe_spends(policy, spends(durations_ms, total_ms))

    def observe_spends(self, policy: str, spent_ms: Mapping[str, float]) -> None:
        """Record one request's spend per allocation (as `spends()` computes it)."""
        for allocation, ms in spent_ms.items():
            self._add(policy, allocation, ms)

    def _add(self, policy: str, component: str, ms: float) -> None:
        key = (policy, component)
        if key not in self._samples:
            self._samples[key] = deque(maxlen=self.window)
        self._samples[key].append(ms)

    def report(self, budgets: Mapping[str, LatencyBudget]) -> dict[str, Any]:
        """Per policy: each component's rolling quantiles, its allocation, and `over`."""
        out: dict[str, Any] = {}
        for name, budget in budgets.items():
            rows = {}
            for component in ALLOCATIONS:
                samples = self._samples.get((name, component))
                if not samples:
                    continue
                ordered = sorted(samples)
                allocation = allocation_ms(budget, component)
                p99 = quantile(ordered, 0.99)
                rows[component] = {
                    "count": len(ordered),
                    "p50_ms": round(quantile(ordered, 0.50), 2),
                    "p95_ms": round(quantile(ordered, 0.95), 2),
                    "p99_ms": round(p99, 2),
                    "allocation_ms": allocation,
                    "over": p99 > allocation,
                }
            out[name] = {"p99_target_ms": budget.p99_ms, "components": rows,
                         "over": sorted(c for c, row in rows.items() if row["over"])}
        return out


def render(report: Mapping[str, Any]) -> str:
    """The budget report as a table for a terminal."""
    lines = []
    for policy, entry in report.items():
        lines.append(f"policy {policy} (p99 target {entry['p99_target_ms']:.0f} ms)")
        if not entry["components"]:
            lines.append("  no traffic yet")
            continue
        lines.append(f"  {'component':18}{'n':>7}{'p50':>10}{'p95':>10}{'p99':>10}{'alloc':>10}")
        for component, row in entry["components"].items():
            flag = "  OVER" if row["over"] else ""
            lines.append(
                f"  {component:18}{row['count']:>7}{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}"
                f"{row['p99_ms']:>10.1f}{row['allocation_ms']:>10.0f}{flag}"
            )
    return "\n".join(lines)
