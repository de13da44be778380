"""Several gateway replicas behind HAProxy, sharing one Valkey: what scaling out keeps.

Starts the scripted upstream (playing both the small and the frontier model: no vLLM needed),
Valkey with the search module, N `smallfirst serve` processes and Debian's HAProxy in front of
them (health checks on /readyz; a connection a replica refuses is retried on another), then
shows and prints:

- an answer cached through one replica is served by the next one (cross-replica hit rate);
- a per-tenant limit of N requests a minute admits N across all replicas, the rest get 429;
- the decision-log rows of every replica land in one Redis Stream;
- SIGTERM to a replica under load: it drains (its /readyz fails, HAProxy routes away), then
  finishes its requests and streams in flight: client errors at SIGTERM;
- SIGKILL to a replica under load: what was in flight on it is lost, HAProxy routes around
  it: client errors at SIGKILL, and which replica they were on.

    python -m load.replicas [--replicas 3] [--seconds 6] [--concurrency 12] [--limit 30]

`tests/test_replicas.py` runs the same scenarios, smaller, and asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from load.harness import ROOT, free_port
from tooling.stand_in import fixed_threshold_policies

LIMITED_KEY = "sk-replicas-limited"
LOAD_KEY = "sk-replicas-load"
REPLICA_HEADER = "x-replica"  # set by HAProxy: which replica answered
# Every decision logged; a generous cache deadline: the replicas share a few cores with the
# load (the default 10 ms would turn a slow lookup into a miss, which is not what is measured).
POLICY_EXTRA = {"learning": {"log_sample_rate": 1.0, "log_text": True},
                "cache": {"lookup_deadline_ms": 1000}}

HAPROXY_CONFIG = """\
global
    maxconn 2000
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout check 3s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    # A request no replica answered (refused, reset, closed before a byte) goes to another one.
    retry-on conn-failure empty-response

frontend gateway
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 300ms fall 2 rise 1
    http-response set-header {header} %s
{servers}
"""


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)


def keys_file(path: Path, limit: int) -> Path:
    path.write_text(yaml.safe_dump({"tenants": {
        "limited": {"keys": [LIMITED_KEY], "limits": {"requests_per_minute": limit}},
        "load": {"keys": [LOAD_KEY], "admin": True},
    }}))
    return path


def replica_config(upstream: str, redis_url: str, prefix: str, limit: int,
                   workdir: Path) -> dict[str, Any]:
    """Every replica's settings but its port: the upstream plays both models."""
    policies = fixed_threshold_policies(workdir / "policies")
    default = policies / "default.yaml"
    default.write_text(default.read_text() + "\n" + yaml.safe_dump(POLICY_EXTRA))
    return {
        "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
        "frontier_model": "openai/frontier-stand-in", "frontier_api_base": f"{upstream}/v1",
        "frontier_api_key": "stand-in",
        "retry": {"max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "redis_url": redis_url, "cache_prefix": prefix, "cache_semantic": False,
        "decision_stream": f"{prefix}:decisions", "policies": str(policies),
        "api_keys_file": str(keys_file(workdir / "keys.yaml", limit)),
        "shutdown_drain_s": 3.0, "watch_policies": False,
        "redis_timeout_s": 2.0,  # the replicas share a few cores with the load
    }


@dataclass
class Replicas:
    """N gateway processes with one config, and HAProxy in front of them."""

    workdir: Path
    config: dict[str, Any]
    count: int = 3
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    haproxy: subprocess.Popen | None = None
    base: str = ""

    def start(self, timeout: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SMALLFIRST_"))}
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        for i in range(self.count):  # all at once: their start-up overlaps
            port = free_port()
            config = self.workdir / f"replica{i}.yaml"
            config.write_text(yaml.safe_dump({**self.config, "port": port}))
            log = (self.workdir / f"replica{i}.log").open("wb")
            self.ports.append(port)
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "tooling.cli", "serve", "--config", str(config)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for i, port in enumerate(self.ports):
            self._wait_ready(i, f"http://127.0.0.1:{port}/readyz", timeout)
        self._start_haproxy(timeout)

    def _wait_ready(self, i: int, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[i].poll() is not None:
                raise RuntimeError(f"replica {i} exited:\n{self.log(i)[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica {i} not ready after {timeout} s:\n{self.log(i)[-3000:]}")

    def _start_haproxy(self, timeout: float) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        port = free_port()
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(self.ports))
        config = self.workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=port, header=REPLICA_HEADER,
                                                servers=servers))
        log = (self.workdir / "haproxy.log").open("wb")
        self.haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        seen: set[str] = set()  # until round robin has reached every replica
        deadline = time.monotonic() + timeout
        while len(seen) < self.count and time.monotonic() < deadline:
            if self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{(self.workdir / 'haproxy.log').read_text()}")
            try:
                seen.add(httpx.get(self.base + "/healthz", timeout=2).headers[REPLICA_HEADER])
            except (httpx.HTTPError, KeyError):
                time.sleep(0.1)
        if len(seen) < self.count:
            raise RuntimeError(f"haproxy reached only {sorted(seen)}")

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def log(self, i: int) -> str:
        return (self.workdir / f"replica{i}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in [*self.processes, *([self.haproxy] if self.haproxy else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- the scenarios (each returns its figures) ------------------------------------------------


def chat(text: str, *, stream: bool = False, tokens: int = 16, **script: Any) -> dict[str, Any]:
    directive = f" <<script {json.dumps(script)}>>" if script else ""
    return {"model": "auto", "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": text + directive}]}


def headers(key: str = LOAD_KEY, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **extra}


async def cross_replica_hits(replicas: Replicas, questions: int,
                             tries: int = 1) -> dict[str, Any]:
    """Each question asked through replica i, then again through replica i+1 (up to `tries`
    times, in case the cache write, which follows the answer, is slow)."""
    run = uuid.uuid4().hex[:8]
    routes = []
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(questions):
            first, second = n % replicas.count, (n + 1) % replicas.count
            body = chat(f"Question {n} of run {run}: name a prime number.")
            miss = await client.post(replicas.url(first) + "/v1/chat/completions", json=body,
                                     headers=headers())
            miss.raise_for_status()
            for _ in range(tries):
                await asyncio.sleep(0.2)  # the cache write follows the answer
                hit = await client.post(replicas.url(second) + "/v1/chat/completions",
                                        json=body, headers=headers())
                hit.raise_for_status()
                if hit.headers["x-smallfirst-route"].startswith("cache_"):
                    break
            routes.append(hit.headers["x-smallfirst-route"])
    hits = sum(route.startswith("cache_") for route in routes)
    return {"questions": questions, "cross_replica_hits": hits,
            "cross_replica_hit_rate": hits / questions}


async def decision_rows(replicas: Replicas, per_replica: int) -> dict[str, Any]:
    """Requests with known ids to every replica; which of them the stream holds."""
    run = uuid.uuid4().hex[:8]
    sent = {f"{run}-r{i}-{n}": i for i in range(replicas.count) for n in range(per_replica)}
    async with httpx.AsyncClient(timeout=30) as client:
        for request_id, i in sent.items():
            body = chat(f"Decision {request_id}: say something.")
            (await client.post(replicas.url(i) + "/v1/chat/completions", json=body,
                               headers=headers(**{"x-request-id": request_id}))).raise_for_status()
    import redis.asyncio as redis

    client = redis.Redis.from_url(replicas.config["redis_url"])
    key = replicas.config["decision_stream"]
    found: set[str] = set()
    deadline = time.monotonic() + 10  # rows are written in the background
    while time.monotonic() < deadline and not set(sent) <= found:
        rows = await client.xrange(key)
        found = {json.loads(fields[b"row"])["request_id"] for _, fields in rows}
        await asyncio.sleep(0.1)
    await client.aclose()
    landed = {i: sum(1 for r, j in sent.items() if j == i and r in found)
              for i in range(replicas.count)}
    return {"stream": key, "rows_sent": len(sent), "rows_landed_by_replica": landed}


async def rate_limit(replicas: Replicas, limit: int, sent: int) -> dict[str, Any]:
    """`sent` requests at once from a tenant allowed `limit` a minute, through the balancer."""
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(n: int) -> httpx.Response:
            return await client.post(replicas.base + "/v1/chat/completions",
                                     json=chat(f"Limited {run} {n}"),
                                     headers=headers(LIMITED_KEY))

        responses = await asyncio.gather(*(one(n) for n in range(sent)))
    refused = [r for r in responses if r.status_code == 429]
    return {
        "limit_per_minute": limit, "sent": sent,
        "admitted": sum(r.status_code == 200 for r in responses),
        "refused_429": len(refused),
        "other": sorted({r.status_code for r in responses} - {200, 429}),
        "replicas_answering": len({r.headers.get(REPLICA_HEADER) for r in responses}),
        "refusal_example": {"retry_after": refused[0].headers.get("retry-after"),
                            "body": refused[0].json()} if refused else None,
    }


@dataclass
class Outcome:
    replica: str | None  # from HAProxy's header: known once the response has begun
    started: float
    ended: float = float("inf")
    error: str | None = None


async def _load_request(client: httpx.AsyncClient, base: str, n: int,
                        outcomes: list[Outcome]) -> None:
    stream = n % 2 == 0  # half streamed, half not; each takes about half a second
    body = chat(f"Load {uuid.uuid4().hex}", stream=stream, ttft_ms=150, tokens_per_s=40)
    outcome = Outcome(None, time.monotonic())
    outcomes.append(outcome)
    try:
        if stream:
            async with client.stream("POST", base + "/v1/chat/completions", json=body,
                                     headers=headers()) as response:
                outcome.replica = response.headers.get(REPLICA_HEADER)
                text = (await response.aread()).decode()
                if response.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
                    outcome.error = f"stream {response.status_code}: {text[-120:]!r}"
                elif '"error"' in text:
                    outcome.error = "stream carried an error event"
        else:
            response = await client.post(base + "/v1/chat/completions", json=body,
                                         headers=headers())
            outcome.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                outcome.error = f"{response.status_code}: {response.text[:120]}"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()


async def under_load(replicas: Replicas, victim: int, sig: signal.Signals, seconds: float,
                     concurrency: int) -> dict[str, Any]:
    """Steady load through the balancer; `sig` to replica `victim` a third of the way in."""
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
            max_connections=concurrency * 2)) as client:
        async def worker() -> None:
            while time.monotonic() < stop_at:
                await _load_request(client, replicas.base, next(counter), outcomes)

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        await asyncio.sleep(seconds / 3)
        signalled = time.monotonic()
        replicas.processes[victim].send_signal(sig)
        await asyncio.gather(*workers)
    exit_code = await asyncio.to_thread(replicas.processes[victim].wait, 30)
    errors = [o for o in outcomes if o.error]
    late = [o for o in outcomes if o.started > signalled + 1.0]
    return {
        "signal": sig.name, "requests": len(outcomes), "errors": len(errors),
        "in_flight_at_signal": sum(o.started < signalled < o.ended for o in outcomes),
        "errors_in_flight_at_signal": sum(o.started < signalled for o in errors),
        # sent in the second after: the balancer had not seen it go (its health check), or
        # the kernel still accepted connections for the dying process
        "errors_sent_within_1s": sum(signalled <= o.started <= signalled + 1.0 for o in errors),
        "errors_sent_later": sum(o.started > signalled + 1.0 for o in errors),
        "errors_on_other_replicas": sum(o.replica not in (None, f"r{victim}") for o in errors),
        "requests_1s_after": len(late),
        "served_by_victim_1s_after": sum(o.replica == f"r{victim}" for o in late),
        "victim_exit_code": exit_code, "error_examples": [o.error for o in errors[:3]],
    }


async def scenarios(replicas: Replicas, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cache": await cross_replica_hits(replicas, args.questions, args.tries),
        "decision_stream": await decision_rows(replicas, 3),
        "rate_limit": await rate_limit(replicas, args.limit, args.limit * 3),
        "sigterm": await under_load(replicas, 0, signal.SIGTERM, args.seconds, args.concurrency),
        "sigkill": await under_load(replicas, 1, signal.SIGKILL, args.seconds, args.concurrency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--tries", type=int, default=1, help="repeats until a cache hit")
    parser.add_argument("--limit", type=int, default=30, help="requests a minute, one tenant")
    parser.add_argument("--seconds", type=float, default=6.0, help="load per kill scenario")
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args()
    from load.cache_bench import start_valkey
    from load.harness import start

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        up_port = free_port()
        upstream = start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                         f"http://127.0.0.1:{up_port}/health")
        valkey, redis_url = start_valkey(workdir)
        replicas = Replicas(workdir, replica_config(
            f"http://127.0.0.1:{up_port}", redis_url, f"replicas-{uuid.uuid4().hex[:6]}",
            args.limit, workdir), args.replicas)
        try:
            replicas.start()
            figures = asyncio.run(scenarios(replicas, args))
        finally:
            replicas.stop()
            for proc in (upstream, valkey):
                proc.kill()
                proc.wait()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
