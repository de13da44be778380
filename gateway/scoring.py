"""The scorer interface the cascade engine routes with, and the transparent baselines.

A scorer returns a probability-like score in [0, 1] that the small model's answer is good
enough; thresholds live in the policy and are applied by the engine, never by the scorer.
The learned router plugs in by implementing the same two protocols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Prompt:
    """What the scorers may look at before generation."""

    messages: list[dict[str, Any]]
    has_tools: bool = False


@dataclass(frozen=True)
class Answer:
    """The small model's (possibly partial) answer."""

    text: str
    token_logprobs: list[float] = field(default_factory=list)
    complete: bool = True


class DifficultyScorer(Protocol):
    async def score(self, prompt: Prompt) -> float: ...


class ConfidenceScorer(Protocol):
    async def score(self, prompt: Prompt, answer: Answer) -> float | None:
        """None when the scorer cannot judge (e.g. no logprobs came back)."""
        ...


class AlwaysSmall:
    """Baseline difficulty: always try the small model first."""

    async def score(self, prompt: Prompt) -> float:
        return 1.0


class LogprobConfidence:
    """Baseline confidence: exp(mean token logprob), the geometric-mean token probability."""

    async def score(self, prompt: Prompt, answer: Answer) -> float | None:
        if not answer.token_logprobs:
            return None
        return math.exp(sum(answer.token_logprobs) / len(answer.token_logprobs))


class AcceptAll:
    """Confidence that accepts every small answer (for `small_only`-like policies)."""

    async def score(self, prompt: Prompt, answer: Answer) -> float | None:
        return 1.0


DIFFICULTY_SCORERS: dict[str, type] = {"always_small": AlwaysSmall}
CONFIDENCE_SCORERS: dict[str, type] = {"logprob": LogprobConfidence, "accept_all": AcceptAll}
