"""Model backends, with errors translated at this boundary into BackendFailure.

Two clients behind one interface: `LiteLLMBackend` reaches any provider (the frontier), and
`OpenAIWireBackend` speaks the OpenAI protocol straight over a pooled aiohttp session, for the
small model we host: on the hot hop litellm's streaming wrapper costs about 25 ms per
16-token answer on this CPU (`python -m load.overhead`), more than the rest of the gateway.
Every call returns plain OpenAI-shaped dicts (`chat.completion` or `chat.completion.chunk`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import httpx
import orjson

from gateway.config import BackendConfig

Headers = dict[str, str] | None

# Idle pooled connections to the small model are dropped before the server's own keep-alive
# (uvicorn's and so vLLM's: 5 s) ends them: a request sent on one the server is closing fails.
SMALL_KEEPALIVE_S = 4.0

# Parameters of an OpenAI chat request that are forwarded to the model.
FORWARDED_PARAMS = (
    "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "user", "tools",
    "tool_choice", "response_format", "logprobs", "top_logprobs", "frequency_penalty",
    "presence_penalty", "logit_bias", "parallel_tool_calls",
    "n",  # set only by the gateway itself (self-consistency samples); clients may ask for 1
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
        unreachable: bool = False,
    ) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.timeout = timeout
        self.unreachable = unreachable  # no connection could be made

    @property
    def unavailable(self) -> bool:
        """Down, restarting or shedding load: unreachable, or a 502/503."""
        return self.unreachable or self.status in (502, 503)

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

    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
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


class Backend:
    """One model endpoint. `name` is the public model name clients and responses use."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.public_name

    async def complete(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> dict[str, Any]:
        """A non-streamed chat completion within `timeout` seconds.

        `headers` go along with the request (the W3C trace context).
        """
        raise NotImplementedError

    async def stream(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> AsyncIterator[dict]:
        """Chunks of a streamed chat completion; `timeout` bounds opening the stream."""
        raise NotImplementedError

    def failure(self, exc: BaseException) -> BackendFailure:
        """Translate any error from a call into a BackendFailure (chained by the caller)."""
        raise NotImplementedError

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the endpoint answers `GET /models` (only for servers with a base URL)."""
        if not self.config.api_base:
            return True
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.get(self.config.api_base.rstrip("/") + "/models")
            return response.status_code < 500
        except httpx.HTTPError:
            return False


class LiteLLMBackend(Backend):
    """Any litellm provider; unsupported parameters are dropped when `drop_unsupported`."""

    def __init__(self, config: BackendConfig, *, drop_unsupported: bool) -> None:
        super().__init__(config)
        self._drop = drop_unsupported
        self._litellm = _litellm()

    def _kwargs(self, params: dict[str, Any], timeout: float, headers: Headers) -> dict[str, Any]:
        kwargs = {k: params[k] for k in FORWARDED_PARAMS if k in params}
        if headers:
            kwargs["extra_headers"] = headers
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

    async def complete(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> dict[str, Any]:
        kwargs = self._kwargs(params, timeout, headers)
        try:
            async with asyncio.timeout(timeout):
                response = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            raise self.failure(exc) from exc
        return _plain(response.model_dump(exclude_none=True))

    async def stream(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> AsyncIterator[dict]:
        kwargs = self._kwargs(params, timeout, headers)
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
                yield _plain(chunk.model_dump(exclude_none=True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self.failure(exc) from exc
        finally:
            await upstream.aclose()


def _plain(payload: dict[str, Any]) -> dict[str, Any]:
    """Drop litellm's own bookkeeping fields from an OpenAI-shaped payload."""
    for choice in payload.get("choices", []):
        choice.pop("provider_specific_fields", None)
        for part in ("message", "delta"):
            if isinstance(choice.get(part), dict):
                choice[part].pop("provider_specific_fields", None)
    return payload


class OpenAIWireBackend(Backend):
    """An OpenAI-compatible server (vLLM) reached directly over pooled HTTP connections.

    aiohttp rather than httpx on this hop: per streamed 16-token answer it costs about half
    the CPU (one write per request instead of two, a leaner chunked reader)."""

    def __init__(self, config: BackendConfig, *, connect_timeout: float = 5.0) -> None:
        super().__init__(config)
        if not config.api_base:
            raise ValueError(f"{config.model}: a direct OpenAI-protocol backend needs api_base")
        self._model = config.model.split("/", 1)[-1]
        self._url = config.api_base.rstrip("/") + "/chat/completions"
        key = config.api_key.get_secret_value() if config.api_key else None
        self._headers = {"content-type": "application/json"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The pooled session, made in the running loop on first use (sessions are bound to
        the loop they were made in, and the backend is built before the server's loop)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop, self._session = loop, aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                # Straight to the server: HTTP(S)_PROXY is not read (httpx did), as the small
                # model is served next to the gateway and a per-request proxy lookup costs.
                trust_env=False,
            )
        return self._session

    def _body(self, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        body = {k: params[k] for k in FORWARDED_PARAMS if k in params}
        body["model"] = self._model
        if stream:
            # Usage on every chunk (vLLM): an answer cut short by a rejected holdback
            # prefix still reports what it cost.
            body.update(stream=True, stream_options={"include_usage": True,
                                                     "continuous_usage_stats": True})
        return body

    def failure(self, exc: BaseException) -> BackendFailure:
        if isinstance(exc, BackendFailure):
            return exc
        return BackendFailure(self.name, _short(exc), timeout=isinstance(exc, TimeoutError),
                              unreachable=isinstance(exc, aiohttp.ClientConnectorError))

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        body = (await response.read())[:2000].decode(errors="replace")
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body or response.reason or ""
        raise BackendFailure(
            self.name, f"HTTP {response.status}: {message}",
            status=response.status,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    async def complete(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> dict[str, Any]:
        body = self._body(params, False)
        try:
            async with asyncio.timeout(timeout):
                async with self._client().post(self._url, data=orjson.dumps(body),
                                               headers=headers) as response:
                    await self._raise_for_status(response)
                    return orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise self.failure(exc) from exc

    async def stream(
        self, params: dict[str, Any], *, timeout: float, headers: Headers = None
    ) -> AsyncIterator[dict]:
        try:
            async with asyncio.timeout(timeout):
                response = await self._client().post(
                    self._url, data=orjson.dumps(self._body(params, True)), headers=headers)
                try:
                    await self._raise_for_status(response)
                except BaseException:
                    response.close()
                    raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self.failure(exc) from exc
        return _ResponseChunks(self._chunks(response), response)

    async def _chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
        try:
            async for data in _sse_data(response.content):
                if data == b"[DONE]":
                    # Read the body to its end: a response closed unread takes its connection
                    # out of the pool, and the next request would open a new one.
                    await response.read()
                    return
                chunk = orjson.loads(data)
                if "error" in chunk:
                    raise BackendFailure(self.name, str(chunk["error"].get("message", chunk)))
                yield chunk
            raise BackendFailure(self.name, "stream ended without [DONE]")
        except (aiohttp.ClientError, ValueError) as exc:
            raise self.failure(exc) from exc
        finally:
            if response.content.at_eof():
                response.release()
            else:  # left early (cancelled, a broken chunk): the connection cannot be reused
                response.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _ResponseChunks:
    """A streamed response's chunks. Closing them closes the response even before the first
    read (a generator closed unstarted runs no `finally`): a request cancelled between the
    headers and the first chunk must not keep its connection open."""

    def __init__(self, chunks: AsyncIterator[dict], response: aiohttp.ClientResponse) -> None:
        self._chunks, self._response = chunks, response

    def __aiter__(self) -> _ResponseChunks:
        return self

    def __anext__(self) -> Awaitable[dict]:
        return self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            if not self._response.content.at_eof():
                self._response.close()  # unread: the connection cannot go back to the pool


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The `data:` payloads of a server-sent event stream, read in whatever pieces arrive
    (no line-length limit: one chunk may carry a long tool call or many logprobs)."""
    pending = b""
    async for piece in content.iter_any():
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()
