"""What the benchmarks share: starting the processes they measure, and the statistics."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tooling.smallmodel import free_port  # noqa: F401 (the benchmarks' one import of it)

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], ready_url: str, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> subprocess.Popen:
    """Start a process (with a clean OTEL_/SMALLFIRST_ environment) in `cwd` and wait until
    `ready_url` answers 200."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OTEL_", "SMALLFIRST_"))}
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**clean, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})})
    for _ in range(600):
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{args} did not start")


def percentiles(samples: list[float]) -> dict[str, float]:
    if len(samples) < 2:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "n": len(samples)}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "n": len(samples)}


async def timed(n: int, concurrency: int, send: Callable[[], Awaitable[None]]) -> list[float]:
    """Milliseconds per call of `send`, `n` calls, at most `concurrency` at once."""
    samples: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            begin = time.perf_counter()
            await send()
            samples.append((time.perf_counter() - begin) * 1000)

    await asyncio.gather(*(one() for _ in range(n)))
    return samples


def poster(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> Callable:
    """A `send` that posts `body` (streamed: reads the whole event stream)."""
    async def send() -> None:
        if stream:
            async with client.stream("POST", url, json={**body, "stream": True}) as response:
                async for _ in response.aiter_bytes():
                    pass
                response.raise_for_status()
        else:
            (await client.post(url, json=body)).raise_for_status()

    return send
