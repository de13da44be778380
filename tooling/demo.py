"""`smallfirst demo`: the real small model behind the gateway, shown answering.

Starts vLLM (CPU build) serving SmolLM2-135M-Instruct, the scripted upstream as a clearly
labelled stand-in for a frontier model (no paid API or key is needed), and the gateway with
its embedded defaults (in-process, open auth on loopback). Then it sends a few requests and
prints what came back, route and timings included.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.config import Settings
from tooling import smallmodel

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SYSTEM = "You are a concise, helpful assistant."
QUESTIONS = [
    ("auto", "What is the capital of France?"),
    ("auto", "Prove that there are infinitely many primes of the form 4k+3."),
]


def run_demo(port: int, keep_running: bool) -> int:
    print("== smallfirst demo: setting up the small model (the first run installs vLLM's CPU "
          "build and converts SmolLM2; a few minutes; later runs reuse the cache)", flush=True)
    smallmodel.exit_on_sigterm()  # a stopped demo stops its servers too
    python = smallmodel.ensure_vllm()
    model_dir = smallmodel.ensure_model()
    vllm = smallmodel.VLLMServer(model_dir, port=smallmodel.free_port(), python=python)
    frontier_port = smallmodel.free_port()
    stand_in = subprocess.Popen(
        [sys.executable, "-m", "load.upstream", "--port", str(frontier_port),
         "--model-name", "frontier-stand-in"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with vllm:
            print("== starting vLLM ...", flush=True)
            started = time.monotonic()
            vllm.wait_ready(timeout=300)
            print(f"== vLLM ready in {time.monotonic() - started:.0f} s at {vllm.api_base}")
            settings = Settings(
                small_api_base=vllm.api_base,
                frontier_model="openai/frontier-stand-in",
                frontier_api_base=f"http://127.0.0.1:{frontier_port}/v1",
                frontier_api_key="stand-in",  # type: ignore[arg-type]
                policies=POLICIES if POLICIES.is_dir() else Path("policies"),
                auth="off",
                port=port,
            )
            asyncio.run(_serve_and_show(settings, keep_running))
    finally:
        stand_in.terminate()
    return 0


async def _serve_and_show(settings: Settings, keep_running: bool) -> None:
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
    base = f"http://{settings.host}:{settings.port}/v1"
    print(f"== gateway at {base} (frontier: scripted stand-in, not a real model)\n")
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for policy, question in QUESTIONS:
            await _ask(client, policy, question)
        print("The first question again (an exact repeat: served from the in-process cache):")
        await _ask(client, *QUESTIONS[0])
        await _ask_streamed(client, "chat", "Name three colours.")
        await _ask_streamed(client, "fast", "Complete: The sea is")
    if keep_running:
        print(f"Gateway running at {base}; try:\n  curl {base}/chat/completions "
              "-H 'content-type: application/json' -d '{\"model\": \"auto\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"Hello!\"}]}'\nCtrl-C to stop.", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        server.should_exit = True
        await task


def _show_headers(response: httpx.Response) -> None:
    h = response.headers
    print(f"   route={h.get('x-smallfirst-route')} policy={h.get('x-smallfirst-policy')} "
          f"scores=[{h.get('x-smallfirst-scores')}] escalation={h.get('x-smallfirst-escalation')}")
    print(f"   server-timing: {h.get('server-timing')}")


async def _ask(client: httpx.AsyncClient, policy: str, question: str) -> None:
    body = {"model": policy, "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}]}
    response = await client.post("/chat/completions", json=body)
    print(f"Q ({policy}): {question}")
    if response.status_code != 200:
        print(f"   error {response.status_code}: {response.text}\n")
        return
    data = response.json()
    answer = (data["choices"][0]["message"]["content"] or "").strip().replace("\n", " ")
    print(f"A [{data['model']}]: {answer[:300]}")
    _show_headers(response)
    print(f"   usage: {data['usage']}\n")


async def _ask_streamed(client: httpx.AsyncClient, policy: str, question: str) -> None:
    import json

    body = {"model": policy, "max_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}]}
    print(f"Q ({policy}, streamed): {question}\nA: ", end="", flush=True)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                print(choice["delta"].get("content") or "", end="", flush=True)
            if chunk.get("usage"):
                print(f"\n   usage: {chunk['usage']}")
        _show_headers(response)
    print()
