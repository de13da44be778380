"""`smallfirst demo`: the real small model behind the gateway, shown answering.

Starts vLLM (CPU build) serving SmolLM2-135M-Instruct, the scripted upstream as a clearly
labelled stand-in for a frontier model (no paid API or key is needed; every answer it gives
says so), a local Redis with the query engine for the cache (tooling/redis_local.py, from the
dev dependencies) and the gateway in-process (open auth on loopback). Then it walks through
the routes a request can take, each line saying which route served it and how long it took:
an easy question the small model keeps, a hard one it escalates, one the learned difficulty
scorer sends straight to the frontier, an exact repeat and a paraphrase served from the cache,
a streamed answer, a tool call and its result, and finally the latency budget table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config import Settings
from gateway.deadlines import MIN_SAMPLES
from tooling import smallmodel
from tooling.redis_local import RedisLocal, RedisLocalError
from tooling.stand_in import fixed_threshold_policies

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SYSTEM = "You are a concise, helpful assistant."
SMALL = smallmodel.MODEL_NAME  # the small model's name at the gateway
SAMPLING = {"temperature": 0, "max_tokens": 60}  # greedy and short: a 135M model rambles
STAND_IN_NOTE = "[stand-in frontier, not a real model] "

# SmolLM2 answers this in 8 tokens at a geometric-mean token probability of 0.91 (the
# default policy accepts from 0.5).
EASY = "What is the capital of Japan?"
# The same question typed another way: the shipped pair verifier accepts it (0.997 against its
# 0.995 threshold at the default 1% false-hit target). It refuses most rewordings at that
# target ("What is Japan's capital?" scores 0.992): a wrong answer costs more than a miss.
PARAPHRASE = "what is the capital of japan"
# SmolLM2 rambles here at 0.40, below the default policy's 0.5: escalated as low_confidence.
HARD = "Summarise the plot of Dostoevsky's The Idiot in two sentences."
# The shipped router bundle scores this 0.31 (P(the small model's answer is good enough));
# the easy question scores 0.86 and the hard one 0.68, so a skip threshold of 0.4 sends this
# one, and questions like it, straight to the frontier.
FRONTIER_BOUND = "In quantum field theory, compute the one-loop beta function of QED."
SKIP_THRESHOLD = 0.4
# The first 12 tokens of SmolLM2's answer (what the chat policy holds back and judges) score
# 0.93 (bar: 0.55); the rest streams on to max_tokens.
STREAMED = "What is the derivative of x^3 * sin(x)?"
TOOL_QUESTION = "What is the weather in Paris right now?"
# strict, with no other properties: vLLM then constrains the arguments to the schema, which a
# 135M model needs (it copies the schema itself into the arguments otherwise).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER = {"city": "Paris", "temperature_c": 18, "conditions": "light rain"}

# Cache lookups past this are misses. The policy default (10 ms) fits an idle machine; a
# semantic lookup embeds the new question first, which a loaded 2-core machine can stretch.
LOOKUP_DEADLINE_MS = 300  # two busy cores took a semantic lookup to 100+ ms
# The learned difficulty scorer waits this long for the prompt embedding (default 10 ms);
# past it the scorer has no opinion and the small model is tried.
EMBEDDING_MS = 1000
# The gateway adapts the small model's deadlines once it has seen this many first tokens.
FIT_REQUESTS = MIN_SAMPLES
ROUTED_POLICY = {
    "name": "routed",
    "description": "Demo: the learned difficulty scorer sends questions the small model "
                   "would likely get wrong straight to the frontier.",
    "route": "cascade",
    "difficulty": {"scorer": "learned", "bundle": "default", "skip_threshold": SKIP_THRESHOLD},
    "confidence": {"scorer": "logprob", "threshold": 0.5, "min_token_logprob": -9.0},
    "streaming": {"mode": "buffer"},
    "latency_budget": {"embedding": EMBEDDING_MS},
}


def run_demo(port: int, keep_running: bool) -> int:
    began = time.monotonic()
    print("== smallfirst demo: setting up the small model (the first run installs vLLM's CPU "
          "build and converts SmolLM2; a few minutes; later runs reuse the cache)", flush=True)
    smallmodel.exit_on_sigterm()  # a stopped demo stops its servers too
    python = smallmodel.ensure_vllm()
    model_dir = smallmodel.ensure_model()
    vllm = smallmodel.VLLMServer(model_dir, port=smallmodel.free_port(), python=python)
    frontier_port = smallmodel.free_port()
    stand_in = subprocess.Popen(
        [sys.executable, "-m", "load.upstream", "--port", str(frontier_port),
         "--model-name", "frontier-stand-in", "--stand-in-note", STAND_IN_NOTE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    redis = RedisLocal(port=smallmodel.free_port())
    workdir = Path(tempfile.mkdtemp(prefix="smallfirst-demo-"))
    try:
        redis_url = _start_redis(redis)
        with vllm:
            print("== starting vLLM ...", flush=True)
            started = time.monotonic()
            vllm.wait_ready(timeout=300)
            print(f"== vLLM ready in {time.monotonic() - started:.0f} s at {vllm.api_base}",
                  flush=True)
            settings = Settings(
                small_api_base=vllm.api_base,
                frontier_model="openai/frontier-stand-in",
                frontier_api_base=f"http://127.0.0.1:{frontier_port}/v1",
                frontier_api_key="stand-in",  # type: ignore[arg-type]
                policies=_demo_policies(workdir / "policies", cached=redis_url is not None),
                redis_url=redis_url,
                cache_prefix="smallfirst-demo",
                watch_policies=False,
                auth="off",
                port=port,
            )
            asyncio.run(_serve_and_show(settings, keep_running, began,
                                        tools=bool(getattr(vllm, "tool_call_parser", None))))
    finally:
        stand_in.terminate()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _start_redis(redis: RedisLocal) -> str | None:
    """Redis for the exact and semantic cache, or None (in-process exact cache only)."""
    try:
        redis.start()
    except RedisLocalError as exc:
        print(f"== no local Redis ({exc}): the semantic cache step is skipped; exact repeats "
              "use the in-process cache", flush=True)
        return None
    print(f"== Redis (Valkey + search module) at {redis.url} for the exact and semantic cache",
          flush=True)
    return redis.url


def _demo_policies(target: Path, cached: bool) -> Path:
    """A copy of the shipped policies plus `routed`; the shipped files stay as they are. The
    frontier is a stand-in whose answers cannot label the small model's, so `auto` and `chat`
    judge by fixed thresholds rather than hold their quality target."""
    fixed_threshold_policies(target, POLICIES if POLICIES.is_dir() else Path("policies"))
    if cached:
        default = target / "default.yaml"
        auto = yaml.safe_load(default.read_text())
        auto.setdefault("cache", {})["lookup_deadline_ms"] = LOOKUP_DEADLINE_MS
        default.write_text(yaml.safe_dump(auto, sort_keys=False))
    (target / "routed.yaml").write_text(yaml.safe_dump(ROUTED_POLICY, sort_keys=False))
    return target


async def _serve_and_show(settings: Settings, keep_running: bool, began: float,
                          tools: bool) -> None:
    import uvicorn

    from gateway.api.app import create_app
    from gateway.service import Gateway

    app = create_app(Gateway.from_settings(settings))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.05)
    root = f"http://{settings.host}:{settings.port}"
    base = root + "/v1"
    async with httpx.AsyncClient(base_url=base, timeout=180) as client:
        await _wait_ready(client, root, began)
        await _fit_deadlines(client)
        print(f"== gateway at {base} (frontier: a scripted stand-in, not a real model; its "
              "answers say so). Its answers cannot label the small model's, so policies auto "
              "and chat keep answers above a fixed confidence here; with a real frontier they "
              "hold a 95% quality target learned from labels\n", flush=True)
        await _tour(client, root, cached=settings.redis_url is not None, tools=tools)
    if keep_running:
        print(f"Gateway running at {base}; try:\n  curl {base}/chat/completions "
              "-H 'content-type: application/json' -d '{\"model\": \"auto\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"Hello!\"}]}'\nCtrl-C to stop.", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        server.should_exit = True
        await task


async def _wait_ready(client: httpx.AsyncClient, root: str, began: float,
                      timeout: float = 180) -> None:
    """Until /readyz says ready: the small model answers and the gateway's models are warm."""
    started = time.monotonic()
    checks: Any = None
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await client.get(root + "/readyz", timeout=10)
            checks = response.json().get("checks")
            if response.status_code == 200:
                print(f"== gateway ready (warmed up) in {time.monotonic() - started:.1f} s; "
                      f"{time.monotonic() - began:.0f} s from start to ready", flush=True)
                return
        await asyncio.sleep(0.2)
    print(f"== gateway not ready after {timeout:.0f} s ({checks}); asking anyway", flush=True)


async def _fit_deadlines(client: httpx.AsyncClient, count: int = FIT_REQUESTS) -> None:
    """The gateway fits the small model's deadlines to the p95 of its recent first tokens once
    it has seen a few; these one-token requests give it those, as traffic would."""
    times = []
    for i in range(count):
        body = {"model": "fast", "max_tokens": 1, "temperature": 0,
                "messages": _messages(f"Count to {i + 1}.")}
        started = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            await client.post("/chat/completions", json=body,
                              headers={"cache-control": "no-cache, no-store"})
        times.append((time.monotonic() - started) * 1000)
    times.sort()
    print(f"== fitting the small model's deadlines to this machine: {count} one-token requests "
          f"(policy fast), first token p50 {times[len(times) // 2]:.0f} ms, max "
          f"{times[-1]:.0f} ms; the cascade's deadlines stretch to 1.5x the recent p95 when "
          "the policy's are tighter", flush=True)


async def _tour(client: httpx.AsyncClient, root: str, cached: bool, tools: bool) -> None:
    print("1. An easy question: the small model answers it")
    await _ask(client, "auto", EASY)
    print("2. A hard question: the small model tries, the gateway judges its answer and "
          "escalates (reason in x-smallfirst-escalation)")
    await _ask(client, "auto", HARD)
    print(f"3. Straight to the frontier: policy `routed` (written for this demo) scores the "
          f"question first with the learned difficulty model (bundle default) and skips the "
          f"small model below {SKIP_THRESHOLD}")
    await _ask(client, "routed", FRONTIER_BOUND)
    if cached:
        print(f"4. From the cache (Redis; lookup deadline raised to {LOOKUP_DEADLINE_MS} ms "
              "for a loaded machine, the policy default is 10 ms): the first question again, "
              "then reworded")
        await _ask(client, "auto", EASY)
        await _ask(client, "auto", PARAPHRASE)
    else:
        print("4. From the cache (in-process; no Redis, so no semantic step): the first "
              "question again")
        await _ask(client, "auto", EASY)
    print("5. Streamed (policy chat: the first tokens are held back and judged, then the "
          "rest streams as it is generated)")
    await _ask_streamed(client, "chat", STREAMED)
    print(f"6. A tool call: get_weather(city), named in tool_choice, then the tool's result "
          f"goes back for the final answer. The model is named directly ({SMALL}), so the "
          "small model's own call is shown rather than the stand-in frontier's")
    await _tool_call(client, tools)
    print("7. Where the time went: `smallfirst budget` against this gateway")
    await _budget(client, root)


def _messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _route_line(response: httpx.Response, seconds: float, extra: str = "") -> str:
    h = response.headers
    parts = [f"route={h.get('x-smallfirst-route') or 'none'}", f"{seconds:.2f} s"]
    if extra:
        parts.append(extra)
    for header, label in (("x-smallfirst-escalation", "escalation"),
                          ("x-smallfirst-note", "note")):
        if h.get(header):
            parts.append(f"{label}={h[header]}")
    if h.get("x-smallfirst-scores"):
        parts.append(f"scores: {h['x-smallfirst-scores']}")
    parts.append(f"policy={h.get('x-smallfirst-policy')}")
    return "   -> " + " | ".join(parts) + f"\n      server-timing: {h.get('server-timing')}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"error {response.status_code} {error.get('code') or error.get('type')}: " \
               f"{error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return f"error {response.status_code}: {_one_line(response.text) or '(no body)'}"


def _empty(response: httpx.Response, finish: str | None) -> str:
    note = response.headers.get("x-smallfirst-note")
    return f"(no text; finish_reason={finish}{'; note=' + note if note else ''})"


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post("/chat/completions", json=body)
    return response, time.monotonic() - started


async def _ask(client: httpx.AsyncClient, policy: str, question: str) -> None:
    print(f"   Q ({policy}): {question}", flush=True)
    body = {"model": policy, **SAMPLING, "messages": _messages(question)}
    response, seconds = await _post(client, body)
    if response.status_code != 200:
        print(f"   A: {_error_text(response)}")
        print(_route_line(response, seconds) + "\n", flush=True)
        return
    data = response.json()
    choice = data["choices"][0]
    answer = _one_line(choice["message"].get("content") or "")
    usage = data.get("usage") or {}
    print(f"   A [{data.get('model')}]: {answer or _empty(response, choice.get('finish_reason'))}")
    tokens = f"tokens {usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)}"
    print(_route_line(response, seconds, tokens) + "\n", flush=True)


async def _ask_streamed(client: httpx.AsyncClient, policy: str, question: str) -> None:
    body = {"model": policy, **SAMPLING, "stream": True,
            "stream_options": {"include_usage": True}, "messages": _messages(question)}
    print(f"   Q ({policy}, streamed): {question}\n   A: ", end="", flush=True)
    started = time.monotonic()
    first_byte: float | None = None
    text: list[str] = []
    problem = finish = None
    async with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            problem = _error_text(response)
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first_byte is None:
                    first_byte = time.monotonic() - started
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    problem = f"stream ended with an error: {chunk['error'].get('message')}"
                    break
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    text.append(piece)
                    print(" ".join(piece.split("\n")), end="", flush=True)
        seconds = time.monotonic() - started
    if problem:
        print(("\n   " if "".join(text).strip() else "") + problem)
    elif not "".join(text).strip():
        print(_empty(response, finish))
    else:
        print()
    ttfb = f"first byte {first_byte:.2f} s" if first_byte is not None else "no byte"
    print(_route_line(response, seconds, ttfb) + "\n", flush=True)


async def _tool_call(client: httpx.AsyncClient, tools: bool) -> None:
    if not tools:
        print("   (the small model's vLLM runs without tool calling in this version: it "
              "refuses the request)")
    named = {"type": "function", "function": {"name": "get_weather"}}
    messages = _messages(TOOL_QUESTION)
    print(f"   Q ({SMALL}, tools=[get_weather], tool_choice=get_weather): {TOOL_QUESTION}",
          flush=True)
    body = {"model": SMALL, **SAMPLING, "messages": messages, "tools": [WEATHER_TOOL],
            "tool_choice": named}
    response, seconds = await _post(client, body)
    if response.status_code != 200:
        print(f"   A: {_error_text(response)}")
        print(_route_line(response, seconds) + "\n", flush=True)
        return
    data = response.json()
    message = data["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    if not calls:
        text = _one_line(message.get("content") or "") or _empty(
            response, data["choices"][0].get("finish_reason"))
        print(f"   A [{data.get('model')}]: no tool call came back; the answer was: {text}")
        print(_route_line(response, seconds) + "\n", flush=True)
        return
    call = calls[0]
    function = call["function"]
    arguments = function["arguments"]
    with contextlib.suppress(ValueError, TypeError):
        arguments = json.dumps(json.loads(arguments))  # one line
    print(f"   tool call [{data.get('model')}]: {function['name']}({arguments})")
    print(_route_line(response, seconds), flush=True)
    result = dict(WEATHER)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        result["city"] = json.loads(function["arguments"]).get("city") or result["city"]
    print(f"   tool result: {json.dumps(result)}", flush=True)
    follow_up = [*messages,
                 {"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}]
    body = {"model": SMALL, **SAMPLING, "messages": follow_up, "tools": [WEATHER_TOOL],
            "tool_choice": "none"}
    print(f"   Q ({SMALL}, the conversation with the tool result, tool_choice=none)",
          flush=True)
    response, seconds = await _post(client, body)
    if response.status_code != 200:
        print(f"   A: {_error_text(response)}")
    else:
        data = response.json()
        choice = data["choices"][0]
        answer = _one_line(choice["message"].get("content") or "")
        if not answer and choice["message"].get("tool_calls"):
            again = choice["message"]["tool_calls"][0]["function"]
            answer = f"(another tool call: {again['name']}({again['arguments']}))"
        print(f"   A [{data.get('model')}]: "
              f"{answer or _empty(response, choice.get('finish_reason'))}")
    print(_route_line(response, seconds) + "\n", flush=True)


async def _budget(client: httpx.AsyncClient, root: str) -> None:
    from gateway.telemetry.budget import render

    response = await client.get(root + "/admin/budget")
    if response.status_code != 200:
        print(f"   {_error_text(response)}\n")
        return
    print("\n".join("   " + line for line in render(response.json()).splitlines()) + "\n",
          flush=True)
