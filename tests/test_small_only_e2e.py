"""Small-only mode with the real small model: no frontier configured, and every shipped policy
still serves, non-streamed and streamed in every mode, tools and JSON mode included."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import SHIPPED_POLICIES, GatewayRunner

pytestmark = pytest.mark.vllm

SMALL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name a colour of the sky."}]
SAMPLING = {"temperature": 0, "max_tokens": 24}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def small_only(vllm_api_base: str, session_gateways: GatewayRunner) -> openai.OpenAI:
    base = session_gateways.start({"small_model": f"hosted_vllm/{SMALL}",
                                   "small_api_base": vllm_api_base}, policies=SHIPPED_POLICIES)
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180)


def served(raw) -> None:
    assert raw.http_response.status_code == 200
    assert raw.headers["x-smallfirst-route"] in ("small", "cache_exact")
    assert raw.headers.get("x-smallfirst-note") in (None, "low_confidence_served",
                                                    "invalid_json_served")


@pytest.mark.parametrize("policy", ["auto", "chat", "fast", "quality"])
def test_every_policy_answers_non_streamed(small_only: openai.OpenAI, policy: str) -> None:
    raw = small_only.chat.completions.with_raw_response.create(
        model=policy, messages=ASK, **SAMPLING)
    served(raw)
    assert raw.parse().choices[0].message.content.strip()


@pytest.mark.parametrize("policy", ["auto", "fast", "quality"])  # holdback, direct, buffer
def test_every_stream_mode_answers(small_only: openai.OpenAI, policy: str) -> None:
    with small_only.chat.completions.with_streaming_response.create(
            model=policy, messages=ASK, stream=True, **SAMPLING,
            extra_headers={"cache-control": "no-cache"}) as response:
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in response.iter_lines()
                       if line.startswith("data: {") and '"choices":[{' in line)
        assert response.http_response.status_code == 200
        assert response.headers["x-smallfirst-route"] == "small"
    assert text.strip()


def test_tools_and_json_mode(small_only: openai.OpenAI) -> None:
    raw = small_only.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=64)  # room for the call's wrapper and its arguments
    served(raw)
    call = raw.parse().choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments)["city"]
    raw = small_only.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Rome's country, as JSON."}],
        response_format={"type": "json_object"}, **SAMPLING)
    served(raw)  # JSON, or flagged invalid_json_served: there is nowhere to escalate
    if raw.headers.get("x-smallfirst-note") != "invalid_json_served":
        json.loads(raw.parse().choices[0].message.content)
