"""The semantic cache's guard: a budgeted sample of semantic hits checked after they are served.

The pair verifier serves a cached answer to a reworded question when its probability clears
the policy's threshold; on traffic unlike the pairs it learned from it can be wrong. After a
semantic hit has been sent (never before: the client does not wait for it), the guard draws
it with probability `semantic_audit_rate`, within `semantic_audits_per_minute` per process,
and has the small model answer the new question in the background. The two answers
*disagree* when `router.answer_agreement` (the stated final answers when both have one, else
token F1) is below AGREEMENT.

What audits find is kept on the entry, per entry, where every replica reads it with the
candidates of a search (see `SemanticIndex`): a disagreement at verifier probability p raises
that entry's own bar, so it serves only pairs rated above p from then on (a bar is raised,
never lowered); after STOP_AFTER disagreements the entry is no longer served semantically at
all (an identical request still gets it from the exact cache). Per-entry decisions learned
from verified outcomes, in the spirit of vCache (Schroeder et al., ICLR 2026).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.policy import CacheSettings
from gateway.ratelimit import TokenBucket
from gateway.types import CacheHit
from router import answer_agreement

log = logging.getLogger("smallfirst.cache")

AGREEMENT = 0.5  # answer_agreement below this: the audit disagrees with the cached answer
STOP_AFTER = 2  # disagreements after which an entry is no longer served semantically
RESULTS = ("agree", "disagree", "skipped_budget", "failed")

Ask = Callable[[], Awaitable[dict[str, Any]]]  # the small model's chat completion
Report = Callable[[str, dict[str, Any] | None], None]  # (result, the small model's response)
Keep = Callable[["SemanticHit", bool], Awaitable[None]]  # (hit, disagreed): onto the entry


@dataclass(frozen=True)
class SemanticHit(CacheHit):
    """A semantic hit with what its audit needs: the entry and the pair the verifier passed.
    `similarity` is the verifier's probability (a lower bound when the changed parts were not
    embedded)."""

    entry: str = ""  # the entry's Redis key
    cached_text: str = ""  # the cached request's final user turn
    text: str = ""  # the new request's final user turn
    cosine: float = 0.0


def answer_text(content: str | None, tool_calls: list[dict[str, Any]] | None) -> str:
    """What two answers are compared on: the text, or the tool calls' names and arguments."""
    if content:
        return content
    calls = []
    for call in tool_calls or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, sort_keys=True)
        calls.append(f"{function.get('name') or ''} {arguments or ''}")
    return " ".join(calls)


def disagrees(cached: str, fresh: str) -> bool:
    """The decision rule: the small model's answer does not agree with the cached one."""
    return answer_agreement(cached, fresh) < AGREEMENT


class CacheGuard:
    """Samples semantic hits, runs their audits in the background, and hands each outcome to
    `keep` (the cache writes it onto the entry). Results are counted in `counts` as
    `audit_<result>` and passed to the caller's `report`."""

    def __init__(self, keep: Keep, counts: Counter[str] | None = None,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep = keep
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.rng = rng
        self.clock = clock
        self._budgets: dict[str, TokenBucket] = {}
        self._tasks: set[asyncio.Task] = set()

    def sample(self, policy: str, settings: CacheSettings) -> str | None:
        """'audit' for a hit drawn and within budget, 'skipped_budget' for one drawn past the
        budget, None for one not drawn."""
        rate = settings.semantic_audit_rate
        if rate <= 0 or self.rng() >= rate:
            return None
        budget = self._budgets.get(policy)
        if budget is None or budget.per_minute != settings.semantic_audits_per_minute:
            budget = TokenBucket(settings.semantic_audits_per_minute, self.clock)
            self._budgets[policy] = budget
        return "audit" if budget.take() else "skipped_budget"

    def after_hit(self, hit: CacheHit, policy: str, settings: CacheSettings, ask: Ask,
                  report: Report | None = None) -> asyncio.Task | None:
        """Called once a hit is decided; returns at once. The audit task, if one started."""
        if not isinstance(hit, SemanticHit) or not hit.entry:
            return None
        drawn = self.sample(policy, settings)
        if drawn is None:
            return None
        if drawn == "skipped_budget":
            self._count(drawn, None, report)
            return None
        task = asyncio.ensure_future(self._audit(hit, ask, report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _audit(self, hit: SemanticHit, ask: Ask, report: Report | None) -> str:
        try:
            response = await ask()
            message = (response.get("choices") or [{}])[0].get("message") or {}
            fresh = answer_text(message.get("content"), message.get("tool_calls"))
        except Exception as exc:  # a failed audit decides nothing
            log.info("cache audit: the small model did not answer (%s)", exc)
            self._count("failed", None, report)
            return "failed"
        if not fresh.strip():
            self._count("failed", response, report)
            return "failed"
        cached = answer_text(hit.answer.content, hit.answer.tool_calls)
        disagreed = disagrees(cached, fresh)
        try:
            await self.keep(hit, disagreed)
        except Exception as exc:  # the cache logs its own failures; this must not escape
            log.warning("cache audit: outcome not kept: %s", exc)
        result = "disagree" if disagreed else "agree"
        self._count(result, response, report)
        return result

    def _count(self, result: str, response: dict[str, Any] | None,
               report: Report | None) -> None:
        self.counts[f"audit_{result}"] += 1
        if report is not None:
            try:
                report(result, response)
            except Exception as exc:
                log.warning("cache audit: report failed: %s", exc)

    async def drain(self) -> None:
        """Wait for the audits under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
