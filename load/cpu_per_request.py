"""The gateway's CPU per small-route request, telemetry off and on, against a baseline tree.

    python -m load.cpu_per_request [--baseline DIR] [--requests 800] [--concurrency 4]

Starts the scripted upstream (instant answers) and, for this tree and optionally another one
(`--baseline`, e.g. an older commit exported with `git archive`), a gateway with metrics off
(`SMALLFIRST_METRICS=false`) and one with metrics on. Sends the same unique-prompt requests
(policy `auto`, no cache hits) through each, interleaved in rounds so machine noise hits all
alike, and prints latency and each gateway process's CPU ms per request (user + system, all
threads) with the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import yaml

from load.harness import ROOT, free_port, percentiles, start, timed
from load.telemetry_overhead import cpu_seconds


async def compare(gateways: dict[str, str], pids: dict[str, int], requests: int,
                  concurrency: int) -> dict[str, tuple[list[float], float]]:
    tag, counter = uuid.uuid4().hex[:8], itertools.count()
    rounds, per_round = 8, max(1, requests // 8)
    latency: dict[str, list[float]] = {name: [] for name in gateways}
    cpu = dict.fromkeys(gateways, 0.0)
    async with httpx.AsyncClient(timeout=30) as client:
        def sender(url: str):
            async def send() -> None:
                body = {"model": "auto", "max_tokens": 16, "messages": [
                    {"role": "user", "content": f"{tag} {next(counter)}: how far is the moon?"}]}
                (await client.post(url, json=body)).raise_for_status()
            return send

        senders = {name: sender(f"{base}/v1/chat/completions") for name, base in gateways.items()}
        for send in senders.values():
            await timed(40, concurrency, send)  # warm up
        for i in range(rounds):
            order = list(senders.items())
            for name, send in order if i % 2 == 0 else order[::-1]:
                before = cpu_seconds(pids[name]) or 0.0
                latency[name] += await timed(per_round, concurrency, send)
                cpu[name] += (cpu_seconds(pids[name]) or 0.0) - before
    return {name: (latency[name], 1000 * cpu[name] / len(latency[name])) for name in gateways}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with")
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    procs = [start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                   f"{upstream}/health")]
    gateways: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for tree_name, tree in trees.items():
                for telemetry in ("off", "on"):
                    name, port = f"{tree_name}, telemetry {telemetry}", free_port()
                    config = Path(tmp) / f"{tree_name}-{telemetry}.yaml"
                    config.write_text(yaml.safe_dump({
                        "small_model": "hosted_vllm/small-stand-in",
                        "small_api_base": f"{upstream}/v1", "policies": str(tree / "policies"),
                        "auth": "off", "port": port, "watch_policies": False}))
                    gateways[name] = f"http://127.0.0.1:{port}"
                    procs.append(start(
                        [sys.executable, "-m", "tooling.cli", "serve", "--config", str(config)],
                        f"{gateways[name]}/healthz",
                        env={"SMALLFIRST_METRICS": str(telemetry == "on").lower()}, cwd=tree))
                    pids[name] = procs[-1].pid
            results = asyncio.run(compare(gateways, pids, args.requests, args.concurrency))
    finally:
        for proc in procs:
            proc.terminate()
    print(f"small route, unique prompts, concurrency {args.concurrency}, ms")
    print(f"{'':28}{'p50':>8}{'p99':>8}{'CPU/req':>9}")
    for name, (samples, cpu_ms) in results.items():
        stats = percentiles(samples)
        print(f"{name:28}{stats['p50']:8.2f}{stats['p99']:8.2f}{cpu_ms:9.2f}")
    if args.baseline:
        for telemetry in ("off", "on"):
            this = results[f"this, telemetry {telemetry}"][1]
            base = results[f"baseline, telemetry {telemetry}"][1]
            print(f"CPU per request, telemetry {telemetry}: baseline {base:.2f} ms, this "
                  f"{this:.2f} ms ({base / max(this, 1e-9):.2f}x less)")


if __name__ == "__main__":
    main()
