"""Tool calls through the gateway to the real small model (vLLM serving SmolLM2 with the
shipped Hermes-format chat template and vLLM's `hermes` tool-call parser)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.test_vllm import SMALL, vllm_gateway  # noqa: F401  (the gateway over the real vLLM)

# strict: vLLM constrains the arguments to the schema, which a 135M model needs
from tooling.demo import WEATHER_TOOL as WEATHER

pytestmark = pytest.mark.vllm

NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _question(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather in {city} right now?"}]


def _check_call(name: str, arguments: str) -> dict[str, Any]:
    assert name == "get_weather"
    parsed = json.loads(arguments)
    assert isinstance(parsed, dict) and isinstance(parsed.get("city"), str)
    return parsed


def _follow_up(city: str, call_id: str, arguments: str) -> list[dict[str, Any]]:
    """The conversation sent back: the question, the assistant's call and the tool's result."""
    return [
        *_question(city),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id,
         "content": json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})},
    ]


def _answer_text(client: openai.OpenAI, messages: list[dict[str, Any]]) -> str:
    """The text answer to a conversation that ends with a tool result (tools still offered;
    tool_choice none: answer now)."""
    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=messages, tools=[WEATHER], tool_choice="none",
        temperature=0, max_tokens=40,
    )
    completion = raw.parse()
    assert raw.headers["x-smallfirst-route"] == "small"
    message = completion.choices[0].message
    assert not message.tool_calls
    assert message.content and message.content.strip()
    return message.content


def test_tool_call_round_trip(vllm_gateway: openai.OpenAI) -> None:  # noqa: F811
    raw = vllm_gateway.chat.completions.with_raw_response.create(
        model="local", messages=_question("Paris"), tools=[WEATHER], tool_choice=NAMED,
        temperature=0, max_tokens=40,
    )
    completion = raw.parse()
    assert raw.headers["x-smallfirst-route"] == "small"
    assert completion.model == SMALL
    calls = completion.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and calls[0].type == "function" and calls[0].id
    _check_call(calls[0].function.name, calls[0].function.arguments)

    _answer_text(vllm_gateway, _follow_up("Paris", calls[0].id, calls[0].function.arguments))


def test_streamed_tool_call_round_trip(vllm_gateway: openai.OpenAI) -> None:  # noqa: F811
    raw = vllm_gateway.chat.completions.with_raw_response.create(
        model="local", messages=_question("Rome"), tools=[WEATHER], tool_choice=NAMED,
        temperature=0, max_tokens=40, stream=True,
    )
    assert raw.headers["x-smallfirst-route"] == "small"
    call_id, name, arguments, pieces = None, "", "", 0
    for chunk in raw.parse():
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                call_id = delta.id or call_id
                name += (delta.function and delta.function.name) or ""
                arguments += (delta.function and delta.function.arguments) or ""
                pieces += 1
    assert call_id and pieces >= 2  # the name, then the arguments (in one piece or more)
    _check_call(name, arguments)

    _answer_text(vllm_gateway, _follow_up("Rome", call_id, arguments))


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_is_served(vllm_gateway: openai.OpenAI, stream: bool) -> None:  # noqa: F811
    """Without a tool-call parser vLLM refused every request with tools (400); now the model
    decides: a call (rebuilt from the hermes format) or a text answer."""
    raw = vllm_gateway.chat.completions.with_raw_response.create(
        model="local", messages=_question("Oslo" if stream else "Lisbon"), tools=[WEATHER],
        tool_choice="auto", temperature=0, max_tokens=40, stream=stream,
    )
    assert raw.status_code == 200
    assert raw.headers["x-smallfirst-route"] == "small"
    if stream:
        chunks = [c for c in raw.parse() if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        called = any(c.choices[0].delta.tool_calls for c in chunks)
    else:
        message = raw.parse().choices[0].message
        text, called = message.content or "", bool(message.tool_calls)
        for call in message.tool_calls or []:
            _check_call(call.function.name, call.function.arguments)
    assert called or text.strip()
