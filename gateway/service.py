"""The gateway's long-lived parts, built once from settings and shared by all requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field

from opentelemetry.trace import Tracer

from gateway.api.auth import KeyStore, OpenAccess
from gateway.backends import Backend, LiteLLMBackend, OpenAIWireBackend
from gateway.cache.layered import LayeredCache, build_cache
from gateway.cache.redis_exact import connect
from gateway.config import ConfigError, Settings
from gateway.embedding import SharedEmbedding
from gateway.engine import CascadeEngine
from gateway.errors import ModelNotFound, PermissionDenied, RateLimited
from gateway.health import degradations
from gateway.learning import DecisionStream, TrafficLearner
from gateway.limits import RateLimiter
from gateway.policy import LatencyBudget, Policy
from gateway.policy_store import PolicyStore
from gateway.quality_pool import QualityPool
from gateway.ratelimit import Allowances
from gateway.scoring import BundleRegistry
from gateway.telemetry.budget import BudgetTracker
from gateway.telemetry.metrics import Metrics, Price, litellm_price
from gateway.telemetry.observer import Observer, Pricing
from gateway.telemetry.shutdown import shutdown_within
from gateway.telemetry.tracing import tracer_provider
from gateway.types import Call, Decision

log = logging.getLogger("smallfirst")
_IMPORTED = time.monotonic()
WARM_UP_PROMPT = "Say hello."
WARM_UP_TIMEOUT_S = 60.0


@dataclass
class Gateway:
    settings: Settings
    policies: PolicyStore
    engine: CascadeEngine
    auth: KeyStore | OpenAccess
    observer: Observer
    tracer: Tracer | None = None
    cache: LayeredCache | None = None
    embed: SharedEmbedding | None = None
    limits: RateLimiter | None = None
    in_flight: int = 0
    warmed_up: bool = False  # the models answered a warm-up: /readyz may say ready
    draining: bool = False  # shutting down: /readyz says not ready, requests still served
    telemetry: list = field(default_factory=list)  # providers to shut down, within a bound
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway:
        if settings.decision_stream and not settings.redis_url:
            raise ConfigError("decision_stream needs redis_url (the stream lives in Redis)")
        if settings.auth == "off":
            access: KeyStore | OpenAccess = OpenAccess()
        elif settings.api_keys_file is None:
            raise ConfigError(
                "auth is on but no API keys file is set (SMALLFIRST_API_KEYS_FILE); "
                "for local development use --no-auth"
            )
        else:
            access = KeyStore.from_file(settings.api_keys_file)
        store = PolicyStore(settings.policies, settings.default_policy)
        embed = SharedEmbedding(threads=settings.embedding_threads)
        cache = build_cache(
            settings.redis_url,
            lambda name: policy.cache if (policy := store.get(name)) else None,
            prefix=settings.cache_prefix,
            semantic=settings.cache_semantic,
            memory_entries=settings.cache_memory_entries,
            embed=embed,
            timeout_s=settings.redis_timeout_s,
        )
        engine = CascadeEngine(
            _small_backend(settings),
            [LiteLLMBackend(f, drop_unsupported=True) for f in settings.frontiers],
            settings.retry,
            cache=cache,
            bundles=BundleRegistry(settings.policies),
            embed=embed,
        )
        # Replicas share rate limits, shadow-call allowances and the decision stream here.
        shared = connect(settings.redis_url, settings.redis_timeout_s) if settings.redis_url \
            else None
        stream = (DecisionStream(shared, settings.decision_stream, settings.decision_stream_maxlen)
                  if shared is not None and settings.decision_stream else None)
        if settings.decision_log is not None or stream is not None or engine.frontiers:
            pool = None if shared is None else QualityPool(
                shared, f"{settings.cache_prefix}:quality", engine.quality,
                lambda name: policy.quality_target if (policy := store.get(name)) else None)
            engine.learner = TrafficLearner(
                settings.decision_log, engine.ask_frontier if engine.frontiers else None,
                stream=stream, allowances=Allowances(shared, settings.cache_prefix),
                quality=engine.quality, pool=pool)
        observer = Observer(
            Metrics(budgets=lambda: _budgets(store), quality=engine.quality.snapshot)
            if settings.metrics else None,
            BudgetTracker(settings.budget_window),
            _pricing(settings),
        )
        limits = RateLimiter(settings.rate_limits, shared, settings.cache_prefix)
        tracing = tracer_provider()
        gateway = cls(settings, store, engine, access, observer,
                      tracing.get_tracer("smallfirst") if tracing else None, cache, embed, limits)
        gateway.telemetry = [p for p in (tracing, observer.metrics and observer.metrics.provider)
                             if p is not None]
        if observer.metrics is not None:
            engine.audited = observer.metrics.record_cache_audit
            observer.metrics.degraded = lambda: degradations(gateway)
            limits.refused = observer.metrics.record_rate_limited
        return gateway

    def begin(self) -> None:
        """Admit one more request, or refuse it with a 429 when at capacity."""
        if self.in_flight >= self.settings.max_in_flight:
            raise RateLimited("The gateway is at capacity; retry shortly.", retry_after=1)
        self.in_flight += 1
        self.observer.started()

    def finish(
        self, call: Call, decision: Decision | None, status: int, *, stream: bool,
        tenant: str, error: str | None = None,
    ) -> None:
        self.in_flight -= 1
        self.observer.finished(call, decision, status, stream=stream, tenant=tenant, error=error)

    def budget_report(self) -> dict:
        return self.observer.budgets.report(_budgets(self.policies))

    def resolve(self, model: str, policy_header: str | None) -> tuple[Policy, str | None]:
        """The policy for a request and, when `model` names a backend, that backend."""
        chosen = None
        if policy_header:
            chosen = self.policies.get(policy_header)
            if chosen is None:
                raise ModelNotFound(f"The policy '{policy_header}' does not exist.")
        by_alias = self.policies.get(model)
        if by_alias is not None:
            return chosen or by_alias, None
        if model in self.engine.backend_names:
            policy = chosen or self.policies.default
            if not policy.allow_direct_models:
                raise PermissionDenied(
                    f"Policy '{policy.name}' does not allow calling '{model}' directly.",
                    code="model_not_allowed",
                )
            return policy, model
        raise ModelNotFound(
            f"The model '{model}' does not exist. Use a policy alias "
            f"({', '.join(sorted(self.policies.current.by_name))}) or a configured model."
        )

    def model_ids(self) -> list[str]:
        return sorted(self.policies.current.by_name) + self.engine.backend_names

    async def start(self) -> None:
        """The cache's search index, then background duties: the warm-up, policy hot reload on
        file change and on SIGHUP."""
        if self.cache is not None:
            await self.cache.start()
        if self.observer.metrics is not None:
            self.observer.metrics.loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._warm_up()))
        if self.limits is not None:
            self._tasks.append(asyncio.create_task(self.limits.renew_forever()))
        if self.engine.learner is not None and self.engine.learner.pool is not None:
            self._tasks.append(asyncio.create_task(self.engine.learner.pool.run()))
        if self.settings.watch_policies:
            self._tasks.append(asyncio.create_task(self.policies.watch()))
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.policies.reload)

    async def _warm_up(self) -> None:
        """Load and run every model a request may need, so that none loads on a request:
        the embedder, the router bundles the policies name, the cache's verifier, then one
        token from the small model (retried until it answers: vLLM may still be loading).
        `/readyz` says ready from then on."""
        began = time.monotonic()
        await asyncio.to_thread(self._warm_local_models)
        attempts = 0
        while not await self._warm_small_model():
            attempts += 1
            if attempts == 1:
                log.warning("warm-up: the small model at %s does not answer yet; retrying "
                            "every second (/readyz says not ready)", self.settings.small_api_base)
            await asyncio.sleep(1.0)
        self.warmed_up = True
        now = time.monotonic()
        log.info("ready: warmed up in %.1f s, %.1f s after the gateway module was imported",
                 now - began, now - _IMPORTED)

    def _warm_local_models(self) -> None:
        learned = [section.bundle for p in self.policies.current.policies
                   for section in (p.difficulty, p.confidence) if section.scorer == "learned"]
        semantic = self.cache is not None and self.cache.semantic is not None
        vector = None
        if self.embed is not None and (learned or semantic):
            try:  # a broken embedder is logged here, listed by /readyz, and done without
                vector = self.embed([WARM_UP_PROMPT])[0]
            except Exception as exc:
                log.error("the embedder cannot be loaded: %s", exc)
        for name in dict.fromkeys(learned):
            try:  # a broken bundle is logged here and scored without
                self.engine.bundles.get(name).difficulty(WARM_UP_PROMPT, vector)
            except Exception as exc:
                log.error("router bundle %r cannot be loaded: %s", name, exc)
        if semantic and self.cache.verifier is not None:
            self.cache.verifier.warm()

    async def _warm_small_model(self) -> bool:
        """One token from the small model; its time seeds the adaptive first-token deadline."""
        began = time.monotonic()
        try:
            await self.engine.small.complete(
                {"messages": [{"role": "user", "content": WARM_UP_PROMPT}], "max_tokens": 1},
                timeout=WARM_UP_TIMEOUT_S)
        except Exception:
            return False
        self.engine.first_tokens.observe((time.monotonic() - began) * 1000)
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.engine.learner is not None:
            await self.engine.learner.drain()
            if self.engine.learner.pool is not None:
                await self.engine.learner.pool.close()
        if self.limits is not None:
            await self.limits.close()
        if isinstance(self.engine.small, OpenAIWireBackend):
            await self.engine.small.aclose()
        shutdown_within(self.telemetry)
        if self.cache is not None:
            await self.cache.close()


def _budgets(store: PolicyStore) -> dict[str, LatencyBudget]:
    return {p.name: p.latency_budget for p in store.current.policies}


def _pricing(settings: Settings) -> Pricing:
    prices = {settings.small.public_name: Price(0.0, 0.0)}
    for frontier in settings.frontiers:
        listed = litellm_price(frontier.model)
        if listed is not None:
            prices[frontier.public_name] = listed
    for name, price in settings.prices.items():
        prices[name] = Price(price.input_per_mtok, price.output_per_mtok)
    reference = settings.frontiers[0].public_name if settings.frontiers else None
    return Pricing(prices, reference)


def _small_backend(settings: Settings) -> Backend:
    if settings.small_client == "litellm":
        return LiteLLMBackend(settings.small, drop_unsupported=False)
    return OpenAIWireBackend(settings.small, connect_timeout=settings.connect_timeout_s)
