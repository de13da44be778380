"""The scorer interface the cascade engine routes with: the transparent baselines and the
learned router's bundles.

A scorer returns a probability-like score in [0, 1] that the small model's answer is good
enough (None: no opinion); thresholds live in the policy and are applied by the engine,
never by the scorer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from gateway.types import Answer, Prompt

log = logging.getLogger("smallfirst.scoring")


class DifficultyScorer(Protocol):
    async def score(self, prompt: Prompt) -> float | None: ...


class ConfidenceScorer(Protocol):
    async def score(self, prompt: Prompt, answer: Answer) -> float | None:
        """None when the scorer cannot judge (e.g. no logprobs came back)."""
        ...


class AlwaysSmall:
    """Baseline difficulty: always try the small model first."""

    async def score(self, prompt: Prompt) -> float | None:
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


# The baselines, by the name a policy uses; `learned` scorers come from BundleRegistry.
DIFFICULTY_SCORERS: dict[str, type] = {"always_small": AlwaysSmall}
CONFIDENCE_SCORERS: dict[str, type] = {"logprob": LogprobConfidence, "accept_all": AcceptAll}


class NoOpinion:
    """A scorer that cannot judge (e.g. its bundle failed to load)."""

    async def score(self, prompt: Prompt, answer: Answer | None = None) -> float | None:
        return None


NO_OPINION = NoOpinion()


class LearnedDifficulty:
    """The router bundle's difficulty model; no opinion if the embedding misses its deadline."""

    def __init__(self, bundle: Any, embedding_deadline_s: float) -> None:
        self.bundle = bundle
        self.deadline_s = embedding_deadline_s

    async def score(self, prompt: Prompt) -> float | None:
        try:
            embedding = await _embedding(prompt, self.deadline_s)
            return await asyncio.to_thread(self.bundle.difficulty, prompt.text, embedding)
        except TimeoutError:
            return None
        except Exception as exc:  # a failing embedder or bundle: the policy's default route
            log.warning("difficulty scoring failed, scoring without it: %s", exc)
            return None


class LearnedConfidence:
    """The router bundle's confidence model on the prompt, the answer and its logprobs."""

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle

    async def score(self, prompt: Prompt, answer: Answer) -> float | None:
        try:
            embedding = await _embedding(prompt, None)
            return await asyncio.to_thread(
                self.bundle.confidence, prompt.text, answer.text,
                answer.token_logprobs or None, embedding, answer.top_logprobs, answer.samples,
            )
        except Exception as exc:  # a failing embedder or bundle: no opinion
            log.warning("confidence scoring failed, scoring without it: %s", exc)
            return None


async def _embedding(prompt: Prompt, deadline_s: float | None) -> Any:
    if prompt.embedding is None:
        return None
    async with asyncio.timeout(deadline_s):
        rows = await asyncio.shield(prompt.embedding)
    return rows[0]


class BundleRegistry:
    """Router bundles by path, loaded (hash-checked) once and reloaded when they change.

    Relative paths resolve against `root` (the policies directory); `default` is the
    bundle shipped with the router package.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[Path, tuple[float, Any]] = {}
        self._checked: dict[str, tuple[float, Any]] = {}  # name -> (when, bundle)
        self.failures: dict[str, str] = {}  # name -> why it cannot load, until it does
        self._lock = threading.Lock()

    def resolve(self, name: str) -> Path:
        from router import DEFAULT_BUNDLE

        if name == "default":
            return DEFAULT_BUNDLE
        path = Path(name)
        return path if path.is_absolute() else self.root / path

    def get(self, name: str) -> Any:
        """The bundle named by a policy (blocking: call from a worker thread)."""
        from router import RouterBundle

        path = self.resolve(name)
        stamp = _stamp(path)
        with self._lock:
            loaded = self._loaded.get(path)
            if loaded is None or loaded[0] != stamp:
                try:
                    bundle = RouterBundle.load(path)
                except Exception as exc:
                    self.failures[name] = f"{type(exc).__name__}: {exc}"
                    raise
                self.failures.pop(name, None)
                log.info("router bundle %s loaded (version %s)", path, bundle.version)
                self._loaded[path] = (stamp, bundle)
                loaded = self._loaded[path]
            return loaded[1]


    async def aget(self, name: str) -> Any:
        """`get` without blocking the loop; the files are re-checked at most every
        `RECHECK_S` seconds, so a swapped bundle is picked up soon after it lands."""
        checked = self._checked.get(name)
        now = time.monotonic()
        if checked is not None and now - checked[0] < RECHECK_S:
            return checked[1]
        bundle = await asyncio.to_thread(self.get, name)
        self._checked[name] = (now, bundle)
        return bundle


RECHECK_S = 2.0


def _stamp(path: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in path.iterdir())
    except (OSError, ValueError):
        return 0.0
