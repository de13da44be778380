"""Soak: mixed traffic against a gateway process for minutes, watching it for leaks.

Cache hits, small answers, escalations, streams, tool calls and clients that leave mid-stream,
at a steady rate. Every `--every-s` seconds the traffic pauses until nothing is in flight and
the connection pools have let their idle connections expire, and the gateway is sampled:
resident memory and open descriptors (from /proc), asyncio tasks (its
`smallfirst_asyncio_tasks` gauge) and the Redis server's client connections. The curve is
printed with the growth after warm-up (the first `--warmup-samples` samples):

    python -m load.soak                                   # 15 minutes, a sample a minute
    python -m load.soak --duration-s 300 --every-s 30     # a shorter run

It starts what it measures: the scripted upstream (playing both models, so the figures are
the gateway's own), Valkey with the search module, and `smallfirst serve`. `--check` exits 1
when descriptors or tasks grew after warm-up. The test suite runs a short version (`run`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from load.harness import ROOT, free_port, start
from load.procstat import open_fds, rss_bytes

KINDS = ("cache_hit", "small", "escalated", "streamed", "tool_call", "client_leaves")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
KEEPALIVE_EXPIRY_S = 5  # httpx's default, for the small model's and litellm's pools
TOLERANCE = 5  # descriptors or tasks a quiet gateway may hold more at one sample than another


def _script(**fields: object) -> str:
    return f" <<script {json.dumps(fields)}>>"


def request_for(kind: str, n: int) -> tuple[dict, bool]:
    """The body of the n-th request of a kind, and whether the client leaves early."""
    text = f"soak {kind} {n}: what is {n} + 1?"
    body: dict = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    if kind == "cache_hit":
        body["messages"][0]["content"] = f"soak repeat {n % 5}: what is the capital of France?"
    elif kind == "escalated":  # unsure small answer: escalated for low confidence
        body["messages"][0]["content"] += _script(logprob=-2.0)
    elif kind == "streamed":
        body["stream"] = True
    elif kind == "tool_call":
        body.update(tools=TOOLS, tool_choice={"type": "function",
                                              "function": {"name": "get_weather"}})
    elif kind == "client_leaves":  # a stream of about 2 s, its reader gone after the first bytes
        body["stream"] = True
        body["messages"][0]["content"] += _script(tokens_per_s=20, output_tokens=40)
    return body, kind == "client_leaves"


async def send(client: httpx.AsyncClient, url: str, kind: str, n: int) -> str:
    """One request; what the client saw: its status, or `left`."""
    body, leaves = request_for(kind, n)
    try:
        async with client.stream("POST", url, json=body) as response:
            if leaves and response.status_code == 200:
                async for _ in response.aiter_bytes():
                    break
                return "left"
            await response.aread()
            return str(response.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def traffic(base: str, duration_s: float, rate: float, outcomes: Counter[str],
                  start_at: int = 0) -> int:
    """`rate` requests a second, the kinds in turn, for `duration_s`; returns how many."""
    url = f"{base}/v1/chat/completions"
    tasks: set[asyncio.Task] = set()
    async with httpx.AsyncClient(timeout=60) as client:
        began, n = time.monotonic(), 0
        while time.monotonic() - began < duration_s:
            kind = KINDS[(start_at + n) % len(KINDS)]
            task = asyncio.create_task(send(client, url, kind, start_at + n))
            task.add_done_callback(lambda t: outcomes.update([t.result()]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return n


def gauge(text: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    return sum(values)


async def quiesce(base: str, timeout_s: float = 10.0) -> str:
    """Until nothing is in flight at the gateway; its metrics then."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            text = (await client.get(f"{base}/metrics")).text
            if gauge(text, "smallfirst_requests_in_flight") == 0 or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.1)


async def prune(base: str, outcomes: Counter[str], n: int) -> int:
    """Let the connection pools drop what they keep only while idle: past their keep-alive
    expiry, the next call through each (a small answer, an escalation) closes the expired
    connections. Then a sample counts only what is really held. Returns the requests sent."""
    await asyncio.sleep(KEEPALIVE_EXPIRY_S + 1)
    async with httpx.AsyncClient(timeout=60) as client:
        url = f"{base}/v1/chat/completions"
        for kind in ("small", "escalated"):
            outcomes.update([await send(client, url, kind, n)])
    return 2


def redis_clients(redis_url: str | None) -> int | None:
    if not redis_url:
        return None
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("clients")["connected_clients"]) - 1  # less this one
    finally:
        client.close()


@dataclass
class Soak:
    samples: list[dict] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    def growth(self, warmup: int) -> dict[str, float]:
        """Last sample against the first after warm-up."""
        after = self.samples[warmup:] if len(self.samples) > warmup else self.samples[-1:]
        first, last = after[0], after[-1]
        return {"rss_pct": 100 * (last["rss_mb"] / first["rss_mb"] - 1),
                "fds": last["fds"] - first["fds"], "tasks": last["tasks"] - first["tasks"],
                "redis_clients": (last["redis_clients"] or 0) - (first["redis_clients"] or 0)}

    def leaked(self, warmup: int) -> bool:
        growth = self.growth(warmup)
        return growth["fds"] > TOLERANCE or growth["tasks"] > TOLERANCE


async def run(base: str, pid: int, redis_url: str | None, *, duration_s: float,
              every_s: float, rate: float, echo: bool = False) -> Soak:
    soak = Soak()
    began = time.monotonic()
    while time.monotonic() - began < duration_s:
        soak.sent += await traffic(base, every_s, rate, soak.outcomes, start_at=soak.sent)
        await quiesce(base)
        soak.sent += await prune(base, soak.outcomes, soak.sent)
        metrics = await quiesce(base)
        sample = {"t_s": round(time.monotonic() - began), "rss_mb": rss_bytes(pid) / 2**20,
                  "fds": open_fds(pid), "tasks": int(gauge(metrics, "smallfirst_asyncio_tasks")),
                  "redis_clients": redis_clients(redis_url), "requests": soak.sent}
        soak.samples.append(sample)
        if echo:
            print(_row(sample), flush=True)
    return soak


HEADER = f"{'t_s':>6} {'rss_mb':>8} {'fds':>5} {'tasks':>6} {'redis':>6} {'requests':>9}"


def _row(s: dict) -> str:
    return (f"{s['t_s']:>6} {s['rss_mb']:>8.1f} {s['fds']:>5} {s['tasks']:>6} "
            f"{s['redis_clients'] if s['redis_clients'] is not None else '-':>6} "
            f"{s['requests']:>9}")


def stack(work: Path) -> tuple[str, int, str, list]:
    """Start the upstream, Valkey and a gateway; their handles, for `stop`."""
    from tooling.redis_local import RedisLocal

    upstream_port, port = free_port(), free_port()
    upstream = start([sys.executable, "-m", "load.upstream", "--port", str(upstream_port)],
                     f"http://127.0.0.1:{upstream_port}/health")
    valkey = RedisLocal(port=free_port(), directory=work).start()
    api = f"http://127.0.0.1:{upstream_port}/v1"
    config = {"small_model": "hosted_vllm/small-stand-in", "small_api_base": api,
              "frontier_model": "openai/frontier-stand-in", "frontier_api_base": api,
              "frontier_api_key": "stand-in", "redis_url": valkey.url, "auth": "off",
              "port": port, "policies": str(ROOT / "policies"), "log_level": "warning"}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{port}"
    gateway = start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                     str(work / "config.yaml")], f"{base}/readyz")
    return base, gateway.pid, valkey.url, [gateway, upstream, valkey]


def stop(handles: list) -> None:
    for handle in handles:
        handle.terminate() if hasattr(handle, "terminate") else handle.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=900)
    parser.add_argument("--every-s", type=float, default=60)
    parser.add_argument("--rate", type=float, default=10, help="requests per second")
    parser.add_argument("--warmup-samples", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="exit 1 on descriptor/task growth")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        base, pid, redis_url, handles = stack(Path(work))
        try:
            print(HEADER, flush=True)
            soak = asyncio.run(run(base, pid, redis_url, duration_s=args.duration_s,
                                   every_s=args.every_s, rate=args.rate, echo=True))
        finally:
            stop(handles)
    growth = soak.growth(args.warmup_samples)
    print(f"requests {soak.sent}: {dict(soak.outcomes)}")
    print(f"growth after {args.warmup_samples} warm-up samples: RSS {growth['rss_pct']:+.1f}%, "
          f"descriptors {growth['fds']:+d}, asyncio tasks {growth['tasks']:+d}, "
          f"Redis connections {growth['redis_clients']:+d}")
    return 1 if args.check and soak.leaked(args.warmup_samples) else 0


if __name__ == "__main__":
    raise SystemExit(main())
