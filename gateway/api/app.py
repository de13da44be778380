"""HTTP layer: OpenAI-compatible routes over the cascade engine. Handlers stay thin."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import context as otel_context
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import sse
from gateway.api.auth import Tenant
from gateway.api.json_body import parse_json_body
from gateway.api.lifecycle import RequestLife
from gateway.api.openai_types import ChatCompletionRequest, CompletionRequest, parse
from gateway.api.openapi import install_openapi
from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
)
from gateway.health import degradations
from gateway.service import Gateway
from gateway.shapes import as_text_chunk, as_text_completion
from gateway.timing import Timings
from gateway.types import Call, Decision

log = logging.getLogger("smallfirst.http")
T = TypeVar("T")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestGuard:
    """ASGI middleware: request ids, the body's size limit and deadline, a deadline on each
    send (a client that stops reading is cut), and no stack trace ever leaks."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, *, body_timeout_s: float = 30.0,
                 send_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                raise StalledReader(f"the client read nothing for {self.send_timeout_s} s") \
                    from None

        try:
            if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
                raise self._too_large()
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception as exc:
            if started and _stalled(exc):
                log.warning("request %s cut: %s", request_id, _stalled(exc))
                return  # the server closes a connection whose response is incomplete
            if started:
                raise
            error = exc if isinstance(exc, GatewayError) else None
            if error is None:
                log.exception("unhandled error in request %s", request_id)
            response = error_response(error or GatewayError("Internal error; see the logs."))
            await response(scope, receive, send_with_id)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body exceeds the limit of {self.max_body_bytes} bytes.")

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, with the body bounded in size and, until it is whole, in time."""
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # from here on, receive only waits for the client to leave
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"The request body did not arrive within "
                                     f"{self.body_timeout_s} s.") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        return limited


class StalledReader(Exception):
    """The client stopped reading the answer: the send deadline passed."""


def _stalled(exc: BaseException) -> StalledReader | None:
    """The StalledReader behind `exc`, also when a task group wrapped it."""
    if isinstance(exc, StalledReader):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return next(filter(None, map(_stalled, exc.exceptions)), None)
    return _stalled(exc.__cause__) if exc.__cause__ is not None else None


class Answer(JSONResponse):
    """A JSON response encoded by orjson (a chat answer: about 5x faster than json.dumps)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


def decision_headers(decision: Decision, timings: Timings) -> dict[str, str]:
    scores = ", ".join(
        f"{name}={value:.3f}"
        for name, value in (("difficulty", decision.difficulty),
                            ("confidence", decision.confidence))
        if value is not None
    )
    headers = {
        "x-smallfirst-route": decision.route.value,
        "x-smallfirst-policy": decision.policy,
        "x-smallfirst-scores": scores or "none",
        "server-timing": timings.server_timing(),
    }
    if decision.escalation:
        headers["x-smallfirst-escalation"] = decision.escalation
    if decision.note:
        headers["x-smallfirst-note"] = decision.note
    return headers


async def read_json(request: Request) -> Any:
    return parse_json_body(await request.body())


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let its cleanup (closing upstream calls) finish
    if task.cancelled():
        log.info("client disconnected; request %s cancelled", request.scope["state"]["request_id"])
        raise ClientDisconnected("The client disconnected before the answer was ready.")
    return task.result()


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        # What start-up built (imports, models, policies) lives as long as the process. Left
        # in the collector's oldest generation, each full pass rescans all of it (40 ms here),
        # a pause every request in flight would wait out; frozen, it is skipped (and thawed at
        # shutdown, so that a process hosting several gateways in turn can still free them).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()
        await gateway.stop()

    app = FastAPI(title="smallfirst", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    _install_error_handlers(app)
    _install_routes(app, gateway)
    install_openapi(app)
    settings = gateway.settings
    return RequestGuard(app, settings.max_body_bytes,  # type: ignore[return-value]
                        body_timeout_s=settings.body_timeout_s,
                        send_timeout_s=settings.send_timeout_s)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequest("Invalid request."))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette sends this, then re-raises for the server to log the traceback.
        return error_response(GatewayError("Internal error; see the logs."))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"Unknown path {request.url.path}."))
        error = GatewayError(str(exc.detail))
        error.status_code, error.error_type = exc.status_code, "invalid_request_error"
        return error_response(error)


def _install_routes(app: FastAPI, gateway: Gateway) -> None:
    def authenticate(request: Request) -> Tenant:
        return gateway.auth.authenticate(request.headers.get("authorization"))

    def admin(request: Request) -> Tenant:
        tenant = authenticate(request)
        if not tenant.admin:
            raise PermissionDenied("This key may not use the admin API.")
        return tenant

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = {"not_draining": not gateway.draining}
        if not gateway.draining:  # draining answers at once: the balancer routes away sooner
            checks.update(small_model=await gateway.engine.small.ping(),
                          policies=gateway.policies.last_error is None,
                          warmed_up=gateway.warmed_up)
        ready = all(checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks,
                             "degraded": degradations(gateway)},
                            status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authenticate(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "smallfirst"}
            for name in gateway.model_ids()
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, gateway, legacy=False)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(request, gateway, legacy=True)

    @app.get("/metrics")
    async def metrics() -> Response:
        if gateway.observer.metrics is None:
            raise NotFound("Metrics are switched off (SMALLFIRST_METRICS=false).")
        return Response(await gateway.observer.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/budget")
    async def budget(request: Request) -> dict[str, Any]:
        admin(request)
        return gateway.budget_report()

    @app.get("/admin/quality")
    async def quality(request: Request) -> dict[str, Any]:
        admin(request)
        return {"segments": gateway.engine.quality.snapshot()}

    @app.get("/admin/policies")
    async def policies(request: Request) -> dict[str, Any]:
        admin(request)
        return gateway.policies.status()

    @app.post("/admin/policies/reload")
    async def reload_policies(request: Request) -> JSONResponse:
        admin(request)
        ok = gateway.policies.reload()
        return JSONResponse(gateway.policies.status(), status_code=200 if ok else 422)


async def _handle(request: Request, gateway: Gateway, *, legacy: bool) -> Response:
    life = RequestLife(request, gateway)
    timings = life.timings
    token = otel_context.attach(timings.parent) if timings.parent is not None else None
    try:
        with timings.measure("auth"):
            tenant = gateway.auth.authenticate(request.headers.get("authorization"))
        raw = await read_json(request)
        body = parse(CompletionRequest, raw).as_chat() if legacy else parse(
            ChatCompletionRequest, raw)
        if gateway.limits is not None:
            life.limit = await gateway.limits.admit(tenant, stream=body.stream)
        return await _serve(request, gateway, body, life, tenant.name, legacy=legacy)
    except GatewayError as exc:
        if life.call is not None and life.call.decision is not None:
            exc.routing_headers = decision_headers(life.call.decision, timings)
        life.end(exc.status_code, error=exc.code or exc.error_type)
        raise
    except BaseException:
        life.end(500, error="internal")
        raise
    finally:
        if token is not None:
            otel_context.detach(token)


async def _serve(
    request: Request,
    gateway: Gateway,
    body: ChatCompletionRequest,
    life: RequestLife,
    tenant: str,
    *,
    legacy: bool,
) -> Response:
    timings = life.timings
    with timings.measure("policy"):
        policy, direct = gateway.resolve(body.model, request.headers.get("x-smallfirst-policy"))
    cache_control = request.headers.get("cache-control", "").lower()
    call = Call(
        request_id=request.scope["state"]["request_id"],
        policy=policy,
        params=body.model_params(),
        include_usage=body.include_usage,
        direct=direct,
        tenant=tenant,
        read_cache="no-cache" not in cache_control,
        write_cache="no-store" not in cache_control,
        timings=timings,
    )
    life.admit(call, stream=body.stream)
    if not body.stream:
        response, decision = await until_disconnect(request, gateway.engine.complete(call))
        if legacy:
            response = as_text_completion(response)
        timings.mark_first_byte()
        headers = decision_headers(decision, timings)
        life.end(200, decision)
        return Answer(response, headers=headers)
    chunks, decision = await until_disconnect(request, gateway.engine.stream(call))
    return sse.EventStream(
        _sse(life, decision, chunks, legacy),
        headers={**decision_headers(decision, timings), "cache-control": "no-cache"},
    )


async def _sse(
    life: RequestLife,
    decision: Decision,
    chunks: AsyncIterator[dict[str, Any]],
    legacy: bool,
) -> AsyncIterator[bytes]:
    status, error = 200, None
    try:
        async for chunk in chunks:
            life.timings.mark_first_byte()
            yield sse.event(as_text_chunk(chunk) if legacy else chunk)
        yield sse.DONE
    except GatewayError as exc:
        status, error = exc.status_code, exc.code or exc.error_type
        yield sse.error_event(exc.message, exc.error_type, exc.code)
    except Exception:
        log.exception("stream failed")
        status, error = 500, "internal"
        yield sse.error_event("Internal error; the answer is incomplete.", "server_error")
    except BaseException:  # the client went away: the stream was cancelled
        status, error = 499, "client_disconnected"
        raise
    finally:
        try:
            await _close(chunks)
        finally:
            life.end(status, decision, error)


async def _close(chunks: Any) -> None:
    if hasattr(chunks, "aclose"):
        await chunks.aclose()
