"""Policies: the operator-edited YAML that steers routing, streaming and latency budgets.

One file per policy in the policies directory. Clients select a policy by passing one of its
names as `model`; `schema.json` beside the files is generated from `Policy` and kept in sync
by a test (`smallfirst policy schema > policies/schema.json`).
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router import QualityTarget


class StreamMode(StrEnum):
    BUFFER = "buffer"  # generate fully, score, then send (small answers only)
    HOLDBACK = "holdback"  # hold a prefix, score it, then flush and stream on, or escalate
    DIRECT = "direct"  # stream the small answer as it comes; no post check


class _Strict(BaseModel):
    # No infinities or NaN: `.inf` is valid YAML, and an infinite deadline is no deadline.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds that no sane policy reaches: a typo (an extra zero or three) is refused at
# load instead of turning a deadline into an hour's wait or a buffer into a memory hog.
MAX_MS = 600_000  # ten minutes: any deadline or budget
MAX_STEP_MS = 60_000  # one minute: the gateway's own steps (queueing, cache, routing)


class LatencyBudget(_Strict):
    """A p99 target and its split across components, in milliseconds.

    The engine derives its deadlines from these allocations, so the budget is the one source
    of the numbers: the small model must show a first token within `small_ttft` and finish
    within `small_ttft + small_generation` (fitted to the machine: see `gateway.deadlines`);
    a frontier attempt gets `escalation`.
    """

    p99_ms: float = Field(default=3000, gt=0, le=MAX_MS, description="End-to-end p99 target.")
    queueing: float = Field(
        default=20, ge=0, le=MAX_STEP_MS, description="Before routing: auth, policy.")
    cache: float = Field(default=10, ge=0, le=MAX_STEP_MS, description="Cache lookups.")
    embedding: float = Field(
        default=10, ge=0, le=MAX_STEP_MS, description="The shared prompt embedding.")
    routing: float = Field(
        default=5, ge=0, le=MAX_STEP_MS, description="Difficulty and confidence scoring.")
    small_ttft: float = Field(
        default=1000, gt=0, le=MAX_MS, description="Small model time to first token.")
    small_generation: float = Field(
        default=4000, gt=0, le=MAX_MS, description="Small model time after the first token."
    )
    escalation: float = Field(
        default=30000, gt=0, le=MAX_MS, description="One frontier attempt, in full.")
    small_timeout: float = Field(
        default=60000, gt=0, le=MAX_MS,
        description="How long the small model may take when there is nowhere to escalate "
        "(no frontier, small_only, a model named directly), and the cap of an adapted "
        "deadline; past it the request fails with 504.")
    small_deadline: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="adaptive: stretch small_ttft and small_generation to 1.5x the small "
        "model's recent p95 first-token time when the machine is slower than the policy "
        "assumes; fixed: the numbers as written.")

    @property
    def small_total_ms(self) -> float:
        return self.small_ttft + self.small_generation


class Difficulty(_Strict):
    """Before generation: a score in [0, 1], the chance the small model's answer is good enough."""

    scorer: Literal["always_small", "learned"] = "always_small"
    bundle: str = Field(
        default="default",
        description="Router bundle for `learned`: 'default' (shipped) or a folder path, "
        "relative to the policies directory.",
    )
    skip_threshold: float = Field(
        default=0.0, ge=0, le=1, description="Below this score, skip the small model."
    )


class Confidence(_Strict):
    """After the small model answers: accept it or escalate.

    The baseline `logprob` scorer reports exp(mean token logprob), the geometric-mean token
    probability; an answer is accepted when that reaches `threshold` and no single token's
    logprob is below `min_token_logprob`.
    """

    scorer: Literal["logprob", "accept_all", "learned"] = "logprob"
    bundle: str = Field(default="default", description="Router bundle for `learned`.")
    threshold: float = Field(default=0.5, ge=0, le=1)
    min_token_logprob: float | None = Field(default=None, le=0)
    samples: int = Field(
        default=0, ge=0, le=8,
        description="Extra small-model answers drawn alongside the main one (one request with "
        "n = samples) for self-consistency: a `learned` bundle trained with samples compares "
        "their final answers with the main one. Only where the whole answer is judged "
        "(buffer and non-streamed, no tools); late or failed samples are skipped.",
    )
    samples_temperature: float = Field(default=0.7, ge=0, le=2)


class Streaming(_Strict):
    mode: StreamMode = StreamMode.HOLDBACK
    holdback_tokens: int = Field(
        default=16, ge=1, le=4096, description="Prefix length scored in holdback.")
    holdback_ms: float = Field(
        default=400, gt=0, le=MAX_STEP_MS,
        description="Or score whatever arrived after this long."
    )


class CacheSettings(_Strict):
    """Response caching for this policy (exact and, where configured, semantic)."""

    enabled: bool = True
    ttl_s: int = Field(
        default=3600, ge=1, le=365 * 86400, description="How long a stored answer is served.")
    temperature_above_zero: bool = Field(
        default=False,
        description="Also cache requests that set temperature > 0 (their answers vary). "
        "Requests that leave temperature unset are cached.",
    )
    exact: bool = Field(default=True, description="Serve identical requests from the cache.")
    semantic: bool = Field(
        default=True,
        description="Serve reworded questions from the semantic cache (needs Redis with the "
        "query engine); every candidate must pass the pair verifier.",
    )
    semantic_max_false_hit_rate: float = Field(
        default=0.01, gt=0, le=0.5,
        description="Target share of different questions served a cached answer; picks the "
        "verifier's threshold from its calibration (worst negative kind, held-out families).",
    )
    semantic_threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="Explicit verifier probability threshold; overrides "
        "semantic_max_false_hit_rate.",
    )
    semantic_min_cosine: float = Field(
        default=0.6, ge=-1, le=1, description="Nearest neighbours below this never reach "
        "the verifier.",
    )
    semantic_candidates: int = Field(default=3, ge=1, le=20, description="KNN k.")
    multi_turn: Literal["identical_context", "never"] = Field(
        default="identical_context",
        description="Semantic reuse in conversations: only when the whole earlier context "
        "(system prompt, history, tools, parameters) is identical, or never.",
    )
    lookup_deadline_ms: float = Field(
        default=10, gt=0, le=MAX_STEP_MS,
        description="Deadline on the lookup (exact, embedding, search, verification), from "
        "its start; past it the request proceeds as a miss. The semantic search runs "
        "alongside the small model and may go on past it until the answer is ready.",
    )
    max_entries_per_tenant: int = Field(
        default=10000, ge=1, le=10_000_000,
        description="Entries kept per tenant under this policy; past it the entries closest "
        "to expiry (memory: least recently used) are evicted.",
    )
    semantic_audit_rate: float = Field(
        default=0.05, ge=0, le=1,
        description="Share of semantic hits audited: after the cached answer is sent, the "
        "small model answers the new question in the background and the two answers are "
        "compared. An entry the audit disagrees with serves only pairs the verifier rates "
        "above that hit's probability; after two disagreements it serves exact repeats only.",
    )
    semantic_audits_per_minute: float = Field(
        default=30, ge=0,
        description="Most audits a minute, per gateway process (sampled hits past it are "
        "counted as skipped_budget).",
    )


class TelemetrySettings(_Strict):
    record_content: bool = Field(
        default=False, description="Put prompt and completion text on trace spans."
    )


class LearningSettings(_Strict):
    """What this policy's traffic contributes to retraining the router (needs a decision log,
    `decision_log` in the gateway config)."""

    log_sample_rate: float = Field(default=0.0, ge=0, le=1,
                                   description="Share of routed requests written to the log.")
    log_escalations: bool = Field(
        default=False, description="Log every escalation: each one carries a free label.")
    log_text: bool = Field(
        default=False,
        description="Write prompt and answer text (needed to train on the rows; off by default).")
    shadow_rate: float = Field(
        default=0.0, ge=0, le=1,
        description="Share of small-answered requests also sent to the frontier, in the "
        "background, to label them.")
    shadow_per_minute: float = Field(default=10, ge=0, description="Shadow call budget.")
    judge: bool = Field(
        default=False, description="Label shadow calls by asking the frontier to judge the "
        "small answer (one more call) instead of comparing answers.")


_QUALITY = QualityTarget()  # the calibrator's defaults, one source for both


class QualitySettings(_Strict):
    """A quality target held online (`router.quality`): the confidence threshold is set from
    labels of this policy's own traffic instead of `confidence.threshold`."""

    target: float | None = Field(
        default=None, gt=0, lt=1,
        description="Served answers keep at least this share of the quality the frontier "
        "alone would give (e.g. 0.95); unset: the static confidence.threshold.")
    confidence: float = Field(default=_QUALITY.confidence, ge=0.5, lt=1,
                              description="One-sided confidence of the bound on the loss.")
    window: int = Field(default=_QUALITY.window, ge=100, le=1_000_000,
                        description="Scored requests remembered per segment (older ones drop "
                        "out, so the threshold follows drifting traffic).")
    min_labels: int = Field(default=_QUALITY.min_labels, ge=10,
                            description="Below this many labels in the window, escalate all.")
    refresh_every: int = Field(default=_QUALITY.refresh_every, ge=1,
                               description="Labels between two threshold searches.")
    skip_if_accepted_below: float = Field(
        default=_QUALITY.skip_if_accepted_below, ge=0, lt=1,
        description="Learn the difficulty skip threshold: skip the small model below the "
        "highest difficulty under which small answers would be accepted at less than this "
        "share of the segment's acceptance rate (an upper confidence bound); 0 turns "
        "learned skipping off.")
    skip_explore: float = Field(
        default=_QUALITY.skip_explore, gt=0, le=1,
        description="Share of would-be-skipped requests that still try the small model, so "
        "the skip threshold follows the traffic.")
    segment_by: Literal["none", "tenant"] = Field(
        default="none", description="One threshold per policy, or per policy and tenant.")


class Policy(_Strict):
    """One routing policy. Clients pass `name` (or an alias) as the request's `model`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    route: Literal["cascade", "small_only", "frontier_only"] = "cascade"
    allow_direct_models: bool = Field(
        default=True,
        description="Whether clients under this policy may name a backend model directly.",
    )
    difficulty: Difficulty = Field(default_factory=Difficulty)
    confidence: Confidence = Field(default_factory=Confidence)
    streaming: Streaming = Field(default_factory=Streaming)
    latency_budget: LatencyBudget = Field(default_factory=LatencyBudget)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    escalate_on_small_error: bool = Field(
        default=True,
        description="When the small model fails (an error, or down, restarting or answering "
        "503: escalation reason `small_unavailable`), escalate to the frontier; false fails "
        "fast instead: a small model that is down or overloaded is a 503 with Retry-After.")

    @model_validator(mode="after")
    def _quality_needs_shadow_labels(self) -> Policy:
        if self.quality.target is not None and self.learning.shadow_rate <= 0:
            raise ValueError("quality.target needs learning.shadow_rate > 0: accepted answers "
                             "are only labelled by shadow calls")
        return self

    @cached_property
    def quality_target(self) -> QualityTarget | None:
        """The calibrator's settings, or None where the static threshold applies."""
        q, learning = self.quality, self.learning
        if q.target is None:
            return None
        return QualityTarget(q.target, q.confidence, q.window, q.min_labels,
                             learning.shadow_rate, learning.shadow_per_minute, q.refresh_every,
                             q.skip_if_accepted_below, q.skip_explore)

    @model_validator(mode="after")
    def _aliases_distinct(self) -> Policy:
        names = [self.name, *self.aliases]
        if len(set(names)) != len(names):
            raise ValueError("name and aliases must all be different")
        return self

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]
