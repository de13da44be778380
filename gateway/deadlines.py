"""The small model's deadlines: the policy's allocation, fitted to the machine it runs on.

A deadline exists to catch a stalled small model and send the request to the frontier in
time. It must not turn a healthy but slower deployment (a busy 2-core node, a laptop) into a
stream of escalations or 504s. So:

- with nowhere to escalate (no frontier configured, a `small_only` policy, a model named
  directly), the small model may take up to the policy's `small_timeout`: waiting is the
  only way to an answer, and a hung server still fails, with a 504, after that long;
- with a frontier, `small_deadline: adaptive` (the default) stretches the first-token
  allocation to `ADAPT` times the p95 of the small model's recent first tokens when the
  machine runs slower than the policy assumed, and the generation allocation by the same
  factor, at most `MAX_STRETCH` times (and never past `small_timeout`), so a stalled model
  is still caught; `fixed` keeps the policy's numbers as they are. A first token that missed
  its deadline counts as having taken that long: a machine on which every request misses
  stretches the deadline step by step until its first tokens fit.
  `smallfirst budget` keeps reporting spend against the policy's own allocation, so a
  machine that needs the stretch shows up there as OVER.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gateway.policy import LatencyBudget

ADAPT = 1.5  # a deadline at 1.5x the recent p95 catches a stall, not a slow machine
MAX_STRETCH = 4.0  # past 4x the policy's allocation the small model is stalled, not slow
MIN_SAMPLES = 8  # fewer first tokens than this: the policy's numbers stand
WINDOW = 256


@dataclass(frozen=True)
class SmallDeadlines:
    ttft_s: float  # first token, from the call's start
    total_s: float  # the answer (or the held part), from the call's start
    gap_s: float  # longest silence between tokens once streaming


class FirstTokenTimes:
    """The small model's recent times to first token, in ms."""

    def __init__(self, window: int = WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self._p95: float | None = None

    def observe(self, ms: float) -> None:
        self._recent.append(ms)
        self._p95 = None

    def p95(self) -> float | None:
        if len(self._recent) < MIN_SAMPLES:
            return None
        if self._p95 is None:
            ordered = sorted(self._recent)
            self._p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return self._p95


def small_deadlines(budget: LatencyBudget, can_escalate: bool,
                    first_tokens: FirstTokenTimes) -> SmallDeadlines:
    cap = budget.small_timeout / 1000
    if not can_escalate:
        return SmallDeadlines(cap, cap, cap)
    stretch = 1.0
    p95 = first_tokens.p95() if budget.small_deadline == "adaptive" else None
    if p95 is not None and ADAPT * p95 > budget.small_ttft:
        stretch = min(ADAPT * p95 / budget.small_ttft, MAX_STRETCH)
    ttft = min(budget.small_ttft * stretch / 1000, cap)
    total = min(budget.small_total_ms * stretch / 1000, cap)
    return SmallDeadlines(ttft, total, ttft)
