"""Integration with the real small model: vLLM (CPU build) serving SmolLM2-135M-Instruct."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest

from gateway.backends import LiteLLMBackend, OpenAIWireBackend
from gateway.config import BackendConfig, RetryConfig
from gateway.engine import CascadeEngine
from gateway.policy import Policy
from gateway.types import Route
from tests.conftest import GatewayRunner
from tests.test_engine import RecordingConfidence, call

pytestmark = pytest.mark.vllm

SMALL = "smollm2-135m-instruct"
# Generous budgets: CPU inference on a shared two-core machine is slow and noisy.
POLICIES = {
    "local.yaml": """
name: local
route: small_only
streaming: {mode: holdback, holdback_tokens: 4}
latency_budget: {small_ttft: 20000, small_generation: 60000}
""",
    "judged.yaml": """
name: judged
route: cascade
confidence: {scorer: logprob, threshold: 0.0}
streaming: {mode: holdback, holdback_tokens: 4}
latency_budget: {small_ttft: 20000, small_generation: 60000, escalation: 10000}
""",
}


@pytest.fixture(scope="module")
def vllm_gateway(
    vllm_api_base: str, upstream: str, session_gateways: GatewayRunner, tmp_path_factory
) -> openai.OpenAI:
    policies = tmp_path_factory.mktemp("vllm-policies")
    for name, text in POLICIES.items():
        (policies / name).write_text(text)
    base = session_gateways.start(
        {
            "small_model": f"hosted_vllm/{SMALL}",
            "small_api_base": vllm_api_base,
            "frontier_model": "openai/frontier-stand-in",
            "frontier_api_base": f"{upstream}/v1",
            "frontier_api_key": "k",
            "default_policy": "local",
        },
        policies=Path(policies),
    )
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_vllm_answers_with_token_logprobs(vllm_api_base: str) -> None:
    backend = LiteLLMBackend(
        BackendConfig(model=f"hosted_vllm/{SMALL}", api_base=vllm_api_base),
        drop_unsupported=False,
    )
    response = await backend.complete(
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}],
         "temperature": 0, "max_tokens": 30, "logprobs": True, "top_logprobs": 2},
        timeout=120,
    )
    choice = response["choices"][0]
    assert "Paris" in choice["message"]["content"]
    entries = choice["logprobs"]["content"]
    assert entries and all(e["logprob"] <= 0 for e in entries)
    assert len(entries[0]["top_logprobs"]) == 2


def test_small_route_end_to_end(vllm_gateway: openai.OpenAI) -> None:
    raw = vllm_gateway.chat.completions.with_raw_response.create(
        model="local",
        messages=[{"role": "system", "content": "You are concise."},
                  {"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=30,
    )
    completion = raw.parse()
    assert raw.headers["x-smallfirst-route"] == "small"
    assert completion.model == SMALL
    assert "Paris" in completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


def test_logprobs_reach_the_confidence_scorer(vllm_gateway: openai.OpenAI) -> None:
    raw = vllm_gateway.chat.completions.with_raw_response.create(
        model="judged",
        messages=[{"role": "user", "content": "Name a primary colour."}],
        temperature=0, max_tokens=20, logprobs=True,
    )
    completion = raw.parse()
    assert raw.headers["x-smallfirst-route"] == "small"
    logprobs = [t.logprob for t in completion.choices[0].logprobs.content]
    expected = math.exp(sum(logprobs) / len(logprobs))
    scores = dict(part.split("=") for part in raw.headers["x-smallfirst-scores"].split(", "))
    assert float(scores["confidence"]) == pytest.approx(expected, abs=1e-3)


def test_streamed_small_answer_with_usage(vllm_gateway: openai.OpenAI) -> None:
    stream = vllm_gateway.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert {c.model for c in chunks} == {SMALL}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 4


def test_legacy_completion_through_vllm(vllm_gateway: openai.OpenAI) -> None:
    completion = vllm_gateway.completions.create(
        model="local", prompt="Count from one to five.", max_tokens=20, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.model == SMALL
    assert completion.choices[0].text.strip()
    assert completion.usage.completion_tokens > 0


async def test_vllm_draws_self_consistency_samples(vllm_api_base: str) -> None:
    """The engine's extra samples (one request with n) come back from the real server."""
    engine = CascadeEngine(
        OpenAIWireBackend(BackendConfig(model=f"hosted_vllm/{SMALL}", api_base=vllm_api_base)),
        [], RetryConfig())
    engine.confidence["logprob"] = recorder = RecordingConfidence()
    policy = Policy.model_validate({
        "name": "sc", "confidence": {"samples": 3},
        "latency_budget": {"small_ttft": 20000, "small_generation": 60000}})
    response, decision = await engine.complete(call("Name a colour.", policy, max_tokens=6))
    assert decision.route == Route.SMALL
    samples = recorder.answers[-1].samples
    assert samples is not None and len(samples) == 3 and all(samples)
    assert response["usage"]["completion_tokens"] > len(recorder.answers[-1].token_logprobs)
