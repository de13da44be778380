"""End to end: the official `openai` client against real gateway processes.

Both the small and the frontier model are played by the scripted upstream (the stand-in for a
paid provider); each request scripts its answer with a `<<script {...}>>` directive, and a
unique script `key` per test lets the upstream's `/stats` tell how often it was called.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from openai.types.chat import ChatCompletion

from gateway.api.auth import hash_key
from tests.conftest import POLICIES, GatewayRunner, script, upstream_config

SMALL = "small-stand-in"
FRONTIER = "frontier-stand-in"
MAX_BODY_BYTES = 16 * 1024

# Policies added beside the shipped ones for these tests.
EXTRA_POLICIES: dict[str, dict[str, Any]] = {
    "frontier.yaml": {"name": "frontier", "route": "frontier_only"},
    "strict.yaml": {"name": "strict", "allow_direct_models": False},
    "hurried.yaml": {
        "name": "hurried", "route": "frontier_only", "latency_budget": {"escalation": 300},
    },
}


# ---- fixtures and helpers ------------------------------------------------------------------

# Log files of the gateways this module started: a traceback in one is a failed test.
GATEWAY_LOGS: list[Path] = []


def started(runner: GatewayRunner, base: str) -> str:
    GATEWAY_LOGS.append(runner.last_process.log)
    return base


@pytest.fixture(autouse=True)
def no_server_tracebacks() -> Iterator[None]:
    yield
    for log in GATEWAY_LOGS:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, f"{log}:\n{text[max(0, text.find('Traceback') - 200):]}"


@pytest.fixture(scope="session")
def e2e_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("e2e") / "policies"
    shutil.copytree(POLICIES, directory)
    for name, policy in EXTRA_POLICIES.items():
        (directory / name).write_text(yaml.safe_dump(policy))
    return directory


@pytest.fixture(scope="session")
def gw(session_gateways: GatewayRunner, upstream: str, e2e_policies: Path) -> str:
    """Open-auth gateway over the scripted upstream, with the extra policies and a small
    body limit."""
    config = upstream_config(upstream, max_body_bytes=MAX_BODY_BYTES)
    return started(session_gateways, session_gateways.start(config, policies=e2e_policies))


@pytest.fixture(scope="session")
def keys() -> dict[str, str]:
    return {"plain": "sk-e2e-plain-" + uuid.uuid4().hex,
            "hashed": "sk-e2e-hashed-" + uuid.uuid4().hex,
            "admin": "sk-e2e-admin-" + uuid.uuid4().hex}


@pytest.fixture(scope="session")
def auth_gw(
    session_gateways: GatewayRunner,
    upstream: str,
    keys: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """A gateway with auth on (one tenant's key is stored only as its hash) whose frontier
    speaks Anthropic's Messages API, played by the upstream. One process serves both kinds of
    test because every gateway start costs seconds."""
    keys_file = tmp_path_factory.mktemp("auth") / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": {
        "acme": {"keys": [keys["plain"]], "key_hashes": [hash_key(keys["hashed"])]},
        "ops": {"keys": [keys["admin"]], "admin": True},
    }}))
    config = upstream_config(
        upstream, auth="on", api_keys_file=str(keys_file),
        frontier_model="anthropic/claude-stand-in", frontier_api_base=upstream,
    )
    return started(session_gateways, session_gateways.start(config))


def client(base: str, key: str = "unused", **options: Any) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                  timeout=options.pop("timeout", 30), **options)


def new_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def upstream_stats(upstream: str) -> dict[str, Any]:
    return httpx.get(f"{upstream}/stats").json()


def attempts(upstream: str, key: str) -> int:
    return upstream_stats(upstream)["keys"].get(key, 0)


def words(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as the upstream counts them: whitespace-separated words of all messages."""
    return sum(len(m["content"].split()) for m in messages)


def parse_scores(header: str) -> dict[str, float]:
    """`x-smallfirst-scores`: 'difficulty=0.912, confidence=0.951'."""
    scores = dict(part.strip().split("=") for part in header.split(","))
    values = {name: float(value) for name, value in scores.items()}
    assert all(0 <= v <= 1 for v in values.values()), header
    return values


def timing_names(header: str) -> set[str]:
    return {part.split(";")[0].strip() for part in header.split(",")}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_openai_error(exc: openai.APIStatusError, status: int, code: str | None = None) -> None:
    """The error body is OpenAI's shape and never leaks validation-library internals."""
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    assert exc.response.headers.get("x-request-id")
    text = exc.response.text.lower()
    assert "pydantic" not in text and "traceback" not in text


# ---- the cascade over HTTP -----------------------------------------------------------------


def test_confident_small_answer_with_routing_headers(gw: str, upstream: str) -> None:
    key = new_key("small")
    messages = [
        {"role": "system", "content": "You are a terse geography tutor."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?" + script(text="Rome, of course.", key=key)},
    ]
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=messages, extra_headers={"x-request-id": "e2e-small-1"}
    )
    response = raw.parse()
    headers = raw.headers
    assert headers["x-smallfirst-route"] == "small"
    assert headers["x-smallfirst-policy"] == "auto"
    scores = parse_scores(headers["x-smallfirst-scores"])
    assert set(scores) == {"difficulty", "confidence"}
    assert scores["confidence"] >= 0.5  # the policy's threshold
    assert headers["x-request-id"] == "e2e-small-1"
    assert "x-smallfirst-escalation" not in headers
    names = timing_names(headers["server-timing"])
    assert {"auth", "policy", "difficulty", "small_ttft", "small_generation", "confidence",
            "total"} <= names
    assert not names & {"frontier", "frontier_ttft"}

    assert response.model == SMALL
    assert response.id == "chatcmpl-e2e-small-1"
    assert response.choices[0].message.content == "Rome, of course."
    assert response.choices[0].finish_reason == "stop"
    # Every message (system and earlier turns too) reached the model.
    assert response.usage.prompt_tokens == words(messages)
    assert response.usage.completion_tokens == 3
    assert attempts(upstream, key) == 1


def test_content_parts_are_accepted(gw: str) -> None:
    key = new_key("parts")
    parts = [{"type": "text", "text": "Describe this."},
             {"type": "text", "text": "Briefly." + script(text="A cat.", key=key)}]
    response = client(gw).chat.completions.create(
        model="auto", messages=[{"role": "developer", "content": "Be kind."},
                                {"role": "user", "content": parts}],
    )
    assert response.choices[0].message.content == "A cat."


def test_request_id_is_generated_when_absent_or_unsafe(gw: str) -> None:
    api = client(gw).chat.completions.with_raw_response
    generated = api.create(model="auto",
                           messages=user("hi" + script(text="ok", key=new_key("rid"))))
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert generated.parse().id == "chatcmpl-" + generated.headers["x-request-id"]
    unsafe = api.create(model="auto", messages=user("hi" + script(text="ok", key=new_key("rid"))),
                        extra_headers={"x-request-id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])


def test_unsure_small_answer_escalates_to_the_frontier(gw: str, upstream: str) -> None:
    key = new_key("esc")
    messages = user("Prove it." + script(text="maybe it holds", logprob=-3, key=key))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=messages)
    response = raw.parse()
    assert raw.headers["x-smallfirst-route"] == "escalated"
    assert raw.headers["x-smallfirst-escalation"] == "low_confidence"
    assert parse_scores(raw.headers["x-smallfirst-scores"])["confidence"] < 0.5
    assert {"small_ttft", "confidence", "frontier"} <= timing_names(raw.headers["server-timing"])
    assert response.model == FRONTIER
    assert response.choices[0].message.content == "maybe it holds"
    assert attempts(upstream, key) == 2  # the small model once, then the frontier once
    prompt = words(messages)
    assert response.usage.prompt_tokens == 2 * prompt
    assert response.usage.completion_tokens == 2 * 3
    assert response.usage.total_tokens == 2 * (prompt + 3)


def test_streamed_small_answer(gw: str, upstream: str) -> None:
    key = new_key("stream-small")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name three colours." + script(text="red green blue",
                                                                 key=key)},
    ]
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=messages, stream=True,
        extra_headers={"x-request-id": "e2e-stream-1"},
    )
    assert raw.headers["x-smallfirst-route"] == "small"
    assert raw.headers["x-smallfirst-policy"] == "auto"
    assert raw.headers["x-request-id"] == "e2e-stream-1"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert {"small_ttft", "confidence"} <= timing_names(raw.headers["server-timing"])
    chunks = list(raw.parse())
    assert streamed_text(chunks) == "red green blue"
    assert {c.model for c in chunks} == {SMALL}
    assert {c.id for c in chunks} == {"chatcmpl-e2e-stream-1"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert attempts(upstream, key) == 1


def test_streamed_escalation_reports_usage_of_both_attempts(gw: str, upstream: str) -> None:
    key = new_key("stream-esc")
    text = "perhaps seven or eight"
    messages = [
        {"role": "system", "content": "Count carefully."},
        {"role": "user", "content": "How many legs?" + script(text=text, logprob=-3, key=key)},
    ]
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-smallfirst-route"] == "escalated"
    assert raw.headers["x-smallfirst-escalation"] == "low_confidence"
    assert {"small_ttft", "frontier_ttft"} <= timing_names(raw.headers["server-timing"])
    chunks = list(raw.parse())
    assert streamed_text(chunks) == text
    assert {c.model for c in chunks} == {FRONTIER}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    # Expected from the upstream's counting: prompt words and answer pieces, for each attempt.
    prompt, completion = words(messages), len(text.split())
    assert last.usage.prompt_tokens == 2 * prompt
    assert last.usage.completion_tokens == 2 * completion
    assert last.usage.total_tokens == 2 * (prompt + completion)
    assert attempts(upstream, key) == 2

    # ... and the same as the two backends' usage when called directly.
    direct = [
        list(client(gw).chat.completions.create(
            model=name, messages=messages, stream=True, stream_options={"include_usage": True}
        ))[-1].usage
        for name in (SMALL, FRONTIER)
    ]
    assert last.usage.prompt_tokens == sum(u.prompt_tokens for u in direct)
    assert last.usage.completion_tokens == sum(u.completion_tokens for u in direct)


def test_usage_counts_the_prompt_of_a_rejected_held_back_prefix(gw: str) -> None:
    key = new_key("held-usage")
    # 40 unsure tokens: the 16-token prefix is judged and rejected before the answer ends.
    messages = user("one two three" + script(output_tokens=40, logprob=-3, key=key))
    chunks = list(client(gw).chat.completions.create(
        model="auto", messages=messages, stream=True, stream_options={"include_usage": True}
    ))
    usage = chunks[-1].usage
    assert usage.completion_tokens == 16 + 40
    assert usage.prompt_tokens == 2 * words(messages)


def test_direct_model_names_go_straight_to_that_backend(gw: str, upstream: str) -> None:
    api = client(gw).chat.completions.with_raw_response
    key = new_key("direct-small")
    # An unsure answer: under `auto` it would escalate, named directly it must not.
    raw = api.create(model=SMALL, messages=user("hi" + script(text="eh", logprob=-3, key=key)))
    assert raw.headers["x-smallfirst-route"] == "small"
    assert raw.headers["x-smallfirst-policy"] == "auto"
    assert raw.parse().model == SMALL
    assert attempts(upstream, key) == 1

    key = new_key("direct-frontier")
    raw = api.create(model=FRONTIER, messages=user("hi" + script(text="sure", key=key)))
    assert raw.headers["x-smallfirst-route"] == "frontier"
    assert raw.parse().model == FRONTIER
    assert raw.parse().choices[0].message.content == "sure"
    assert attempts(upstream, key) == 1
    assert not {"small_ttft", "confidence"} & timing_names(raw.headers["server-timing"])

    stream = api.create(model=FRONTIER, stream=True,
                        messages=user("hi" + script(text="sure thing", key=key)))
    assert stream.headers["x-smallfirst-route"] == "frontier"
    chunks = list(stream.parse())
    assert streamed_text(chunks) == "sure thing" and {c.model for c in chunks} == {FRONTIER}


def test_policy_header_selects_the_policy(gw: str, upstream: str) -> None:
    key = new_key("policy-header")
    raw = client(gw).chat.completions.with_raw_response.create(
        model=FRONTIER, messages=user("hi" + script(text="fine", key=key)),
        extra_headers={"x-smallfirst-policy": "quality"},
    )
    assert raw.headers["x-smallfirst-policy"] == "quality"
    raw = client(gw).chat.completions.with_raw_response.create(
        model="autocomplete", messages=user("def f(" + script(text="x):", key=key)),
    )
    assert raw.headers["x-smallfirst-policy"] == "fast"
    assert raw.headers["x-smallfirst-route"] == "small"


def test_models_lists_policy_aliases_and_backends(gw: str) -> None:
    ids = {m.id for m in client(gw).models.list()}
    assert {"auto", "default", "chat", "fast", "autocomplete", "quality"} <= ids
    assert {p["name"] for p in EXTRA_POLICIES.values()} <= ids
    assert {SMALL, FRONTIER} <= ids


# ---- tools -----------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_ARGUMENTS = {"city": "Paris", "unit": "celsius"}


def tool_messages(key: str) -> list[dict[str, Any]]:
    directive = script(tool_call={"name": "get_weather", "arguments": TOOL_ARGUMENTS},
                       logprob=-3, key=key)
    return user("What is the weather in Paris?" + directive)


def test_tool_call_from_the_frontier(gw: str, upstream: str) -> None:
    key = new_key("tools")
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=tool_messages(key), tools=[WEATHER_TOOL]
    )
    assert raw.headers["x-smallfirst-route"] == "escalated"
    response = raw.parse()
    assert response.model == FRONTIER
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
    assert attempts(upstream, key) == 2


def test_streamed_tool_call_from_the_frontier(gw: str) -> None:
    key = new_key("tools-stream")
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=tool_messages(key), tools=[WEATHER_TOOL], stream=True
    )
    assert raw.headers["x-smallfirst-route"] == "escalated"
    name, arguments, ids, finish = "", "", set(), None
    for chunk in raw.parse():
        assert chunk.model == FRONTIER
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                ids |= {delta.id} - {None}
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
    assert name == "get_weather"
    assert json.loads(arguments) == TOOL_ARGUMENTS
    assert len(ids) == 1
    assert finish == "tool_calls"


# ---- legacy completions ----------------------------------------------------------------------


def test_legacy_completions(gw: str) -> None:
    api = client(gw).completions
    response = api.create(
        model="auto", prompt="Say hi." + script(text="hi there friend", key=new_key("legacy"))
    )
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.model == SMALL
    assert response.choices[0].text == "hi there friend"
    assert response.choices[0].finish_reason == "stop"

    raw = api.with_raw_response.create(
        model="auto", prompt="Say hi." + script(text="why not", logprob=-3, key=new_key("legacy")),
        stream=True
    )
    assert raw.headers["x-smallfirst-route"] == "escalated"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "why not"
    assert {c.object for c in chunks} == {"text_completion"}
    assert {c.model for c in chunks} == {FRONTIER}


# ---- errors ------------------------------------------------------------------------------------


def test_bad_json_is_a_400(gw: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).post(
            "/chat/completions", cast_to=ChatCompletion, content=b'{"model": "auto", "mess',
            options={"headers": {"content-type": "application/json"}},
        )
    assert_openai_error(caught.value, 400)
    assert "JSON" in caught.value.message


def test_missing_messages_is_a_400(gw: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).post("/chat/completions", cast_to=ChatCompletion, body={"model": "auto"})
    assert_openai_error(caught.value, 400)
    assert caught.value.param == "messages"
    assert "messages" in caught.value.message


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "messages.0.role"),
    ],
)
def test_invalid_parameters_are_400s_naming_the_field(
    gw: str, params: dict[str, Any], param: str
) -> None:
    request = {"model": "auto", "messages": user("hi"), **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(**request)
    assert_openai_error(caught.value, 400)
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    message = caught.value.message
    assert "pydantic" not in message and "errors.pydantic.dev" not in message
    assert "{'" not in message  # no raw validation payloads


def test_unknown_model_is_a_404(gw: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).chat.completions.create(model="gpt-nonexistent", messages=user("hi"))
    assert_openai_error(caught.value, 404, "model_not_found")
    assert "auto" in caught.value.message  # it names the models that do exist
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).chat.completions.create(
            model="auto", messages=user("hi"), extra_headers={"x-smallfirst-policy": "nope"}
        )
    assert_openai_error(caught.value, 404, "model_not_found")


def test_unknown_path_is_a_404_in_openai_shape(gw: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).embeddings.create(model="auto", input="hi")
    assert_openai_error(caught.value, 404)


def test_direct_model_forbidden_by_policy_is_a_403(gw: str, upstream: str) -> None:
    key = new_key("forbidden")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gw).chat.completions.create(
            model=FRONTIER, messages=user("hi" + script(key=key)),
            extra_headers={"x-smallfirst-policy": "strict"},
        )
    assert_openai_error(caught.value, 403, "model_not_allowed")
    assert attempts(upstream, key) == 0
    # The same policy still serves its own alias.
    ok = client(gw).chat.completions.with_raw_response.create(
        model="strict", messages=user("hi" + script(text="fine", key=new_key("strict"))))
    assert ok.headers["x-smallfirst-policy"] == "strict"


def test_oversized_body_is_a_413(gw: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw).chat.completions.create(model="auto", messages=user("x " * MAX_BODY_BYTES))
    assert_openai_error(caught.value, 413, "request_too_large")

    # Without a Content-Length (chunked upload) the limit holds while reading.
    body = json.dumps({"model": "auto", "messages": user("x " * MAX_BODY_BYTES)}).encode()
    pieces = iter([body[i:i + 4096] for i in range(0, len(body), 4096)])
    response = httpx.post(f"{gw}/v1/chat/completions", content=pieces,
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_upstream_rate_limit_is_a_429_with_retry_after(gw: str, upstream: str) -> None:
    key = new_key("ratelimit")
    with pytest.raises(openai.RateLimitError) as caught:
        client(gw).chat.completions.create(
            model="frontier", messages=user("hi" + script(status=429, retry_after=30, key=key))
        )
    assert_openai_error(caught.value, 429, "rate_limit_exceeded")
    assert caught.value.response.headers["retry-after"] == "30"
    # 30 s is beyond max_retry_after_s: not waited, not retried.
    assert attempts(upstream, key) == 1


def test_every_backend_failing_is_a_502(gw: str, upstream: str) -> None:
    key = new_key("down")
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model="frontier", messages=user("hi" + script(status=500, key=key))
        )
    assert_openai_error(caught.value, 502, "bad_gateway")
    assert attempts(upstream, key) == 3  # retried up to max_attempts

    # Streamed: nothing was sent yet, so it is a real status too, not a 200 with an error.
    key = new_key("down-stream")
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model="frontier", stream=True, messages=user("hi" + script(status=500, key=key))
        )
    assert_openai_error(caught.value, 502, "bad_gateway")


def test_small_and_frontier_both_failing_is_a_502(gw: str, upstream: str) -> None:
    key = new_key("all-down")
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model="auto", messages=user("hi" + script(status=503, key=key))
        )
    assert_openai_error(caught.value, 502)
    assert attempts(upstream, key) == 1 + 3  # the small model, then the frontier's retries
    # The failure is counted under the route it failed on, not an anonymous one.
    failed = re.findall(r'^smallfirst_requests_total\{([^}]*status="502"[^}]*)\}',
                        httpx.get(f"{gw}/metrics").text, re.M)
    assert any('route="escalated"' in labels and 'policy="auto"' in labels for labels in failed)


def test_frontier_deadline_is_a_504(gw: str, upstream: str) -> None:
    key = new_key("deadline")
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model="hurried", messages=user("hi" + script(ttft_ms=3000, key=key))
        )
    assert_openai_error(caught.value, 504, "upstream_timeout")
    assert attempts(upstream, key) == 1  # a timed-out attempt is not retried


# ---- auth ------------------------------------------------------------------------------------


def test_plain_and_hashed_keys_are_accepted(auth_gw: str, keys: dict[str, str]) -> None:
    for name in ("plain", "hashed", "admin"):
        raw = client(auth_gw, keys[name]).chat.completions.with_raw_response.create(
            model="auto", messages=user("hi" + script(text="hello", key=new_key("auth")))
        )
        assert raw.parse().choices[0].message.content == "hello"
        assert {m.id for m in client(auth_gw, keys[name]).models.list()} >= {"auto"}


@pytest.mark.parametrize(
    ("authorization", "says"),
    [("Bearer sk-wrong", "Incorrect API key"), ("Basic dXNlcjpwYXNz", "Malformed"),
     ("Bearer", "Malformed"), (None, "Missing API key")],
    ids=["wrong-key", "wrong-scheme", "no-key", "missing"],
)
def test_bad_credentials_are_401s(auth_gw: str, authorization: str | None, says: str) -> None:
    api = client(auth_gw, "placeholder")
    headers = {"Authorization": authorization if authorization else openai.omit}
    with pytest.raises(openai.AuthenticationError) as caught:
        api.chat.completions.create(model="auto", messages=user("hi"), extra_headers=headers)
    assert_openai_error(caught.value, 401, "invalid_api_key")
    assert caught.value.type == "authentication_error"
    assert says in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        api.models.list(extra_headers=headers)


def test_admin_api_needs_an_admin_key(auth_gw: str, keys: dict[str, str]) -> None:
    url = f"{auth_gw}/admin/policies"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(auth_gw, keys["plain"]).get(url, cast_to=object)
    assert_openai_error(caught.value, 403)
    with pytest.raises(openai.PermissionDeniedError):
        client(auth_gw, keys["hashed"]).post(url + "/reload", cast_to=object)
    with pytest.raises(openai.AuthenticationError):
        client(auth_gw, "sk-wrong").get(url, cast_to=object)
    status = client(auth_gw, keys["admin"]).get(url, cast_to=object)
    assert status["default"] == "auto" and status["last_error"] is None


# ---- streams that break, and clients that leave ------------------------------------------------


def test_cut_after_bytes_were_sent_raises_in_the_client(gw: str, upstream: str) -> None:
    key = new_key("cut")
    # The held-back prefix (16 tokens) is accepted and sent; the upstream dies at token 20.
    stream = client(gw).chat.completions.create(
        model="auto", stream=True,
        messages=user("hi" + script(output_tokens=40, cut_after_tokens=20, key=key)),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert streamed_text(received), "part of the answer had already been sent"
    assert not isinstance(caught.value, openai.APIStatusError)  # in-band, after a 200
    assert "incomplete" in caught.value.message
    assert all(c.choices[0].finish_reason is None for c in received if c.choices)


def wait_for_cancel(upstream: str, key: str, timeout: float = 6.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cancelled = upstream_stats(upstream).get("cancelled", {}).get(key, 0)
        if cancelled:
            return cancelled
        time.sleep(0.05)
    return 0


def in_flight(gw: str) -> float:
    """The gateway's in-flight request gauge, from its Prometheus metrics."""
    text = httpx.get(f"{gw}/metrics").text
    match = re.search(r"^smallfirst_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert match, "no in-flight gauge in /metrics"
    return float(match.group(1))


def wait_for_idle(gw: str, timeout: float = 6.0) -> float:
    deadline = time.monotonic() + timeout
    while (count := in_flight(gw)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def test_client_leaving_a_stream_cancels_the_upstream(gw: str, upstream: str) -> None:
    key = new_key("leave-stream")
    # 60 tokens at 4 a second: the upstream would stream for 15 s if nobody stopped it.
    stream = client(gw).chat.completions.create(
        model="auto", stream=True,
        messages=user("hi" + script(output_tokens=60, tokens_per_s=4, key=key)),
    )
    first = next(iter(stream))
    assert first.model == SMALL
    assert in_flight(gw) >= 1
    stream.close()
    assert wait_for_cancel(upstream, key) == 1
    assert wait_for_idle(gw) == 0
    assert attempts(upstream, key) == 1
    assert_gateway_still_serves(gw)


def test_client_giving_up_on_a_non_streamed_request_cancels_the_upstream(
    gw: str, upstream: str
) -> None:
    key = new_key("leave-wait")
    # `quality` buffers the small answer for up to 10 s; the client gives up after 1 s.
    with pytest.raises(openai.APITimeoutError):
        client(gw, timeout=1).chat.completions.create(
            model="quality",
            messages=user("hi" + script(output_tokens=60, tokens_per_s=4, key=key)),
        )
    assert wait_for_cancel(upstream, key) == 1
    assert wait_for_idle(gw) == 0
    assert attempts(upstream, key) == 1  # never escalated after the client left
    assert_gateway_still_serves(gw)


def assert_gateway_still_serves(gw: str) -> None:
    response = client(gw).chat.completions.create(
        model="auto", messages=user("still there?" + script(text="yes", key=new_key("alive")))
    )
    assert response.choices[0].message.content == "yes"


# ---- provider independence -----------------------------------------------------------------


def test_frontier_over_the_anthropic_wire_format(
    auth_gw: str, keys: dict[str, str], upstream: str
) -> None:
    before = upstream_stats(upstream)["paths"].get("/v1/messages", 0)
    key = new_key("anthropic")
    api = client(auth_gw, keys["plain"]).chat.completions.with_raw_response
    messages = [
        {"role": "system", "content": "Be precise."},
        {"role": "user", "content": "Why?" + script(text="because of physics", logprob=-3,
                                                   key=key)},
    ]
    raw = api.create(model="auto", messages=messages)
    assert raw.headers["x-smallfirst-route"] == "escalated"
    response = raw.parse()
    assert response.choices[0].message.content == "because of physics"
    assert response.model == "claude-stand-in"
    assert response.usage.completion_tokens == 2 * 3

    # The same question again: skip the cache so it is answered over the wire once more.
    raw = api.create(model="auto", messages=messages, stream=True,
                     stream_options={"include_usage": True},
                     extra_headers={"cache-control": "no-cache"})
    assert raw.headers["x-smallfirst-route"] == "escalated"
    chunks = list(raw.parse())
    assert streamed_text(chunks) == "because of physics"
    assert {c.model for c in chunks} == {"claude-stand-in"}
    assert chunks[-1].usage.completion_tokens == 2 * 3

    raw = api.create(model="auto", messages=tool_messages(key), tools=[WEATHER_TOOL])
    (call,) = raw.parse().choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS

    assert upstream_stats(upstream)["paths"].get("/v1/messages", 0) - before == 3
    assert attempts(upstream, key) == 6  # three small attempts, three Anthropic ones
