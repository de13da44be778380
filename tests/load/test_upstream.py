"""Behaviour of the scripted upstream (load.upstream), the stand-in provider used by tests."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from load.upstream import SCRIPT_HEADER, BadRequest, create_app, split_text

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app("test-model"))
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as c:
        yield c


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "upstream process exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("upstream process did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real upstream process on a free port: (base url, its log file)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    with log.open("wb") as sink:
        cmd = [sys.executable, "-m", "load.upstream", "--port", str(port), "--model-name", "srv"]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc)
            yield url, log
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    # Without this the import fetches a price map from the network and retries for seconds.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return importlib.import_module("litellm")


def chat(content: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def directive(script: dict[str, Any], prompt: str = "hello there") -> str:
    return f"{prompt} <<script {json.dumps(script)}>>"


def script_header(script: dict[str, Any]) -> dict[str, str]:
    return {SCRIPT_HEADER: json.dumps(script)}


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event in a body."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event"), lines["data"]))
    return events


def sse_json(text: str) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in sse_events(text) if data != "[DONE]"]


def chat_stream_content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# ----------------------------------------------------------------------- OpenAI chat, plain


async def test_default_answer_is_deterministic_and_counted(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/chat/completions", json=chat())).json()
    again = (await client.post("/v1/chat/completions", json=chat())).json()
    other = (await client.post("/v1/chat/completions", json=chat("Another question"))).json()
    text = first["choices"][0]["message"]["content"]
    assert text.startswith("Answer:") and len(split_text(text)) == 16
    assert text == again["choices"][0]["message"]["content"]
    assert text != other["choices"][0]["message"]["content"]
    assert first["object"] == "chat.completion" and first["model"] == "m"
    assert first["choices"][0]["finish_reason"] == "stop"
    assert first["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}


async def test_header_script_wins_over_directive(client: httpx.AsyncClient) -> None:
    body = chat(directive({"text": "from the directive"}))
    headers = script_header({"text": "from the header", "model": "frontier-x"})
    reply = (await client.post("/v1/chat/completions", json=body, headers=headers)).json()
    assert reply["choices"][0]["message"]["content"] == "from the header"
    assert reply["model"] == "frontier-x"
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    assert plain["choices"][0]["message"]["content"] == "from the directive"


async def test_server_defaults_fill_what_a_script_leaves_out() -> None:
    app = create_app("test-model", defaults={"text": "default text", "model": "small-x"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        plain = (await client.post("/v1/chat/completions", json=chat())).json()
        scripted = (await client.post("/v1/chat/completions",
                                      json=chat(directive({"text": "own text"})))).json()
    assert plain["choices"][0]["message"]["content"] == "default text"
    assert scripted["choices"][0]["message"]["content"] == "own text"
    assert plain["model"] == scripted["model"] == "small-x"


def test_a_bad_server_default_fails_at_start() -> None:
    with pytest.raises(BadRequest, match="ttft_ms"):
        create_app("test-model", defaults={"ttft_ms": -1})


async def test_directive_is_read_from_the_last_user_message_only(
    client: httpx.AsyncClient,
) -> None:
    messages = [
        {"role": "system", "content": directive({"text": "system says"})},
        {"role": "user", "content": directive({"text": "old turn"})},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": directive({"text": "new turn"})}]},
    ]
    reply = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert reply.json()["choices"][0]["message"]["content"] == "new turn"


async def test_text_splits_into_pieces_and_max_tokens_truncates(
    client: httpx.AsyncClient,
) -> None:
    body = chat(directive({"text": "one two three four five"}), max_tokens=3)
    reply = (await client.post("/v1/chat/completions", json=body)).json()
    assert reply["choices"][0]["message"]["content"] == "one two three"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3
    assert split_text("  a b\n c ") == ("  a", " b", "\n c", " ")


@pytest.mark.parametrize(
    "script",
    [{"ttft_ms": "slow"}, {"no_such_field": 1}, {"output_tokens": -1}, {"logprob": True}],
)
async def test_bad_script_is_a_400(client: httpx.AsyncClient, script: dict[str, Any]) -> None:
    reply = await client.post("/v1/chat/completions", json=chat(directive(script)))
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


async def test_malformed_request_is_a_400(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/chat/completions", content=b"{not json")
    assert reply.status_code == 400
    reply = await client.post("/v1/chat/completions", json={"model": "m"})
    assert reply.status_code == 400 and "messages" in reply.json()["error"]["message"]


# ------------------------------------------------------------------------------- logprobs


async def test_logprobs_non_streamed(client: httpx.AsyncClient) -> None:
    script = {"output_tokens": 5, "logprob": -0.2, "min_logprob": -3.0}
    body = chat(directive(script), logprobs=True, top_logprobs=3)
    reply = (await client.post("/v1/chat/completions", json=body)).json()
    entries = reply["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in entries] == [-0.2, -0.2, -3.0, -0.2, -0.2]
    assert "".join(e["token"] for e in entries) == reply["choices"][0]["message"]["content"]
    assert all(len(e["top_logprobs"]) == 3 for e in entries)
    assert entries[0]["bytes"] == list(entries[0]["token"].encode())
    # The unsure token is not the most likely one among its alternatives.
    assert entries[2]["top_logprobs"][0]["logprob"] > -3.0
    unasked = (await client.post("/v1/chat/completions", json=chat())).json()
    assert unasked["choices"][0]["logprobs"] is None


async def test_logprobs_streamed(client: httpx.AsyncClient) -> None:
    body = chat(directive({"output_tokens": 4, "min_logprob": -2.5}), logprobs=True, stream=True)
    chunks = sse_json((await client.post("/v1/chat/completions", json=body)).text)
    values = [
        entry["logprob"]
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for entry in c["choices"][0]["logprobs"]["content"]
    ]
    assert values == [-0.05, -0.05, -2.5, -0.05]


# ------------------------------------------------------------------------------- streaming


async def test_chat_stream_shape(client: httpx.AsyncClient) -> None:
    body = chat(directive({"text": "a b c"}), stream=True, stream_options={"include_usage": True})
    reply = await client.post("/v1/chat/completions", json=body)
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert sse_events(reply.text)[-1] == (None, "[DONE]")
    chunks = sse_json(reply.text)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_stream_content(chunks) == "a b c"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_usage_chunk_only_when_asked(client: httpx.AsyncClient) -> None:
    body = chat(stream=True)
    chunks = sse_json((await client.post("/v1/chat/completions", json=body)).text)
    assert all(c["choices"] and "usage" not in c for c in chunks)


# ------------------------------------------------------------------------------- tool calls


async def test_tool_call_non_streamed(client: httpx.AsyncClient) -> None:
    script = {"tool_call": {"arguments": {"city": "Paris"}}}
    body = chat(directive(script), tools=TOOLS)
    choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    without_tools = await client.post("/v1/chat/completions", json=chat(directive(script)))
    assert without_tools.json()["choices"][0]["message"]["content"].startswith("Answer:")


async def test_tool_call_streamed_in_pieces(client: httpx.AsyncClient) -> None:
    body = chat(
        directive({"tool_call": {"arguments": {"city": "Paris"}}}), tools=TOOLS, stream=True
    )
    chunks = sse_json((await client.post("/v1/chat/completions", json=body)).text)
    calls = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
    head = calls[0][0]
    assert head["id"].startswith("call_") and head["function"]["name"] == "get_weather"
    pieces = [call[0]["function"]["arguments"] for call in calls[1:] if call]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_named_tool_choice_is_answered_with_that_tool(client: httpx.AsyncClient) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        reply = await client.post("/v1/chat/completions",
                                  json=chat("Weather?", tools=TOOLS, tool_choice=choice))
        call = reply.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    auto = await client.post("/v1/chat/completions", json=chat("Weather?", tools=TOOLS))
    assert auto.json()["choices"][0]["message"]["content"].startswith("Answer:")


async def test_json_mode_is_answered_with_a_json_object(client: httpx.AsyncClient) -> None:
    for kind in ("json_object", "json_schema"):
        reply = await client.post("/v1/chat/completions", json=chat(
            "Capital of France?", response_format={"type": kind}))
        answer = json.loads(reply.json()["choices"][0]["message"]["content"])
        assert answer["answer"].startswith("Answer:")


# ---------------------------------------------------------------------- errors and retries


async def test_status_and_retry_after(client: httpx.AsyncClient) -> None:
    body = chat(directive({"status": 429, "retry_after": 2}))
    reply = await client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "2"
    assert reply.json()["error"]["type"] == "rate_limit_error"
    messages = {
        "model": "m",
        "max_tokens": 5,
        "messages": chat(directive({"status": 529}))["messages"],
    }
    reply = await client.post("/v1/messages", json=messages)
    assert reply.status_code == 529 and "retry-after" not in reply.headers
    assert reply.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": reply.json()["error"]["message"]},
    }


async def test_fail_times_then_succeed_and_stats(client: httpx.AsyncClient) -> None:
    body = chat(directive({"fail_times": 2, "status": 503, "key": "flaky"}))
    codes = [(await client.post("/v1/chat/completions", json=body)).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    await client.post("/v1/chat/completions", json=chat())
    stats = (await client.get("/stats")).json()
    assert stats["keys"] == {"flaky": 4, "default": 1} and stats["total"] == 5
    assert stats["paths"] == {"/v1/chat/completions": 5}
    await client.post("/stats/reset", params={"key": "flaky"})
    assert (await client.get("/stats")).json()["keys"] == {"default": 1}
    # The counter restarted, so the key fails again.
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 503
    await client.post("/stats/reset")
    empty = {"total": 0, "keys": {}, "paths": {}, "cancelled": {}, "traceparent": {}}
    assert (await client.get("/stats")).json() == empty


async def test_stats_record_the_last_traceparent_per_key(client: httpx.AsyncClient) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = chat(directive({"key": "traced"}))
    await client.post("/v1/chat/completions", json=body, headers={"traceparent": parent})
    await client.post("/v1/chat/completions", json=chat())
    assert (await client.get("/stats")).json()["traceparent"] == {"traced": parent}
    await client.post("/stats/reset", params={"key": "traced"})
    assert (await client.get("/stats")).json()["traceparent"] == {}


async def test_fail_times_defaults_to_500(client: httpx.AsyncClient) -> None:
    body = chat(directive({"fail_times": 1, "key": "once"}))
    first = await client.post("/v1/chat/completions", json=body)
    second = await client.post("/v1/chat/completions", json=body)
    assert (first.status_code, second.status_code) == (500, 200)
    assert second.headers["x-upstream-attempt"] == "2"


# -------------------------------------------------------------------------- delays (bounds)


async def test_delays_are_applied(client: httpx.AsyncClient) -> None:
    cases = [
        ({"ttft_ms": 150}, 0.15),
        ({"stall_before_ms": 150}, 0.15),
        ({"output_tokens": 5, "tokens_per_s": 20}, 0.2),
        ({"stall_after_tokens": 2, "stall_ms": 150}, 0.15),
    ]
    for script, at_least in cases:
        for stream in (False, True):
            started = time.monotonic()
            reply = await client.post(
                "/v1/chat/completions", json=chat(directive(script), stream=stream)
            )
            assert reply.status_code == 200
            assert time.monotonic() - started >= at_least * 0.9, (script, stream)


async def test_ttft_delays_tokens_not_headers(server: tuple[str, Path]) -> None:
    url, _ = server
    body = chat(directive({"ttft_ms": 300}), stream=True)
    async with httpx.AsyncClient(base_url=url) as http:
        started = time.monotonic()
        async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            headers_at = time.monotonic() - started
            async for _ in reply.aiter_lines():
                break
            first_chunk_at = time.monotonic() - started
    assert first_chunk_at - headers_at >= 0.25


# --------------------------------------------------------------------- cuts (real process)


async def _read_until_broken(url: str, path: str, body: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", path, json=body) as reply:
                async for line in reply.aiter_lines():
                    lines.append(line)
    return lines


async def test_cut_breaks_a_chat_stream(server: tuple[str, Path]) -> None:
    body = chat(directive({"text": "a b c d e", "cut_after_tokens": 2}), stream=True)
    lines = await _read_until_broken(server[0], "/v1/chat/completions", body)
    chunks = sse_json("\n".join(lines))
    assert chat_stream_content(chunks) == "a b"
    assert "data: [DONE]" not in lines
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


async def test_cut_breaks_an_anthropic_stream(server: tuple[str, Path]) -> None:
    messages = chat(directive({"cut_after_tokens": 1}))["messages"]
    body = {"model": "m", "max_tokens": 50, "stream": True, "messages": messages}
    lines = await _read_until_broken(server[0], "/v1/messages", body)
    assert "event: content_block_delta" in lines and "event: message_stop" not in lines


async def test_cut_breaks_a_non_streamed_response(server: tuple[str, Path]) -> None:
    async with httpx.AsyncClient(base_url=server[0]) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/v1/chat/completions", json=chat(directive({"cut_after_tokens": 3})))


def test_scripted_cut_keeps_tracebacks_out_of_the_log(server: tuple[str, Path]) -> None:
    url, log = server
    body = chat(directive({"cut_after_tokens": 0}), stream=True)
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            reply.read()
    assert "Traceback" not in log.read_text()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------ legacy completions


async def test_legacy_completion(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "prompt": directive({"text": "x y z"}), "logprobs": 2}
    reply = (await client.post("/v1/completions", json=body)).json()
    choice = reply["choices"][0]
    assert reply["object"] == "text_completion" and choice["text"] == "x y z"
    assert choice["logprobs"]["tokens"] == ["x", " y", " z"]
    assert choice["logprobs"]["text_offset"] == [0, 1, 3]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text = (await client.post("/v1/completions", json=stream)).text
    chunks = sse_json(text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "x y z"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and text.endswith("data: [DONE]\n\n")


# -------------------------------------------------------------------------- Anthropic format


def anthropic_body(script: dict[str, Any], **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": [{"type": "text", "text": directive(script)}]}]
    return {
        "model": "claude-x",
        "max_tokens": 100,
        "system": "Be brief.",
        "messages": messages,
        **extra,
    }


async def test_anthropic_message(client: httpx.AsyncClient) -> None:
    reply = (await client.post("/v1/messages", json=anthropic_body({"text": "Hi you"}))).json()
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert reply["content"] == [{"type": "text", "text": "Hi you"}]
    assert reply["stop_reason"] == "end_turn" and reply["model"] == "claude-x"
    prompt_words = len(("Be brief. " + directive({"text": "Hi you"})).split())
    assert reply["usage"] == {
        "input_tokens": prompt_words,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    capped = anthropic_body({"output_tokens": 10}, max_tokens=4)
    assert (await client.post("/v1/messages", json=capped)).json()["stop_reason"] == "max_tokens"


async def test_anthropic_tool_use(client: httpx.AsyncClient) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    body = anthropic_body({"tool_call": {"arguments": {"q": "x"}}}, tools=tools)
    reply = (await client.post("/v1/messages", json=body)).json()
    block = reply["content"][0]
    assert reply["stop_reason"] == "tool_use"
    assert block["type"] == "tool_use" and block["name"] == "lookup"
    assert block["input"] == {"q": "x"} and block["id"].startswith("toolu_")


async def test_anthropic_stream_event_sequence(client: httpx.AsyncClient) -> None:
    body = anthropic_body({"text": "a b c"}, stream=True)
    events = sse_events((await client.post("/v1/messages", json=body)).text)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + [
        "content_block_delta"
    ] * 3 + ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == name for d, name in zip(data, names, strict=True))
    prompt_words = len(("Be brief. " + directive({"text": "a b c"})).split())
    assert data[0]["message"]["usage"]["input_tokens"] == prompt_words
    assert "".join(d["delta"]["text"] for d in data[3:6]) == "a b c"
    assert data[-2]["delta"]["stop_reason"] == "end_turn"
    assert data[-2]["usage"]["output_tokens"] == 3


async def test_anthropic_tool_use_streamed(client: httpx.AsyncClient) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    body = anthropic_body(
        {"tool_call": {"arguments": {"q": "some query"}}}, tools=tools, stream=True
    )
    data = sse_json((await client.post("/v1/messages", json=body)).text)
    assert data[1]["content_block"]["type"] == "tool_use"
    partial = [d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"]
    assert len(partial) > 1 and json.loads("".join(partial)) == {"q": "some query"}
    assert data[-2]["delta"]["stop_reason"] == "tool_use"


# ------------------------------------------------------------------------ misc endpoints


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "test-model"
    assert (await client.get("/health")).json() == {"status": "ok"}


# ---------------------------------------------------------------- litellm, both wire formats


def _openai_kwargs(url: str, prefix: str = "openai") -> dict[str, Any]:
    return {"model": f"{prefix}/frontier", "api_base": f"{url}/v1", "api_key": "x"}


def _anthropic_kwargs(url: str) -> dict[str, Any]:
    # litellm's anthropic provider appends /v1/messages to a bare host (a base ending in /v1
    # would become /v1/v1/messages).
    return {"model": "anthropic/frontier", "api_base": url, "api_key": "x", "max_tokens": 100}


def _messages(script: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": directive(script)}]


async def _collect(stream: Any) -> tuple[str, list[Any]]:
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("prefix", ["openai", "hosted_vllm"])
async def test_litellm_openai_format(
    litellm: ModuleType, server: tuple[str, Path], prefix: str
) -> None:
    kwargs = _openai_kwargs(server[0], prefix)
    script = {"text": "Paris is the capital", "min_logprob": -3.0}
    reply = await litellm.acompletion(**kwargs, messages=_messages(script), logprobs=True)
    assert reply.choices[0].message.content == "Paris is the capital"
    assert [e.logprob for e in reply.choices[0].logprobs.content] == [-0.05, -0.05, -3.0, -0.05]
    assert reply.usage.completion_tokens == 4
    stream = await litellm.acompletion(
        **kwargs,
        messages=_messages({"text": "a b c"}),
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = await _collect(stream)
    assert text == "a b c" and chunks[-1].usage.completion_tokens == 3


async def test_litellm_anthropic_format(litellm: ModuleType, server: tuple[str, Path]) -> None:
    kwargs = _anthropic_kwargs(server[0])
    reply = await litellm.acompletion(**kwargs, messages=_messages({"text": "Bonjour à tous"}))
    assert reply.choices[0].message.content == "Bonjour à tous"
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 3
    stream = await litellm.acompletion(**kwargs, messages=_messages({"text": "x y"}), stream=True)
    text, chunks = await _collect(stream)
    assert text == "x y" and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_litellm_tool_call(litellm: ModuleType, server: tuple[str, Path], wire: str) -> None:
    kwargs = _openai_kwargs(server[0]) if wire == "openai" else _anthropic_kwargs(server[0])
    messages = _messages({"tool_call": {"arguments": {"city": "Paris"}}})
    reply = await litellm.acompletion(**kwargs, messages=messages, tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("wire", ["openai", "hosted_vllm", "anthropic"])
async def test_litellm_error_carries_status_and_retry_after(
    litellm: ModuleType, server: tuple[str, Path], wire: str
) -> None:
    url = server[0]
    kwargs = _anthropic_kwargs(url) if wire == "anthropic" else _openai_kwargs(url, wire)
    messages = _messages({"status": 429, "retry_after": 7})
    with pytest.raises(litellm.RateLimitError) as caught:
        await litellm.acompletion(**kwargs, messages=messages, max_retries=0)
    assert caught.value.status_code == 429
    # The only place every provider path keeps the upstream's headers (a dict or httpx.Headers).
    headers = httpx.Headers(caught.value.litellm_response_headers)
    assert headers["retry-after"] == "7"


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_litellm_sees_a_cut_stream_as_an_error(
    litellm: ModuleType, server: tuple[str, Path], wire: str
) -> None:
    url = server[0]
    kwargs = _anthropic_kwargs(url) if wire == "anthropic" else _openai_kwargs(url)
    messages = _messages({"text": "a b c d", "cut_after_tokens": 2})
    stream = await litellm.acompletion(**kwargs, messages=messages, stream=True, max_retries=0)
    received: list[str] = []
    with pytest.raises((litellm.APIConnectionError, litellm.ServiceUnavailableError)):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "a b"


async def test_concurrent_requests_do_not_block_each_other(client: httpx.AsyncClient) -> None:
    slow = client.post("/v1/chat/completions", json=chat(directive({"ttft_ms": 300})))
    fast = client.post("/v1/chat/completions", json=chat(directive({"text": "quick"})))
    done, _ = await asyncio.wait(
        [asyncio.ensure_future(slow), asyncio.ensure_future(fast)],
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert next(iter(done)).result().json()["choices"][0]["message"]["content"] == "quick"
