"""Client checks: the clients people point at a gateway, each asked what it is usually asked.

    python -m load.client_checks --base http://127.0.0.1:8000/v1 [--model auto] [--api-key K]

Prints one row per check (client, what, result, route, time). A check passes when the client
gets a well-formed answer of the kind it asked for (text, a stream, a tool call with JSON
arguments, a JSON object). langchain-openai is optional: without it that row says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SAMPLING = {"temperature": 0, "max_tokens": 40}
FRESH = {"extra_headers": {"cache-control": "no-cache"}}  # answered by a model, not the cache


def _route(raw: Any) -> str:
    headers = getattr(raw, "headers", None)
    return headers.get("x-smallfirst-route", "?") if headers is not None else "?"


def openai_sync(base: str, key: str, model: str) -> str:
    from openai import OpenAI

    raw = OpenAI(base_url=base, api_key=key).chat.completions.with_raw_response.create(
        model=model, messages=ASK, **SAMPLING)
    assert raw.parse().choices[0].message.content.strip()
    return _route(raw)


def openai_async(base: str, key: str, model: str) -> str:
    from openai import AsyncOpenAI

    async def ask() -> str:
        client = AsyncOpenAI(base_url=base, api_key=key)
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=ASK, **SAMPLING, **FRESH)
        assert raw.parse().choices[0].message.content.strip()
        return _route(raw)

    return asyncio.run(ask())


def openai_stream(base: str, key: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=key)
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=ASK, stream=True, **SAMPLING, **FRESH) as response:
        text = ""
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    text += choice["delta"].get("content") or ""
        assert text.strip()
        return response.headers.get("x-smallfirst-route", "?")


def openai_tools(base: str, key: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=key)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **SAMPLING)
    call = raw.parse().choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                            **SAMPLING)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    return _route(raw)


def openai_json_schema(base: str, key: str, model: str) -> str:
    from openai import OpenAI

    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"]}
    raw = OpenAI(base_url=base, api_key=key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        **SAMPLING)
    assert "capital" in json.loads(raw.parse().choices[0].message.content)
    return _route(raw)


def openai_json_object(base: str, key: str, model: str) -> str:
    """JSON mode without a schema: JSON, or an answer the gateway says is not (escalated as
    invalid_json, or served with that note when there is nowhere to escalate)."""
    from openai import OpenAI

    raw = OpenAI(base_url=base, api_key=key).chat.completions.with_raw_response.create(
        model=model, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON with the "
                   "key \"capital\"."}], **SAMPLING)
    note = raw.headers.get("x-smallfirst-note") or raw.headers.get("x-smallfirst-escalation")
    if note not in ("invalid_json_served", "invalid_json"):
        assert isinstance(json.loads(raw.parse().choices[0].message.content), dict)
    return f"{_route(raw)} ({note})" if note else _route(raw)


def langchain_openai(base: str, key: str, model: str) -> str:
    from langchain_openai import ChatOpenAI

    reply = ChatOpenAI(base_url=base, api_key=key, model=model, temperature=0,
                       max_tokens=40).invoke("What is the capital of France?")
    assert str(reply.content).strip()
    return "?"  # the client keeps no response headers


def litellm_sdk(base: str, key: str, model: str) -> str:
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    reply = litellm.completion(model=f"openai/{model}", api_base=base, api_key=key,
                               messages=ASK, **SAMPLING)
    assert reply.choices[0].message.content.strip()
    return "?"  # the client keeps no response headers


CHECKS: list[tuple[str, str, Callable[[str, str, str], str]]] = [
    ("openai", "sync", openai_sync), ("openai", "async", openai_async),
    ("openai", "stream", openai_stream), ("openai", "tools round trip", openai_tools),
    ("openai", "JSON schema", openai_json_schema), ("openai", "JSON mode", openai_json_object),
    ("langchain-openai", "invoke", langchain_openai),
    ("litellm SDK", "completion", litellm_sdk),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--api-key", default="sk-local")
    args = parser.parse_args(argv)
    failed = 0
    print("| client | check | result | route | ms |\n|---|---|---|---|---|")
    for client, what, check in CHECKS:
        started = time.monotonic()
        try:
            route, result = check(args.base, args.api_key, args.model), "pass"
        except ImportError as exc:
            route, result = "-", f"not installed ({exc.name})"
        except Exception as exc:  # a failed check is a row, not a crash
            route, result = "-", f"FAIL: {type(exc).__name__}: {str(exc)[:120]}"
            failed += 1
        ms = (time.monotonic() - started) * 1000
        print(f"| {client} | {what} | {result} | {route} | {ms:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
