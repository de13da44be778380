"""Learning from traffic: labels from escalations and shadow calls, for a policy's quality
target and for a sampled decision log.

A request the small model answered can be labelled when the frontier answers the same
prompt: on every escalation (free), or by a shadow call made in the background for a
budgeted sample of requests the small model kept. The label is agreement between the two
answers (`router.agreement`), or, with `judge: true`, the frontier's own verdict (on
escalations too, within the policy's shadow budget).

- A policy with a quality target (`quality.target`) feeds every scored request and its label
  to its calibrator (`router.QualityTargets`, one per process), which draws the shadow sample
  itself and sets the threshold the engine accepts answers at. With Redis, the calibrators
  of every process pool their evidence (`gateway.quality_pool`).
- Rows go to a JSON-lines file and/or a bounded Redis Stream that every replica appends to;
  `smallfirst router train --from-log FILE|redis://...` turns them into training rows. Other
  policies' shadow calls are budgeted per policy, across replicas when the allowances live
  in Redis. Prompt and answer text are written only where the policy's `learning.log_text`
  allows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.quality_pool import QualityPool
from gateway.ratelimit import Allowances
from gateway.types import Call, Route
from router import QualityCalibrator, QualityTargets

log = logging.getLogger("smallfirst.learning")

AskFrontier = Callable[[dict[str, Any]], Awaitable[tuple[str, str]]]  # -> (model, text)
JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nReference answer:\n{reference}\n\n"
    "Candidate answer:\n{candidate}\n\nIs the candidate answer correct and complete enough "
    "to give to the user? Reply with one word: yes or no."
)


def quality_segment(call: Call) -> str:
    """The traffic segment whose labels set this request's acceptance threshold."""
    return call.tenant if call.policy.quality.segment_by == "tenant" else "all"


class DecisionStream:
    """The decision log as a Redis Stream, trimmed to about `maxlen` newest rows."""

    def __init__(self, client: Any, key: str, maxlen: int) -> None:
        self.client, self.key, self.maxlen = client, key, maxlen

    async def append(self, line: str) -> None:
        await self.client.xadd(self.key, {"row": line}, maxlen=self.maxlen, approximate=True)


class TrafficLearner:
    def __init__(
        self, path: Path | None, ask_frontier: AskFrontier | None,
        rng: Callable[[], float] = random.random, *,
        stream: DecisionStream | None = None, allowances: Allowances | None = None,
        quality: QualityTargets | None = None, pool: QualityPool | None = None,
    ) -> None:
        self.path = path
        self.ask_frontier = ask_frontier
        self.rng = rng
        self.stream = stream
        self.allowances = allowances or Allowances()
        self.quality = quality or QualityTargets(rng=rng)
        self.pool = pool  # shares the calibrators' evidence with the other processes
        self._tasks: set[asyncio.Task] = set()
        self._lock = threading.Lock()

    def observe(self, call: Call) -> None:
        """Decide, without blocking, what (if anything) this finished request contributes."""
        settings = call.policy.learning
        decision, small = call.decision, call.small_answer
        if decision is None or small is None or not small.text:
            return
        if self._calibrate(call) or (self.path is None and self.stream is None):
            return
        if call.frontier_text is not None:
            if settings.log_escalations or self.rng() < settings.log_sample_rate:
                self._spawn(self._write(call, call.frontier_text, "escalation"))
        elif (decision.route == Route.SMALL and self.ask_frontier is not None
              and self.rng() < settings.shadow_rate):
            self._spawn(self._shadow(call, sampled=self.rng() < settings.log_sample_rate))
        elif self.rng() < settings.log_sample_rate:
            self._spawn(self._write(call, None, None))

    def _calibrate(self, call: Call) -> bool:
        """Feed a quality-target policy's calibrator; True when it took the request (its
        label, if any, also goes to the decision log)."""
        spec, decision = call.policy.quality_target, call.decision
        if (spec is None or self.ask_frontier is None or decision.confidence is None
                or decision.escalation not in (None, "low_confidence")):
            return False  # other escalations go to the frontier whatever the threshold
        segment = quality_segment(call)
        calibrator = self.quality.calibrator(call.policy.name, segment, spec)
        escalated = decision.escalation == "low_confidence"
        entry, shadow = calibrator.record(decision.confidence, escalated, decision.difficulty,
                                          call.tried_probability)
        if self.pool is not None:
            self.pool.entered(call.policy.name, segment, entry)
        if escalated:
            self._spawn(self._escalation_label(call, calibrator, entry))
        elif shadow:
            self._spawn(self._shadow_label(call, calibrator, entry))
        return True

    async def _escalation_label(self, call: Call, calibrator: QualityCalibrator, entry
                                ) -> None:
        """An escalation's label: the frontier's verdict where the policy asks for a judge
        (within the shadow budget, once the small answer is whole), else the agreement."""
        verdict = None
        learning = call.policy.learning
        if learning.judge and call.frontier_text is not None \
                and (call.small_rest is None or await asyncio.shield(call.small_rest)) \
                and await self.allowances.take(f"judge:{call.policy.name}",
                                               learning.shadow_per_minute):
            try:
                verdict = await self._judge(call, call.frontier_text)
            except Exception as exc:  # the agreement labels it instead
                log.warning("judge call failed: %s", exc)
        await self._label(call, calibrator, entry, call.frontier_text, "escalation", verdict)

    async def _label(self, call: Call, calibrator: QualityCalibrator, entry,
                     frontier_text: str | None, source: str, verdict: float | None = None,
                     ) -> None:
        """Label the calibrator's entry (a missing frontier answer counts as the worst
        case), and log the row where the policy logs such rows. An escalated answer held
        back as a prefix is labelled once the small model has finished it (`small_rest`)."""
        finished = call.small_rest is None or await asyncio.shield(call.small_rest)
        if frontier_text is None or not finished:
            await asyncio.to_thread(calibrator.lose, entry)
            self._pooled(entry, shadow=False, lost=True)
            return
        small = verdict
        if small is None:
            from router import answer_agreement

            small = await asyncio.to_thread(answer_agreement, "".join(call.small_answer.text),
                                            frontier_text)
        await asyncio.to_thread(calibrator.label, entry, small, 1.0, source != "escalation")
        self._pooled(entry, shadow=source != "escalation", lost=False)
        settings = call.policy.learning
        if (self.path is not None or self.stream is not None) and (
                source != "escalation" or settings.log_escalations
                or self.rng() < settings.log_sample_rate):
            await self._write(call, frontier_text, source, verdict)

    def _pooled(self, entry, *, shadow: bool, lost: bool) -> None:
        if self.pool is not None:
            self.pool.labelled(entry, shadow, lost)

    async def _shadow_label(self, call: Call, calibrator: QualityCalibrator, entry) -> None:
        """The shadow call the calibrator drew (its own draw keeps within the budget)."""
        try:
            text, verdict = await self._ask(call)
        except Exception as exc:  # a label that was due and never came: the worst case
            log.warning("shadow call failed: %s", exc)
            await asyncio.to_thread(calibrator.lose, entry)
            self._pooled(entry, shadow=False, lost=True)
            return
        source = "judge" if verdict is not None else "shadow"
        await self._label(call, calibrator, entry, text, source, verdict)

    async def _shadow(self, call: Call, *, sampled: bool) -> None:
        """A shadow call if the policy's budget allows one now, else the row if sampled."""
        learning = call.policy.learning
        if not await self.allowances.take(f"shadow:{call.policy.name}",
                                          learning.shadow_per_minute):
            if sampled:
                await self._write(call, None, None)
            return
        try:
            text, verdict = await self._ask(call)
        except Exception as exc:  # a failed shadow call only loses one label
            log.warning("shadow call failed: %s", exc)
            return
        await self._write(call, text, "judge" if verdict is not None else "shadow", verdict)

    async def _ask(self, call: Call) -> tuple[str, float | None]:
        """The frontier's answer to the request, and its verdict on the small answer when
        the policy asks for one."""
        assert self.ask_frontier is not None
        call.frontier_model, text = await self.ask_frontier(call.params)
        return text, await self._judge(call, text) if call.policy.learning.judge else None

    async def _judge(self, call: Call, reference: str) -> float | None:
        assert self.ask_frontier is not None and call.prompt is not None
        question = JUDGE_PROMPT.format(question=call.prompt.text, reference=reference,
                                       candidate="".join(call.small_answer.text))
        _, verdict = await self.ask_frontier(
            {"messages": [{"role": "user", "content": question}], "temperature": 0,
             "max_tokens": 3})
        word = verdict.strip().lower()
        return 1.0 if word.startswith("yes") else 0.0 if word.startswith("no") else None

    async def _write(
        self, call: Call, frontier_text: str | None, source: str | None,
        verdict: float | None = None,
    ) -> None:
        try:
            row = await asyncio.to_thread(_row, call, frontier_text, source, verdict)
            line = json.dumps(row, default=str)
            if self.path is not None:
                await asyncio.to_thread(self._append, line)
            if self.stream is not None:
                await self.stream.append(line)
        except Exception as exc:
            log.warning("decision log write failed: %s", exc)

    def _append(self, line: str) -> None:
        with self._lock, open(self.path, "a") as out:
            out.write(line + "\n")

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for pending writes and shadow calls (at shutdown, and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _row(call: Call, frontier_text: str | None, source: str | None,
         verdict: float | None) -> dict[str, Any]:
    from router import FEATURE_NAMES, answer_agreement, feature_row

    decision, small = call.decision, call.small_answer
    prompt = call.prompt.text if call.prompt else ""
    answer = small.answer()
    small_text = answer.text
    features = feature_row(prompt, small_text, answer.token_logprobs or None, answer.top_logprobs)
    values = [v if math.isfinite(v) else None for v in features.tolist()]
    label = verdict
    if label is None and frontier_text is not None:
        label = answer_agreement(small_text, frontier_text)
    row: dict[str, Any] = {
        "ts": round(time.time(), 3), "request_id": call.request_id, "policy": call.policy.name,
        "route": decision.route.value, "escalation": decision.escalation,
        "difficulty": decision.difficulty, "confidence": decision.confidence,
        "small_model": small.model, "large_model": call.frontier_model,
        "label_source": source, "agreement": label,
        "features": dict(zip(FEATURE_NAMES, values, strict=True)),
    }
    if call.policy.learning.log_text:
        row.update(prompt=prompt, small_response=small_text, large_response=frontier_text)
    return row

