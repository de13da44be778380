"""The cascade engine: difficulty -> small model -> confidence -> accept or escalate.

Plain asyncio, no HTTP. Input is an OpenAI chat request (already validated); output is an
OpenAI `chat.completion` dict or a stream of `chat.completion.chunk` dicts, plus the routing
`Decision` the caller reports. The small model is always read as a stream so its time to
first token can be held to the policy's latency budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span

from gateway.backends import Backend, BackendFailure
from gateway.cache.base import ResponseCache
from gateway.config import RetryConfig
from gateway.deadlines import FirstTokenTimes, SmallDeadlines, small_deadlines
from gateway.embedding import Embed
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelUnavailable,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.learning import TrafficLearner, quality_segment
from gateway.policy import Policy, StreamMode
from gateway.retry import call_with_retry
from gateway.scoring import (
    CONFIDENCE_SCORERS,
    DIFFICULTY_SCORERS,
    NO_OPINION,
    BundleRegistry,
    ConfidenceScorer,
    DifficultyScorer,
    LearnedConfidence,
    LearnedDifficulty,
)
from gateway.shapes import cached_from_response, replay_chunks, replay_response
from gateway.telemetry import genai
from gateway.telemetry.tracing import outgoing_headers
from gateway.types import (
    Assembly,
    CachedAnswer,
    CacheHit,
    Call,
    Decision,
    Prompt,
    Route,
    Usage,
)
from router import QualityTargets

log = logging.getLogger("smallfirst.engine")
T = TypeVar("T")


SHADOW_TIMEOUT_S = 60.0
# The small model refused the request itself (tools, context length, a response format it
# cannot honour): a frontier may serve it; without one, the client gets the 4xx.
UNSUPPORTED_STATUS = (400, 404, 413, 422)


class _Served(Exception):  # noqa: N818 (a signal, not an error)
    """Internal: a semantic cache hit came before the answer: it is served instead."""

    def __init__(self, hit: CacheHit) -> None:
        super().__init__(hit.kind)
        self.hit = hit


class Escalate(Exception):
    """Internal: the small attempt ended without an acceptable answer."""

    def __init__(self, reason: str, failure: BackendFailure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


def to_gateway_error(failure: BackendFailure) -> GatewayError:
    """What the client sees when no backend could answer."""
    if failure.timeout:
        return UpstreamTimeout(f"Upstream model timed out ({failure.backend}).")
    if failure.status == 429:
        return RateLimited(
            f"Upstream rate limit ({failure.backend}).", retry_after=failure.retry_after or 1
        )
    if failure.status in (400, 404, 413, 422):
        return InvalidRequest(f"The model rejected the request: {failure.message}")
    return UpstreamError(f"Upstream model failed ({failure.backend}): {failure.message}")


def _small_error(failure: BackendFailure) -> GatewayError:
    """What the client sees when the small model failed and the request stays with it: a
    small model that is down or shedding load is a 503 with Retry-After, to come back."""
    if failure.unavailable:
        return ModelUnavailable(
            f"The small model is unavailable ({failure.backend}); retry shortly.",
            retry_after=failure.retry_after or 1)
    return to_gateway_error(failure)


class CascadeEngine:
    """Routes chat requests across one small backend and an ordered list of frontier ones."""

    def __init__(
        self,
        small: Backend,
        frontiers: list[Backend],
        retry: RetryConfig,
        difficulty: dict[str, DifficultyScorer] | None = None,
        confidence: dict[str, ConfidenceScorer] | None = None,
        cache: ResponseCache | None = None,
        bundles: BundleRegistry | None = None,
        embed: Embed | None = None,
    ) -> None:
        self.small = small
        self.learner: TrafficLearner | None = None  # with a decision log or a frontier
        self.quality = QualityTargets()  # thresholds of the policies with a quality target
        # Where cache-audit results go (the metrics, when on): policy, result, model, response.
        self.audited: Callable[[str, str, str, Any], None] = lambda *outcome: None
        self.bundles = bundles
        self.embed = embed
        self.cache = cache
        self._writes: set[asyncio.Task] = set()
        self.frontiers = frontiers
        self.retry = retry
        self.difficulty = difficulty or {k: cls() for k, cls in DIFFICULTY_SCORERS.items()}
        self.first_tokens = FirstTokenTimes()  # fits the small model's deadlines to the machine
        self.confidence = confidence or {k: cls() for k, cls in CONFIDENCE_SCORERS.items()}

    @property
    def backend_names(self) -> list[str]:
        return [self.small.name, *(f.name for f in self.frontiers)]

    # ---- non-streamed -------------------------------------------------------------------

    async def complete(self, call: Call) -> tuple[dict[str, Any], Decision]:
        decision = call.decision = Decision(policy=call.policy.name)
        hit = await self._lookup(call, decision)
        if hit is None:
            try:
                response = await self._alongside_lookup(
                    call, self._complete_uncached(call, decision))
            except _Served as served:
                hit, decision = served.hit, self._serve_semantic(call, served.hit)
            else:
                self._answered(call,
                               cached_from_response(response) if decision.note is None else None)
                return response, decision
        return replay_response(hit.answer, call.completion_id), decision

    async def _complete_uncached(self, call: Call, decision: Decision) -> dict[str, Any]:
        if await self._plan(call, decision) == "small":
            small = Assembly()
            try:
                await self._run_small(call, decision, small, holdback=False)
                return self._small_response(call, small)
            except Escalate as esc:
                return await self._escalate(
                    call, decision, esc, small, lambda: self._frontier_complete(call),
                    lambda: self._small_response(call, small))
        return await self._frontier_complete(call)

    async def _frontier_complete(self, call: Call) -> dict[str, Any]:
        timeout = call.policy.latency_budget.escalation / 1000

        async def attempt(backend: Backend) -> dict[str, Any]:
            return await backend.complete(
                call.params, timeout=timeout, headers=outgoing_headers()
            )

        with call.timings.measure("frontier"):
            backend, span, response = await self._over_frontiers(call, attempt)
        choice = response["choices"][0] if response.get("choices") else {}
        genai.record_response(
            span, model=response.get("model"), response_id=response.get("id"),
            finish_reason=choice.get("finish_reason"), usage=response.get("usage"),
            content=(choice.get("message") or {}).get("content")
            if call.policy.telemetry.record_content else None,
        )
        span.end()
        call.frontier_model = response.get("model") or backend.name
        call.frontier_text = (choice.get("message") or {}).get("content") or ""
        call.usage.add(response.get("usage"), backend.name)
        response.update(id=call.completion_id, usage=call.usage.as_dict())
        response["model"] = response.get("model") or backend.name
        return response

    def _small_response(self, call: Call, small: Assembly) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": small.message(),
            "finish_reason": small.finish_reason or "stop",
        }
        choice["logprobs"] = {"content": small.logprobs} if call.wants_logprobs else None
        return {
            "id": call.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": small.model or self.small.name,
            "choices": [choice],
            "usage": call.usage.as_dict(),
        }

    # ---- streamed -----------------------------------------------------------------------

    async def stream(self, call: Call) -> tuple[AsyncIterator[dict[str, Any]], Decision]:
        """Decide the route, then return the chunks to send.

        Everything that can still change the route happens before this returns, so the
        caller can send headers; after that, failures surface from the iterator as
        GatewayError and must be reported in-band.
        """
        decision = call.decision = Decision(policy=call.policy.name)
        hit = await self._lookup(call, decision)
        if hit is None:
            try:
                return await self._alongside_lookup(
                    call, self._stream_uncached(call, decision)), decision
            except _Served as served:
                hit, decision = served.hit, self._serve_semantic(call, served.hit)
        return self._replay(call, hit), decision

    async def _stream_uncached(self, call: Call, decision: Decision
                               ) -> AsyncIterator[dict[str, Any]]:
        if await self._plan(call, decision) == "small":
            small = Assembly()
            mode = call.policy.streaming.mode
            try:
                rest = await self._run_small(
                    call, decision, small, holdback=mode != StreamMode.BUFFER
                )
            except Escalate as esc:
                return await self._escalate(
                    call, decision, esc, small, lambda: self._frontier_stream(call),
                    lambda: self._small_chunks(call, small, None, store=False))
            return self._small_chunks(call, small, rest, store=True)
        return await self._frontier_stream(call)

    async def _replay(self, call: Call, hit: CacheHit) -> AsyncIterator[dict[str, Any]]:
        for chunk in replay_chunks(hit.answer, call.completion_id):
            yield chunk
        if call.include_usage:
            yield self._usage_chunk(call, hit.answer.model, Usage())

    async def _small_chunks(
        self,
        call: Call,
        small: Assembly,
        rest: AsyncIterator[dict[str, Any]] | None,
        *,
        store: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            for chunk in small.chunks:
                yield self._outgoing(call, chunk)
            if rest is not None:
                # The client has the start of this answer: nothing can take over now, so a
                # silence is cut short only when it outlasts the small model's whole timeout.
                # The first-token deadline cut answers on a busy machine (vLLM on CPU pauses
                # every stream for seconds while it prefills another prompt).
                gap = call.policy.latency_budget.small_timeout / 1000
                async with aclosing(self._relay(call, small, rest, gap, self.small.name)) as out:
                    async for chunk in out:
                        yield chunk
        finally:
            if rest is not None:  # also when the client left before the held part was sent
                await _aclose(rest)
                self._small_done(call, small)
        if rest is not None:
            call.usage.add(small.usage, self.small.name)
        self._answered(call, small.cached(self.small.name) if store else None)
        if call.include_usage:
            yield self._usage_chunk(call, small.model or self.small.name, call.usage)

    async def _frontier_stream(
        self, call: Call
    ) -> AsyncIterator[dict[str, Any]]:
        timeout = call.policy.latency_budget.escalation / 1000

        async def attempt(backend: Backend) -> tuple[dict, AsyncIterator[dict]]:
            chunks = await backend.stream(call.params, timeout=timeout, headers=outgoing_headers())
            try:
                async with asyncio.timeout(timeout):
                    first = await anext(chunks)
            except BaseException:
                await _aclose(chunks)
                raise
            return first, chunks

        started = time.monotonic()
        with call.timings.measure("frontier_ttft"):
            backend, span, (first, chunks) = await self._over_frontiers(call, attempt)
        answer = Assembly()
        answer.started, answer.span = started, span
        answer.absorb(first)
        return self._frontier_chunks(call, backend, answer, first, chunks, timeout)

    async def _frontier_chunks(
        self,
        call: Call,
        backend: Backend,
        answer: Assembly,
        first: dict[str, Any],
        chunks: AsyncIterator[dict[str, Any]],
        gap: float,
    ) -> AsyncIterator[dict[str, Any]]:
        model = first.get("model") or backend.name
        try:
            if first.get("choices"):
                yield self._outgoing(call, first, model)
            async with aclosing(self._relay(call, answer, chunks, gap, backend.name,
                                            model)) as out:
                async for chunk in out:
                    yield chunk
        finally:
            await _aclose(chunks)
            call.timings.add("frontier", (time.monotonic() - answer.started) * 1000)
            genai.finish_answer(answer, call.policy.telemetry.record_content)
        call.usage.add(answer.usage, backend.name)
        call.frontier_model, call.frontier_text = model, "".join(answer.text)
        self._answered(call, answer.cached(model))
        if call.include_usage:
            yield self._usage_chunk(call, model, call.usage)

    async def _relay(
        self, call: Call, answer: Assembly, chunks: AsyncIterator[dict[str, Any]], gap: float,
        backend: str, model: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """A model's remaining chunks, assembled into `answer` and passed on; a stall past
        `gap` or a failure after the first byte becomes an in-band error."""
        try:
            async for chunk in _with_gap_deadline(chunks, gap):
                answer.absorb(chunk)
                if chunk.get("choices"):
                    yield self._outgoing(call, chunk, model)
        except (BackendFailure, TimeoutError) as exc:
            genai.record_error(answer.span, exc)
            raise _midstream_error(backend, exc) from exc
        finally:
            await _aclose(chunks)

    def _outgoing(
        self, call: Call, chunk: dict[str, Any], model: str | None = None
    ) -> dict[str, Any]:
        out = {**chunk, "id": call.completion_id, "object": "chat.completion.chunk"}
        out.pop("usage", None)
        if model:
            out["model"] = model
        if not call.wants_logprobs:
            out["choices"] = [{k: v for k, v in c.items() if k != "logprobs"}
                              for c in chunk["choices"]]
        return out

    def _usage_chunk(self, call: Call, model: str, usage: Usage) -> dict[str, Any]:
        return {
            "id": call.completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [],
            "usage": usage.as_dict(),
        }

    # ---- shared steps -------------------------------------------------------------------

    async def _escalate(self, call: Call, decision: Decision, esc: Escalate, small: Assembly,
                        frontier: Callable[[], Awaitable[T]], small_answer: Callable[[], T]) -> T:
        """After the small attempt failed to satisfy: the frontier's answer, or the small one
        when every frontier failed and the small answer is complete."""
        usable = esc.failure is None and small.finish_reason is not None
        decision.route, decision.escalation = Route.ESCALATED, esc.reason
        try:
            return await frontier()
        except GatewayError:
            if not usable:
                raise
            decision.route, decision.note = Route.SMALL, "frontier_failed"
            return small_answer()

    async def _lookup(self, call: Call, decision: Decision) -> CacheHit | None:
        """An exact hit to serve now; on a miss, a semantic search may go on in
        `call.semantic_lookup`, alongside the answer (`_alongside_lookup`)."""
        if self.cache is None or not call.read_cache or not call.cacheable:
            return None
        with call.timings.measure("cache"):
            hit, semantic = await self.cache.lookup_staged(call.cache_request())
        decision.cache = hit.kind if hit is not None else "miss"
        if hit is not None:
            decision.route = Route.CACHE_EXACT
            call.served_from_cache = hit.answer.usage
        elif semantic is not None:
            call.semantic_lookup = semantic
            started = time.perf_counter()  # its time adds to the `cache` step's when it ends
            semantic.search.add_done_callback(lambda _: call.timings.add(
                "cache", (time.perf_counter() - started) * 1000))
        return hit

    async def _alongside_lookup(self, call: Call, work: Awaitable[T]) -> T:
        """`work` (the answer without the cache) while the semantic lookup goes on.

        A hit is served (`_Served`) and the small model's request cancelled. The lookup may
        run past its deadline while the answer is not ready; once it is (or once the
        frontier would be asked: `_lookup_settled`), the deadline holds."""
        pending = call.semantic_lookup
        if pending is None:
            return await work
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({pending.search, task}, return_when=asyncio.FIRST_COMPLETED)
            await self._lookup_settled(call)
            return await task
        finally:
            task.cancel()  # when the hit won; its outcome is read either way
            await asyncio.gather(task, return_exceptions=True)

    async def _lookup_settled(self, call: Call) -> None:
        """The pending semantic lookup's outcome, read once (within its deadline): a hit is
        served instead of what was under way."""
        pending, call.semantic_lookup = call.semantic_lookup, None
        if pending is not None and (hit := await self.cache.settle(pending)) is not None:
            raise _Served(hit)

    def _serve_semantic(self, call: Call, hit: CacheHit) -> Decision:
        """The decision of a request a semantic hit answered, whatever was tried before."""
        decision = call.decision = Decision(policy=call.policy.name, cache=hit.kind,
                                            route=Route.CACHE_SEMANTIC)
        call.served_from_cache, call.small_answer = hit.answer.usage, None
        self._audit(call, hit)
        return decision

    def _audit(self, call: Call, hit: CacheHit) -> None:
        """The cache's guard may have the small model answer a semantic hit's question in the
        background (gateway.cache.guard); its tokens are a background call's, not the client's."""
        guard = getattr(self.cache, "guard", None)
        if guard is None:
            return
        params = {k: v for k, v in call.params.items() if k not in ("stream", "stream_options")}
        timeout, policy = call.policy.latency_budget.small_timeout / 1000, call.policy.name
        guard.after_hit(
            hit, policy, call.policy.cache,
            lambda: self.small.complete(params, timeout=timeout, headers=outgoing_headers()),
            lambda result, response: self.audited(policy, result, self.small.name, response))

    async def ask_frontier(self, params: dict[str, Any]) -> tuple[str, str]:
        """One answer from the first frontier that gives one (for shadow calls): model, text."""
        last: Exception | None = None
        for backend in self.frontiers:
            try:
                response = await backend.complete(params, timeout=SHADOW_TIMEOUT_S)
            except BackendFailure as exc:
                last = exc
                continue
            message = response["choices"][0].get("message") or {}
            return response.get("model") or backend.name, message.get("content") or ""
        raise last or UpstreamError("No frontier model is configured.")

    def _answered(self, call: Call, answer: CachedAnswer | None) -> None:
        """The end of every answer, streamed or not: the traffic learner sees it, and a complete
        answer the policy stands behind (`answer`) is cached, off the request path."""
        if self.learner is not None:
            self.learner.observe(call)
        if answer is None or self.cache is None or not call.write_cache or not call.cacheable:
            return
        task = asyncio.create_task(self.cache.store(call.cache_request(), answer))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _plan(self, call: Call, decision: Decision) -> str:
        """'small' to try the small model first, else 'frontier'."""
        policy = call.policy
        if call.direct is not None:
            if call.direct == self.small.name:
                decision.route = Route.SMALL
                return "small"
            decision.route = Route.FRONTIER
            return "frontier"
        if policy.route == "frontier_only":
            decision.route = Route.FRONTIER
            return "frontier"
        if policy.route == "small_only":
            return "small"
        with call.timings.measure("difficulty"):
            scorer = await self._difficulty_scorer(policy)
            decision.difficulty = await scorer.score(self._prompt(call))
        skip = policy.difficulty.skip_threshold
        below = decision.difficulty is not None and decision.difficulty < skip
        if self.frontiers and (below or not self._tries_small(call, decision.difficulty)):
            decision.route, decision.escalation = Route.FRONTIER, "difficulty"
            return "frontier"
        return "small"

    def _tries_small(self, call: Call, difficulty: float | None) -> bool:
        """Under a quality target, whether the request tries the small model at the skip
        threshold its labels set (a sampled share below it still does, see `router.quality`)."""
        spec = call.policy.quality_target
        if spec is None or difficulty is None:
            return True
        segment = quality_segment(call)
        calibrator = self.quality.calibrator(call.policy.name, segment, spec)
        tried, call.tried_probability = calibrator.plan(difficulty)
        pool = self.learner and self.learner.pool
        if not tried and pool:  # the other processes' windows count it too
            pool.skipped(call.policy.name, segment, difficulty, call.tried_probability)
        return tried

    def _prompt(self, call: Call) -> Prompt:
        """The request as the scorers see it, built once; its embedding starts computing
        in a worker thread as soon as a learned scorer will want it."""
        if call.prompt is None:
            policy = call.policy
            prompt = Prompt(call.params["messages"], has_tools=bool(call.params.get("tools")))
            wants = policy.difficulty.scorer == "learned" or (
                policy.confidence.scorer == "learned"
                and _judged(policy, self._escalation_enabled(call)))
            if wants and self.embed is not None:
                embed = self.embed
                future = asyncio.ensure_future(asyncio.to_thread(embed, [prompt.text]))
                # Read by the scorers, if at all: a failed embedding is not an unhandled one.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
                prompt = replace(prompt, embedding=future)
            call.prompt = prompt
        return call.prompt

    async def _difficulty_scorer(self, policy: Policy) -> DifficultyScorer:
        if policy.difficulty.scorer != "learned":
            return self.difficulty[policy.difficulty.scorer]
        bundle = await self._bundle(policy.difficulty.bundle)
        if bundle is None:
            return NO_OPINION
        return LearnedDifficulty(bundle, policy.latency_budget.embedding / 1000)

    async def _confidence_scorer(self, policy: Policy) -> ConfidenceScorer:
        if policy.confidence.scorer != "learned":
            return self.confidence[policy.confidence.scorer]
        bundle = await self._bundle(policy.confidence.bundle)
        return NO_OPINION if bundle is None else LearnedConfidence(bundle)

    async def _bundle(self, name: str) -> Any:
        """A policy's router bundle; None (scorers without opinion) if it cannot load."""
        if self.bundles is None:
            return None
        try:
            return await self.bundles.aget(name)
        except Exception as exc:  # a broken bundle must not fail requests
            log.error("router bundle %r unusable, scoring without it: %s", name, exc)
            return None

    def _escalation_enabled(self, call: Call) -> bool:
        """Whether a frontier could take over this request from the small model."""
        return call.direct is None and call.policy.route == "cascade" and bool(self.frontiers)

    def _small_deadlines(self, call: Call) -> SmallDeadlines:
        return small_deadlines(call.policy.latency_budget, self._escalation_enabled(call),
                               self.first_tokens)

    async def _run_small(
        self, call: Call, decision: Decision, small: Assembly, *, holdback: bool
    ) -> AsyncIterator[dict[str, Any]] | None:
        """Run the small model until its answer (or, in holdback, a prefix) can be judged.

        Returns the rest of the stream when a held-back prefix was accepted mid-answer.
        Raises Escalate when the answer should go to the frontier instead.
        """
        policy = call.policy
        streaming = policy.streaming
        deadlines = self._small_deadlines(call)
        may_escalate = self._escalation_enabled(call)
        chunks: AsyncIterator[dict[str, Any]] | None = None
        params = {**call.params, "logprobs": True}
        call.small_answer = small
        small.started = time.monotonic()
        samples = self._start_samples(call, holdback)
        small.span = call.timings.start_span(
            f"chat {self.small.name}", self._request_attributes(call, self.small, params, 1)
        )
        try:
            with trace.use_span(small.span, end_on_exit=False):
                chunks = await self.small.stream(
                    params, timeout=deadlines.ttft_s, headers=outgoing_headers()
                )
                prefix_done = await _read_small(
                    chunks, small,
                    ttft=deadlines.ttft_s,
                    total=deadlines.total_s,
                    hold_tokens=streaming.holdback_tokens if holdback else None,
                    hold_s=streaming.holdback_ms / 1000 if holdback else None,
                    direct=holdback and streaming.mode == StreamMode.DIRECT,
                )
        except (BackendFailure, TimeoutError) as exc:
            await _aclose(chunks)
            _cancel(samples)
            failure = exc if isinstance(exc, BackendFailure) else BackendFailure(
                self.small.name, "deadline passed", timeout=True)
            if failure.timeout and small.first_token_at is None:  # at least this long
                self.first_tokens.observe((time.monotonic() - small.started) * 1000)
            genai.record_error(small.span, failure)
            self._small_done(call, small)
            call.usage.add(small.usage, self.small.name)
            reason = ("deadline" if failure.timeout else
                      "unsupported" if failure.status in UNSUPPORTED_STATUS else
                      "small_unavailable" if failure.unavailable else "error")
            if not (may_escalate and policy.escalate_on_small_error):
                raise _small_error(failure) from exc
            raise Escalate(reason, failure) from exc
        except BaseException:
            await _aclose(chunks)
            _cancel(samples)
            self._small_done(call, small)
            raise
        if not prefix_done:
            call.usage.add(small.usage, self.small.name)
            self._small_done(call, small)
        if streaming.mode == StreamMode.DIRECT and holdback:
            return chunks if prefix_done else None
        rejected = await self._judge(call, decision, small, may_escalate,
                                     await self._samples(call, samples))
        if rejected is not None:
            if prefix_done and self._labels_escalations(call):
                call.small_rest = self._finish_for_label(call, small, chunks)
            else:
                await _aclose(chunks)
            if prefix_done:
                spent = small.usage or {"completion_tokens": small.tokens}
                call.usage.add(spent, self.small.name)
                self._small_done(call, small)
            raise Escalate(rejected)
        return chunks if prefix_done else None

    def _labels_escalations(self, call: Call) -> bool:
        return call.policy.quality_target is not None and self.learner is not None \
            and bool(self.frontiers)

    def _finish_for_label(self, call: Call, small: Assembly,
                          chunks: AsyncIterator[dict[str, Any]]) -> asyncio.Task:
        """A held-back prefix was rejected: the small model finishes its answer in the
        background, unseen by the client, so that the quality target's label compares whole
        answers (a prefix would understate every small answer, and the target would never
        let the small model serve). True when the answer ended in time."""
        gap = self._small_deadlines(call).gap_s
        budget = call.policy.latency_budget.escalation / 1000

        async def finish() -> bool:
            try:
                async with asyncio.timeout(budget):
                    async for chunk in _with_gap_deadline(chunks, gap):
                        small.absorb(chunk)
            except (BackendFailure, TimeoutError):
                return False
            finally:
                await _aclose(chunks)
            return small.finish_reason is not None

        task = asyncio.create_task(finish())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _start_samples(self, call: Call, holdback: bool) -> asyncio.Task | None:
        """Draw the policy's extra small-model answers alongside the main stream (vLLM shares
        the prompt's prefill between them). Not for holdback, which judges a prefix."""
        k = call.policy.confidence.samples
        if not k or holdback or call.params.get("tools"):
            return None
        params = {key: value for key, value in call.params.items()
                  if key not in ("logprobs", "top_logprobs", "stream", "stream_options")}
        params.update(n=k, temperature=call.policy.confidence.samples_temperature)
        return asyncio.create_task(self.small.complete(
            params, timeout=self._small_deadlines(call).total_s,
            headers=outgoing_headers()))

    async def _samples(self, call: Call, task: asyncio.Task | None) -> list[str] | None:
        """The extra answers once the main one is done, if they come within the small model's
        time budget; None (the scorer does without) when they fail or are late."""
        if task is None:
            return None
        started = call.small_answer.started if call.small_answer else time.monotonic()
        left = self._small_deadlines(call).total_s - (time.monotonic() - started)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                response = await asyncio.shield(task)
        except (BackendFailure, TimeoutError):
            _cancel(task)
            return None
        call.usage.add(response.get("usage"), self.small.name)
        return [(choice.get("message") or {}).get("content") or ""
                for choice in response.get("choices") or []]

    def _small_done(self, call: Call, small: Assembly) -> None:
        """The small stream is over: record its time to first token and generation time."""
        ended = time.monotonic()
        first = small.first_token_at or ended
        call.timings.add("small_ttft", (first - small.started) * 1000)
        if small.first_token_at is not None:
            self.first_tokens.observe((first - small.started) * 1000)
        if small.first_token_at is not None:
            call.timings.add("small_generation", (ended - first) * 1000)
        genai.finish_answer(small, call.policy.telemetry.record_content)

    def _request_attributes(
        self, call: Call, backend: Backend, params: dict[str, Any], attempt: int
    ) -> dict[str, Any]:
        return genai.request_attributes(
            backend.config.model, backend.name, params, attempt,
            call.policy.telemetry.record_content,
        )

    async def _judge(
        self, call: Call, decision: Decision, small: Assembly, may_escalate: bool,
        samples: list[str] | None = None,
    ) -> str | None:
        """Why the small answer is not good enough (`invalid_tool_call`, `invalid_json`,
        `low_confidence`), or None to serve it; with nowhere to escalate it is served anyway,
        and flagged."""
        policy = call.policy
        answer = replace(small.answer(), samples=samples)
        judged = _judged(policy, may_escalate)
        if judged:
            with call.timings.measure("confidence"):
                scorer = await self._confidence_scorer(policy)
                decision.confidence = await scorer.score(self._prompt(call), answer)
        floor = policy.confidence.min_token_logprob
        confident = not judged or (
            decision.confidence is not None
            and decision.confidence >= self._acceptance_threshold(call)
            and (floor is None or all(lp >= floor for lp in answer.token_logprobs)))
        rejected = ("invalid_tool_call" if not _tool_calls_parse(small) else
                    "invalid_json" if not _json_parses(call, small) else
                    None if confident else "low_confidence")
        if rejected is not None and not may_escalate:
            decision.note = f"{rejected}_served"  # nowhere better to send it
            return None
        return rejected

    def _acceptance_threshold(self, call: Call) -> float:
        """The policy's static threshold, or the one its quality target holds (which starts
        by escalating everything until labels say otherwise)."""
        spec = call.policy.quality_target
        if spec is None or not self.frontiers:
            return call.policy.confidence.threshold
        return self.quality.threshold(call.policy.name, quality_segment(call), spec)

    async def _over_frontiers(
        self, call: Call, attempt: Callable[[Backend], Awaitable[Any]]
    ) -> tuple[Backend, Span, Any]:
        """Each frontier in order, each with retries; the first success wins.

        Every attempt gets its own span, returned open for the winner: the caller records
        the answer on it and ends it (for a stream, when the stream ends).
        """
        if not self.frontiers:
            raise UpstreamError("No frontier model is configured.", code="no_frontier")
        await self._lookup_settled(call)
        last: BackendFailure | None = None
        for backend in self.frontiers:
            try:
                span, result = await call_with_retry(
                    self._traced_attempts(call, backend, attempt),
                    self.retry,
                    is_retryable=lambda e: isinstance(e, BackendFailure) and e.retryable,
                    retry_after=lambda e: getattr(e, "retry_after", None),
                )
                return backend, span, result
            except (BackendFailure, TimeoutError) as exc:
                last = backend.failure(exc)
                if last.status in (400, 404, 413, 422):
                    break  # the request itself is bad: another provider will not help
        assert last is not None
        raise to_gateway_error(last) from last

    def _traced_attempts(
        self, call: Call, backend: Backend, attempt: Callable[[Backend], Awaitable[Any]]
    ) -> Callable[[], Awaitable[tuple[Span, Any]]]:
        tries = 0

        async def traced() -> tuple[Span, Any]:
            nonlocal tries
            tries += 1
            attributes = self._request_attributes(call, backend, call.params, tries)
            span = call.timings.start_span(f"chat {backend.name}", attributes)
            try:
                with trace.use_span(span, end_on_exit=False):
                    return span, await attempt(backend)
            except BaseException as exc:
                genai.record_error(span, backend.failure(exc))
                span.end()
                raise

        return traced


async def _read_small(
    chunks: AsyncIterator[dict[str, Any]],
    small: Assembly,
    *,
    ttft: float,
    total: float,
    hold_tokens: int | None,
    hold_s: float | None,
    direct: bool,
) -> bool:
    """Read the small stream into `small` until it ends (False) or the prefix is held (True).

    The first token must arrive within `ttft` and the held part within `total` seconds of
    the call's start; in direct mode reading stops at the first content.
    """
    async with asyncio.timeout_at(_loop_time(small.started + ttft)) as deadline:
        async for chunk in chunks:
            had_first = small.first_token_at is not None
            small.absorb(chunk)
            first_at = small.first_token_at
            if first_at is None:
                continue
            if not had_first:
                deadline.reschedule(_loop_time(small.started + total))
                if direct:
                    return True
            if hold_tokens is not None and (
                small.tokens >= hold_tokens or time.monotonic() - first_at >= (hold_s or 0)
            ):
                return small.finish_reason is None
    return False


def _judged(policy: Policy, may_escalate: bool) -> bool:
    """Whether the small answer is scored: a learned model is not run where nothing could
    be escalated (its prompt embedding costs a few ms of CPU and would decide nothing)."""
    return may_escalate or policy.confidence.scorer != "learned"


def _tool_calls_parse(small: Assembly) -> bool:
    """Whether every complete tool call's arguments are a JSON object (a call still streaming
    in a held prefix is judged when it ends)."""
    if small.finish_reason is None:
        return True
    for call in small.tool_calls.values():
        try:
            if not isinstance(json.loads(call["function"]["arguments"] or "{}"), dict):
                return False
        except ValueError:
            return False
    return True


def _json_parses(call: Call, small: Assembly) -> bool:
    """Whether a complete answer to a JSON-mode request (`response_format` json_object or
    json_schema) is JSON; a model cut off by max_tokens mid-object is not."""
    wanted = (call.params.get("response_format") or {}).get("type")
    if wanted not in ("json_object", "json_schema") or small.finish_reason is None \
            or small.tool_calls:
        return True
    try:
        json.loads("".join(small.text))
    except ValueError:
        return False
    return True


def _loop_time(monotonic_instant: float) -> float:
    """A time.monotonic() instant in the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_instant - time.monotonic())


async def _with_gap_deadline(
    chunks: AsyncIterator[dict[str, Any]], gap: float
) -> AsyncIterator[dict[str, Any]]:
    """Chunks, failing with TimeoutError if the upstream stalls longer than `gap` seconds."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(gap):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        yield chunk


def _midstream_error(backend: str, exc: BaseException) -> GatewayError:
    if isinstance(exc, TimeoutError) or getattr(exc, "timeout", False):
        return UpstreamTimeout(f"The model stream stalled ({backend}); the answer is incomplete.")
    return UpstreamError(f"The model stream broke ({backend}); the answer is incomplete.")


def _cancel(task: asyncio.Task | None) -> None:
    """Stop a background task (if still running) and retrieve its outcome, so that a failure
    nobody waits for is not logged as an unhandled error."""
    if task is not None:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _aclose(chunks: Any) -> None:
    if chunks is not None and hasattr(chunks, "aclose"):
        try:
            await chunks.aclose()
        except Exception:  # closing a broken stream must not mask the original error
            pass
