"""The gateway's long-lived parts, built once from settings and shared by all requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

from gateway.auth import KeyStore, OpenAccess
from gateway.backends import Backend, LiteLLMBackend, OpenAIWireBackend
from gateway.config import ConfigError, Settings
from gateway.engine import CascadeEngine
from gateway.errors import ModelNotFound, PermissionDenied
from gateway.policy import Policy
from gateway.policy_store import PolicyStore

log = logging.getLogger("smallfirst")


@dataclass
class Gateway:
    settings: Settings
    policies: PolicyStore
    engine: CascadeEngine
    auth: KeyStore | OpenAccess
    in_flight: int = 0
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway:
        if settings.auth == "off":
            access: KeyStore | OpenAccess = OpenAccess()
        elif settings.api_keys_file is None:
            raise ConfigError(
                "auth is on but no API keys file is set (SMALLFIRST_API_KEYS_FILE); "
                "for local development use --no-auth"
            )
        else:
            access = KeyStore.from_file(settings.api_keys_file)
        engine = CascadeEngine(
            _small_backend(settings),
            [LiteLLMBackend(f, drop_unsupported=True) for f in settings.frontiers],
            settings.retry,
        )
        store = PolicyStore(settings.policies, settings.default_policy)
        return cls(settings, store, engine, access)

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
        """Background duties: policy hot reload on file change and on SIGHUP."""
        if self.settings.watch_policies:
            self._tasks.append(asyncio.create_task(self.policies.watch()))
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.policies.reload)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if isinstance(self.engine.small, OpenAIWireBackend):
            await self.engine.small.aclose()


def _small_backend(settings: Settings) -> Backend:
    if settings.small_client == "litellm":
        return LiteLLMBackend(settings.small, drop_unsupported=False)
    return OpenAIWireBackend(settings.small, connect_timeout=settings.connect_timeout_s)
