"""Property-based fuzzing of a real gateway process (both models played by the scripted
upstream): every endpoint of its own OpenAPI document (schemathesis), and chat request bodies
built by hypothesis. Whatever arrives, the answer is never a 5xx, every error is in OpenAI's
shape, and every 200 is a well-formed completion or stream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import GatewayRunner, upstream_config

KEY = "sk-fuzz-tenant"
AUTH = {"authorization": f"Bearer {KEY}"}
POLICY_NAMES = ["auto", "chat", "fast", "quality", "small-stand-in", "frontier-stand-in"]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Any:
    runner = GatewayRunner(tmp_path_factory.mktemp("fuzz"))
    keys = runner.workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"fuzz": {"keys": [KEY], "admin": True}}}))
    base = runner.start(upstream_config(upstream, auth="on", api_keys_file=str(keys),
                                        max_body_bytes=256 * 1024))
    yield base
    runner.stop_all()
    log = runner.last_process.log.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(fuzzed: str) -> Any:
    with httpx.Client(base_url=fuzzed, headers=AUTH, timeout=30) as session:
        yield session


def assert_openai_error(response: httpx.Response | Any, sent: Any = None) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500], sent)
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert "Traceback" not in error["message"]


def assert_answer(response: httpx.Response, stream: bool) -> None:
    """A 200 is a complete chat completion, or a stream of JSON events ending in [DONE]."""
    if not stream:
        body = response.json()
        assert body["object"] in {"chat.completion", "text_completion"}, body
        assert len(body["choices"]) == 1
        return
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", response.text[-500:]
    for event in events[:-1]:
        assert "choices" in json.loads(event) or "usage" in json.loads(event), event


# ---- schemathesis: every operation of /openapi.json ------------------------------------------


def test_openapi_document_describes_bodies_and_errors(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest")
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_every_endpoint_survives_schema_fuzzing(fuzzed: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    if mode is GenerationMode.NEGATIVE:  # only a body can be invalid: no operation has params
        operations = [op for op in operations if op.body]
        assert len(operations) == 2

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def survives(case: Any) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                # Half the bodies name a served policy: they reach the cascade, not the 404.
                if len(case.body["model"]) % 2:
                    case.body["model"] = "auto"
                case.body["stream"] = False  # streams are read to their end below
            response = case.call(base_url=fuzzed, headers=AUTH, timeout=30)
            assert_openai_error(response, (case.operation.label, case.body))

        survives()


# ---- hypothesis: chat request bodies ---------------------------------------------------------

texts = st.text(max_size=200)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False), texts)  # JSON has no NaN
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


content = st.one_of(texts, st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": texts}), min_size=1, max_size=3))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": content},
    optional={"name": texts, "api_base": texts})
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
     "parameters": st.just({"type": "object", "properties": {}})})})
REQUIRED = {
    "model": st.sampled_from(POLICY_NAMES),
    "messages": st.lists(message, min_size=1, max_size=4),
}
OPTIONAL = {
    "stream": st.booleans(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "n": st.just(1),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "user": texts,
    "tools": st.lists(tool, max_size=3),
    "tool_choice": st.sampled_from(["auto", "none", "required"]),
    "response_format": st.just({"type": "json_object"}),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.from_regex(r"[0-9]{1,5}", fullmatch=True),
                                  st.floats(-100, 100), max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "api_base": st.just("http://127.0.0.1:9/v1"),  # unknown fields: tolerated, never used
    "extra_headers": st.dictionaries(texts, texts, max_size=2),
}


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat request, or (half the time) one with a field replaced by any JSON value."""
    body = draw(st.fixed_dictionaries(REQUIRED, optional=OPTIONAL))
    if draw(st.booleans()):
        body[draw(st.sampled_from([*REQUIRED, *OPTIONAL]))] = draw(json_values)
    return body


@given(body=chat_bodies())
@FUZZ
def test_chat_bodies_never_break_the_gateway(client: httpx.Client, body: dict) -> None:
    response = client.post("/v1/chat/completions", json=body,
                           headers={"cache-control": "no-store"})
    assert_openai_error(response, body)
    if response.status_code == 200:
        assert_answer(response, stream=body.get("stream") is True)


@given(raw=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
@FUZZ
def test_arbitrary_bytes_get_an_openai_error(client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, raw, response.text)
        assert_openai_error(response, raw)


def test_the_fuzzed_gateway_still_answers(client: httpx.Client) -> None:
    """After the fuzzing, a plain request is served normally (nothing was left broken)."""
    response = client.post("/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": "still there?"}]})
    assert response.status_code == 200, response.text
    assert response.headers["x-smallfirst-route"] in {"small", "escalated", "cache_exact"}
