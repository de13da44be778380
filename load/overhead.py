"""Gateway overhead over direct upstream calls, measured side by side in one run.

    python -m load.overhead [--requests 400] [--concurrency 4] [--stream]

Starts the scripted upstream (instant answers, so only overhead is left) and a gateway whose
small model is that upstream, then sends the same requests straight to the upstream and
through the gateway (policy `auto`: route small, confidence scored), interleaving the two in
rounds so machine noise hits both alike. Also times litellm's own per-call cost against a
plain httpx POST to the same upstream, the hop litellm sits on. Prints p50/p90/p99 in ms and
the gateway-minus-direct difference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

from load.harness import ROOT, free_port, percentiles, poster, start, timed

BODY = {"model": "auto", "max_tokens": 16,
        "messages": [{"role": "user", "content": "How far is the moon?"}]}


async def compare(upstream: str, gateway: str, args: argparse.Namespace) -> None:
    rounds, per_round = 8, max(1, args.requests // 8)
    direct_body = {**BODY, "model": "small-stand-in", "logprobs": True}
    results: dict[str, list[float]] = {"direct": [], "gateway": [], "httpx": [], "litellm": []}
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    async def via_litellm() -> None:
        await litellm.acompletion(model="hosted_vllm/small-stand-in", api_base=f"{upstream}/v1",
                                  api_key="none", messages=BODY["messages"], max_tokens=16,
                                  logprobs=True, max_retries=0)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        senders = {
            "direct": poster(client, f"{upstream}/v1/chat/completions", direct_body, args.stream),
            "gateway": poster(client, f"{gateway}/v1/chat/completions", BODY, args.stream),
            "httpx": poster(client, f"{upstream}/v1/chat/completions", direct_body, False),
            "litellm": via_litellm,
        }
        for send in senders.values():  # warm up connections and lazy imports
            await timed(20, args.concurrency, send)
        for _ in range(rounds):
            for name, send in senders.items():
                results[name] += await timed(per_round, args.concurrency, send)
    report(results, args)


def report(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    stats = {name: percentiles(samples) for name, samples in results.items()}
    mode = "streamed" if args.stream else "non-streamed"
    print(f"{mode} chat, concurrency {args.concurrency}, ms per request")
    print(f"{'':28}{'p50':>8}{'p90':>8}{'p99':>8}")
    labels = {"direct": "upstream direct", "gateway": "through gateway (small route)",
              "httpx": "httpx POST to upstream", "litellm": "litellm.acompletion, same call"}
    for name, label in labels.items():
        s = stats[name]
        print(f"{label[:28]:28}{s['p50']:8.2f}{s['p90']:8.2f}{s['p99']:8.2f}")
    for a, b, what in (("gateway", "direct", "gateway overhead"),
                       ("litellm", "httpx", "litellm per-call cost")):
        diff = {q: stats[a][q] - stats[b][q] for q in ("p50", "p99")}
        ratio = stats[a]["p50"] / stats[b]["p50"]
        print(f"{what}: p50 +{diff['p50']:.2f} ms, p99 +{diff['p99']:.2f} ms "
              f"(p50 ratio {ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    up_port, gw_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    procs = [start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                    f"{upstream}/health")]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
            "policies": str(ROOT / "policies"), "auth": "off", "port": gw_port,
            "watch_policies": False,
        }))
        gateway = f"http://127.0.0.1:{gw_port}"
        procs.append(start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                             str(config)], f"{gateway}/healthz"))
        try:
            asyncio.run(compare(upstream, gateway, args))
        finally:
            for proc in procs:
                proc.terminate()


if __name__ == "__main__":
    main()
