"""Model backends reached through litellm, with errors translated at this boundary.

Every call returns plain OpenAI-shaped dicts (`chat.completion` or `chat.completion.chunk`),
so the engine never sees litellm's types.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.config import BackendConfig

# Parameters of an OpenAI chat request that are forwarded to the model.
FORWARDED_PARAMS = (
    "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "user", "tools",
    "tool_choice", "response_format", "logprobs", "top_logprobs", "frequency_penalty",
    "presence_penalty", "logit_bias", "parallel_tool_calls",
)


class BackendFailure(Exception):
    """One backend call failed; `status` is the upstream HTTP status when there was one."""

    def __init__(
        self,
        backend: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        timeout: bool = False,
    ) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.timeout = timeout

    @property
    def retryable(self) -> bool:
        """Rate limits, server errors and lost connections may succeed on another try."""
        if self.timeout:
            return False
        return self.status is None or self.status == 429 or self.status >= 500


def _litellm() -> Any:
    # The price map would otherwise be fetched from the network at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _headers_of(exc: BaseException) -> httpx.Headers | None:
    # Only litellm_response_headers carries the real headers on every provider path
    # (a case-sensitive dict on some of them).
    headers = getattr(exc, "litellm_response_headers", None)
    return httpx.Headers(headers) if headers else None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + "..."


class LiteLLMBackend:
    """One model endpoint. `name` is the public model name clients and responses use."""

    def __init__(self, config: BackendConfig, *, drop_unsupported: bool) -> None:
        self.config = config
        self.name = config.public_name
        self._drop = drop_unsupported
        self._litellm = _litellm()

    def _kwargs(self, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        kwargs = {k: params[k] for k in FORWARDED_PARAMS if k in params}
        # Retries are ours (they honour Retry-After and the deadline): litellm's and the
        # OpenAI SDK's own are switched off.
        kwargs.update(model=self.config.model, timeout=timeout, num_retries=0, max_retries=0)
        if self.config.api_base:
            kwargs["api_base"] = self.config.api_base
        if self.config.api_key is not None:
            kwargs["api_key"] = self.config.api_key.get_secret_value()
        elif self.config.model.startswith("hosted_vllm/"):
            kwargs["api_key"] = "none"
        if self._drop:
            kwargs["drop_params"] = True
        return kwargs

    def failure(self, exc: BaseException) -> BackendFailure:
        """Translate any error from a call into a BackendFailure (chained by the caller)."""
        if isinstance(exc, BackendFailure):
            return exc
        # litellm wraps errors raised mid-stream; judge by the original one.
        original = getattr(exc, "original_exception", None) or exc
        timeout = isinstance(original, TimeoutError | self._litellm.Timeout)
        status = None if timeout else getattr(exc, "status_code", None)
        headers = _headers_of(exc)
        retry_after = parse_retry_after(headers.get("retry-after")) if headers else None
        return BackendFailure(
            self.name, _short(exc), status=status, retry_after=retry_after, timeout=timeout
        )

    async def complete(self, params: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """A non-streamed chat completion within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                response = await self._litellm.acompletion(**self._kwargs(params, timeout))
        except Exception as exc:
            raise self.failure(exc) from exc
        return response.model_dump(exclude_none=True)

    async def stream(self, params: dict[str, Any], *, timeout: float) -> AsyncIterator[dict]:
        """Chunks of a streamed chat completion; `timeout` bounds opening the stream."""
        kwargs = self._kwargs(params, timeout)
        kwargs.update(stream=True, stream_options={"include_usage": True})
        try:
            async with asyncio.timeout(timeout):
                upstream = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            raise self.failure(exc) from exc
        return self._chunks(upstream)

    async def _chunks(self, upstream: Any) -> AsyncIterator[dict]:
        try:
            async for chunk in upstream:
                yield chunk.model_dump(exclude_none=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self.failure(exc) from exc
        finally:
            await upstream.aclose()

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the endpoint answers `GET /models` (only for servers we host)."""
        if not self.config.api_base:
            return True
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.get(self.config.api_base.rstrip("/") + "/models")
            return response.status_code < 500
        except httpx.HTTPError:
            return False
