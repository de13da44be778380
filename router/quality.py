"""Holding a quality target online: the acceptance threshold from the traffic's own labels.

A policy with `quality.target: 0.95` promises that the answers it serves keep at least 95% of
the quality the frontier alone would give. `QualityCalibrator` picks the lowest acceptance
threshold on the confidence score for which that holds with the stated confidence, from
labels the gateway collects itself:

- every request escalated for low confidence is labelled (the frontier answered it anyway);
- a sampled share of accepted requests is labelled by a shadow call to the frontier.

Each scored request enters a sliding window with the probability it had of being labelled.
Weighting each label by the inverse of that probability makes the estimated loss unbiased
for every threshold, although only requests below the current one are fully labelled.
Thresholds are tested from the strictest down, stopping at the first that fails
(fixed-sequence testing needs no correction for the many thresholds tried), against an
upper confidence bound on the loss, not a point estimate. With too few labels nothing
passes and everything escalates: a cold start costs frontier calls, never quality. A label
that was due and never came (a failed shadow call) counts as the worst case. The window
forgets old requests, so the threshold follows drifting traffic; a rise is counted as drift.

The same labels set the difficulty skip threshold. Skipping the small model never lowers
quality (the frontier answers), so it is a cost choice: below the skip threshold, the share
of small answers the acceptance threshold would accept (an upper confidence bound, over the
tried requests' difficulty and confidence scores) must stay under `skip_if_accepted_below`
times the segment's acceptance rate. Relative, not absolute: a strict threshold early on
accepts little anywhere, and skipping everything then would starve its own labels. A
`skip_explore` share of the would-be-skipped requests still tries the small model, weighted
by the inverse of that share, so the estimate follows the traffic. A skipped request enters
the window as what it is, an answer the frontier served (no loss, like an escalation, but
never below or above any threshold: it is neither labelled nor counted as tried), so
skipping does not make the threshold stricter for the rest. No skipping before the
acceptance threshold is set.

The gateway (through its engine and traffic learner) and `smallfirst router replay` drive the
same class, with the same calls, so an offline replay shows what the live gateway would do.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

ESCALATE_ALL = math.inf  # no confidence reaches it
NO_SKIP = -math.inf  # no difficulty falls below it
SKIPPED = -math.inf  # a skipped request's confidence: below every threshold


@dataclass(frozen=True)
class QualityTarget:
    """What a policy asks for (the policy file's `quality` section, as plain numbers)."""

    target: float = 0.95  # served quality / the frontier's quality, at least
    confidence: float = 0.95  # one-sided confidence of the bound
    window: int = 5000  # scored requests remembered per segment
    min_labels: int = 100  # below this many labels in the window, escalate everything
    shadow_rate: float = 0.1  # most share of accepted requests sent for a shadow label
    shadow_per_minute: float = 30  # and at most this many a minute per segment
    refresh_every: int = 20  # labels between two threshold searches
    skip_if_accepted_below: float = 0.1  # skip where small answers are accepted this rarely,
    # relative to the segment's acceptance rate
    skip_explore: float = 0.05  # share of would-be-skipped requests that still try the small


@dataclass
class Scored:
    """One scored request in a segment's window; `label` fills in when its label arrives."""

    confidence: float
    probability: float  # the chance it had of being labelled (1 when escalated)
    small: float | None = None  # the small answer's quality, when labelled
    large: float | None = None  # the frontier answer's quality, when labelled
    seq: int = 0  # its place in the segment's traffic
    difficulty: float | None = None  # its difficulty score, when the policy has one
    tried: float = 1.0  # the chance it had of trying the small model (below the skip threshold)
    skipped: bool = False  # served by the frontier without trying the small model

    @property
    def labelled(self) -> bool:
        return self.small is not None


@dataclass
class Estimate:
    threshold: float = ESCALATE_ALL
    quality: float | None = None  # estimated served / frontier quality at the threshold
    quality_bound: float | None = None  # its lower confidence bound
    small_share: float = 0.0  # share of the window the threshold accepts
    skip_threshold: float = NO_SKIP  # below this difficulty, skip the small model


@dataclass
class QualityCalibrator:
    """The threshold for one policy segment. Thread-safe: labels arrive from worker threads."""

    spec: QualityTarget
    rng: Callable[[], float] = random.random
    clock: Callable[[], float] = time.monotonic
    estimate: Estimate = field(default_factory=Estimate)
    requests: int = 0
    labels: int = 0
    shadow_labels: int = 0
    lost: int = 0
    drifts: int = 0
    skips: int = 0
    explored: int = 0  # requests below the skip threshold that tried the small model anyway
    _window: deque = field(default_factory=deque)
    _samples: deque = field(default_factory=deque)  # labelled accepted requests, by label time
    _accepted_times: deque = field(default_factory=deque)
    _since_refresh: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def threshold(self) -> float:
        return self.estimate.threshold

    def plan(self, difficulty: float | None) -> tuple[bool, float]:
        """Whether a request tries the small model, and the chance it had to: below the skip
        threshold only a `skip_explore` share does, the rest go straight to the frontier."""
        with self._lock:
            if difficulty is None or difficulty >= self.estimate.skip_threshold:
                return True, 1.0
            share = self.spec.skip_explore
            tried = self.rng() < share
            self.explored += tried
            if not tried:
                self.skips += 1
                self._skip(difficulty, share)
            return tried, share

    def enter_skipped(self, difficulty: float, share: float) -> None:
        """Enter a request another process skipped (a pooled replica's)."""
        with self._lock:
            self._skip(difficulty, share)

    def _skip(self, difficulty: float, share: float) -> None:
        self._enter(Scored(SKIPPED, 1.0, 0.0, 1.0, self.requests, difficulty, share,
                           skipped=True))

    def _enter(self, entry: Scored) -> None:
        self._window.append(entry)
        if len(self._window) > self.spec.window:
            self._window.popleft()
        self.requests += 1

    def record(self, confidence: float, escalated: bool, difficulty: float | None = None,
               tried: float = 1.0) -> tuple[Scored, bool]:
        """Enter a finished request that tried the small model (`tried`: the chance it had,
        from `plan`); returns its window entry and whether to shadow-label it (escalated
        requests are labelled with certainty, by the answer they were served)."""
        with self._lock:
            probability, shadow = 1.0, False
            if not escalated:
                probability = self._shadow_probability(self.clock())
                shadow = self.rng() < probability
            return self._append(confidence, probability, difficulty, tried), shadow

    def enter(self, confidence: float, probability: float, difficulty: float | None = None,
              tried: float = 1.0) -> Scored:
        """Enter a request another process scored and drew for (a pooled replica's)."""
        with self._lock:
            return self._append(confidence, probability, difficulty, tried)

    def _append(self, confidence: float, probability: float, difficulty: float | None,
                tried: float) -> Scored:
        if probability < 1:  # accepted: counts in the rate the shadow share follows
            self._accepted_times.append(self.clock())
        entry = Scored(confidence, probability, seq=self.requests, difficulty=difficulty,
                       tried=tried)
        self._enter(entry)
        return entry

    def label(self, entry: Scored, small: float, large: float, shadow: bool = False,
              lost: bool = False) -> None:
        """The label of an entered request: both answers' quality in [0, 1]."""
        with self._lock:
            entry.small, entry.large = float(small), float(large)
            if entry.probability < 1:
                self._samples.append(entry)
            self.labels += 1
            self.shadow_labels += shadow
            self.lost += lost
            self._since_refresh += 1
            if self._since_refresh >= self.spec.refresh_every:
                self._refresh()

    def lose(self, entry: Scored) -> None:
        """A label that was due and never came counts as the worst case."""
        self.label(entry, 0.0, 1.0, lost=True)

    def _shadow_probability(self, now: float) -> float:
        """The sampling share that keeps the expected shadow calls within the per-minute
        budget at the recent rate of accepted requests (known per request, so the weights
        stay exact)."""
        times = self._accepted_times
        while times and times[0] < now - 60:
            times.popleft()
        span = max(now - times[0], 1.0) if times else 60.0  # seconds the count covers
        per_minute = (len(times) + 1) * 60 / span
        return min(self.spec.shadow_rate, self.spec.shadow_per_minute / per_minute)

    def _refresh(self) -> None:
        self._since_refresh = 0
        # Shadow labels older than the window go, but the latest `min_labels` always stay:
        # scarce labels then span a longer time instead of vanishing.
        oldest = self._window[0].seq if self._window else self.requests
        while len(self._samples) > self.spec.min_labels and self._samples[0].seq < oldest:
            self._samples.popleft()
        previous = self.estimate.threshold
        window = list(self._window)
        estimate = search_threshold(window, list(self._samples), self.spec)
        estimate.skip_threshold = search_skip(window, estimate.threshold, self.spec)
        self.estimate = estimate
        if previous != ESCALATE_ALL and self.estimate.threshold > previous:
            self.drifts += 1

    def snapshot(self) -> dict[str, float | int | None]:
        with self._lock:
            e = self.estimate
            return {
                "target": self.spec.target, "threshold": e.threshold if e.threshold != ESCALATE_ALL
                else None, "estimated_quality": e.quality, "quality_bound": e.quality_bound,
                "small_share": e.small_share, "requests": self.requests,
                "window": len(self._window), "labels": self.labels,
                "shadow_labels": self.shadow_labels, "lost_labels": self.lost,
                "threshold_rises": self.drifts, "skip_threshold": e.skip_threshold
                if e.skip_threshold != NO_SKIP else None, "skips": self.skips,
                "skip_explored": self.explored,
            }


def search_threshold(window: list[Scored], sample: list[Scored], spec: QualityTarget,
                     ) -> Estimate:
    """The lowest threshold whose quality bound holds the target, strictest first.

    The window has two strata: escalated requests, every one labelled, and accepted ones, of
    which `sample` (the latest labelled ones, over a longer time when labels are scarce) is
    a weighted sample. Per request and candidate threshold, the statistic is the loss
    accepting it would cost minus the loss the target allows; the accepted stratum's mean
    comes from its sample (weighted by inverse sampling probability), with one imaginary
    worst-case label added so that few shadow labels mean a wide bound, never a confident
    one.
    """
    escalated = [s for s in window if s.probability >= 1 and s.labelled]
    accepted = [s for s in window if s.probability < 1]
    if len(escalated) + len(sample) < spec.min_labels:
        return Estimate()
    rows = escalated + sample
    c = np.array([s.confidence for s in rows])
    order = np.argsort(-c, kind="stable")
    c = c[order]
    small = np.array([s.small for s in rows])[order]
    large = np.array([s.large for s in rows])[order]
    in_sample = (np.arange(len(rows)) >= len(escalated))[order]
    w = np.where(in_sample, 1 / np.array([s.probability for s in rows])[order], 0.0)
    slack = (1 - spec.target) * large
    kept, sent = (large - small) - slack, -slack  # the statistic, accepted or escalated

    def above(values: np.ndarray) -> np.ndarray:
        """Per candidate (the top k rows accepted): sum of `values` over all rows, taking
        each row's accepted value above the cut and its escalated value below."""
        v_kept, v_sent = values
        return np.cumsum(v_kept) + (v_sent.sum() - np.cumsum(v_sent))

    e = ~in_sample
    sum_e, sq_e = above((kept * e, sent * e)), above((kept**2 * e, sent**2 * e))
    pseudo_w, worst = 1.0, spec.target  # one request's answer worth nothing, frontier's 1
    weights = w.sum() + pseudo_w
    mean_a = (above((w * kept, w * sent)) + pseudo_w * worst) / weights
    spread_a = (above((w**2 * kept**2, w**2 * sent**2)) - 2 * mean_a * above((w**2 * kept,
                w**2 * sent)) + mean_a**2 * (w**2).sum() + pseudo_w**2 * (worst - mean_a)**2)
    n_e, n_a = len(escalated), len(accepted)
    n = n_e + n_a
    var_e = np.maximum(sq_e - sum_e**2 / max(n_e, 1), 0)
    total = sum_e + n_a * mean_a
    bound = (total + NormalDist().inv_cdf(spec.confidence)
             * np.sqrt(var_e + n_a**2 * np.maximum(spread_a, 0) / weights**2)) / n
    # a threshold accepts every equal score, and never a skipped request
    last_of_tie = np.r_[c[1:] != c[:-1], True] & np.isfinite(c)
    failed = np.flatnonzero((bound > 0) & last_of_tie)
    k = (failed[0] if failed.size else len(c)) - 1  # the last index of the passing run
    while k >= 0 and not last_of_tie[k]:
        k -= 1
    if k < 0:
        return Estimate()
    large_mean = (large[e].sum() + n_a * ((w * large).sum() + pseudo_w) / weights) / n
    threshold = float(c[k])
    return Estimate(
        threshold=threshold,
        quality=1 - float(total[k] / n / large_mean + (1 - spec.target)),
        quality_bound=float(spec.target - bound[k] / large_mean),
        small_share=sum(s.confidence >= threshold for s in window) / len(window),
    )


def search_skip(window: list[Scored], threshold: float, spec: QualityTarget) -> float:
    """The highest difficulty below which the share of small answers `threshold` accepts has
    an upper confidence bound under `spec.skip_if_accepted_below` times the share it accepts
    over the whole window; NO_SKIP if none.

    Over the window's requests with a difficulty score, each weighted by the inverse of its
    chance to try the small model (the explored share below the current skip threshold),
    with one imaginary accepted request added below every candidate, so that few requests
    never look safe to skip. Skipping costs no quality, so the highest passing candidate
    is taken (no fixed-sequence order needed).
    """
    rows = [s for s in window if s.difficulty is not None and not s.skipped]
    if spec.skip_if_accepted_below <= 0 or threshold == ESCALATE_ALL or not rows:
        return NO_SKIP
    d = np.array([s.difficulty for s in rows])
    order = np.argsort(d, kind="stable")
    d = d[order]
    w = 1 / np.array([s.tried for s in rows])[order]
    accepted = (np.array([s.confidence for s in rows]) >= threshold)[order]
    pseudo = 1.0  # one imaginary accepted request
    sum_w = np.cumsum(w)[:-1] + pseudo  # candidate k skips the first k + 1 rows
    sum_wx = np.cumsum(w * accepted)[:-1] + pseudo
    sum_w2, sum_w2x = np.cumsum(w**2)[:-1] + pseudo**2, np.cumsum(w**2 * accepted)[:-1] + pseudo**2
    share = sum_wx / sum_w
    spread = sum_w2x * (1 - 2 * share) + share**2 * sum_w2  # sum of w^2 (x - share)^2
    bound = share + NormalDist().inv_cdf(spec.confidence) * np.sqrt(spread) / sum_w
    limit = spec.skip_if_accepted_below * (w * accepted).sum() / w.sum()
    passing = np.flatnonzero((bound < limit) & (d[1:] != d[:-1]))
    return float(d[passing[-1] + 1]) if passing.size else NO_SKIP


class QualityTargets:
    """Every policy segment's calibrator, created on first use (the policy may reload)."""

    def __init__(self, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rng, self.clock = rng, clock
        self._calibrators: dict[tuple[str, str], QualityCalibrator] = {}
        self._lock = threading.Lock()

    def calibrator(self, policy: str, segment: str, spec: QualityTarget) -> QualityCalibrator:
        key = (policy, segment)
        with self._lock:
            found = self._calibrators.get(key)
            if found is None or found.spec != spec:  # a changed policy starts afresh
                found = self._calibrators[key] = QualityCalibrator(spec, self.rng, self.clock)
            return found

    def threshold(self, policy: str, segment: str, spec: QualityTarget) -> float:
        return self.calibrator(policy, segment, spec).threshold

    def snapshot(self) -> list[dict]:
        with self._lock:
            items = list(self._calibrators.items())
        return [{"policy": p, "segment": s, **c.snapshot()} for (p, s), c in items]


def quality_target(policy: dict, shadow_rate: float | None = None) -> QualityTarget:
    """What a policy document (its `quality` and `learning` sections) asks for."""
    quality = {k: v for k, v in (policy.get("quality") or {}).items() if k != "segment_by"}
    if quality.get("target") is None:
        raise ValueError(f"policy {policy.get('name')!r} sets no quality.target")
    learning = policy.get("learning") or {}
    shadow = {k: learning[k] for k in ("shadow_rate", "shadow_per_minute") if k in learning}
    if shadow_rate is not None:
        shadow["shadow_rate"] = shadow_rate
    try:
        return QualityTarget(**quality, **shadow)
    except TypeError as exc:
        raise ValueError(f"policy {policy.get('name')!r}: {exc}") from exc
