"""OpenTelemetry GenAI semantic-convention attributes for model-call spans."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from gateway.types import Assembly

_PROVIDERS = {"hosted_vllm": "vllm", "openai": "openai", "anthropic": "anthropic",
              "azure": "azure.ai.openai", "bedrock": "aws.bedrock", "gemini": "gcp.gemini",
              "vertex_ai": "gcp.vertex_ai", "mistral": "mistral_ai", "groq": "groq"}
_REQUEST_PARAMS = {"max_tokens": "gen_ai.request.max_tokens",
                   "temperature": "gen_ai.request.temperature",
                   "top_p": "gen_ai.request.top_p", "seed": "gen_ai.request.seed"}


def provider(model: str) -> str:
    prefix = model.split("/", 1)[0] if "/" in model else "openai"
    return _PROVIDERS.get(prefix, prefix)


def request_attributes(
    model: str, public_name: str, params: dict[str, Any], attempt: int, record_content: bool
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider(model),
        "gen_ai.provider.name": provider(model),
        "gen_ai.request.model": public_name,
        "smallfirst.attempt": attempt,
    }
    for param, name in _REQUEST_PARAMS.items():
        if params.get(param) is not None:
            attributes[name] = params[param]
    if record_content:
        attributes["gen_ai.input.messages"] = json.dumps(params.get("messages", []))
    return attributes


def record_response(
    span: Span,
    *,
    model: str | None,
    response_id: str | None,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    ttft_ms: float | None = None,
    content: str | None = None,
) -> None:
    if not span.is_recording():
        return
    if model:
        span.set_attribute("gen_ai.response.model", model)
    if response_id:
        span.set_attribute("gen_ai.response.id", response_id)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
    if usage:
        span.set_attribute("gen_ai.usage.input_tokens", usage.get("prompt_tokens") or 0)
        span.set_attribute("gen_ai.usage.output_tokens", usage.get("completion_tokens") or 0)
    if ttft_ms is not None:
        span.set_attribute("gen_ai.response.time_to_first_chunk", ttft_ms / 1000)
        span.set_attribute("smallfirst.ttft_ms", ttft_ms)
    if content is not None:
        span.set_attribute("gen_ai.output.messages", json.dumps(
            [{"role": "assistant", "content": content}]))


def record_error(span: Span, exc: BaseException) -> None:
    if not span.is_recording():
        return
    status = getattr(exc, "status", None)
    span.set_attribute("error.type", str(status) if status else type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


def finish_answer(answer: Assembly, content: bool) -> None:
    """Record an assembled answer on its model call's span and end the span."""
    record_response(
        answer.span, model=answer.model, response_id=None, finish_reason=answer.finish_reason,
        usage=answer.usage, ttft_ms=answer.ttft_ms,
        content="".join(answer.text) if content else None,
    )
    answer.span.end()
