"""The side-by-side benchmark: runs the scenarios and writes docs/benchmarks.md with its plots.

    python -m load.bench [--seconds 6] [--rates 25,50,100,200,300] [--baseline DIR] [--litellm]
                         [--only NAME,...] [--skip NAME,...] [--soak-s 600]

Everything runs on this machine at once: the scripted upstream (20 ms to the first token:
the stand-in for a small model, and for what a client would call directly), the gateway, and
optionally a baseline gateway started from another source tree (`--baseline DIR`, e.g. an
older commit exported with `git archive`) and LiteLLM's proxy, installed into its own virtual
environment under `.bench/` (`--litellm`). Arrivals are open loop (Poisson, fixed seed) and
latency counts from each request's scheduled send time, so a saturated server shows its queue.

Scenarios:
- overhead ladder: non-streamed chat on the small route, unique prompts (no cache hits), at
  rising rates; each target's percentiles minus the direct upstream's at the same rate;
- cache: exact hits (in-process cache, and Redis) and semantic hits (Redis, embedding
  included) at rising rates; Redis-backed misses (the cache step before the small model);
- streaming: time to the first content byte for each stream mode against the direct stream;
- CPU: every process's CPU seconds per request in each step;
- escalation, router, soak (`load.bench_costs`): an escalated request against frontier-only,
  the learned scorers' time against the heuristic policy, the gateway's memory over a soak.

Scenarios by name (`--only`, `--skip`): ladder, cache, stream, escalation, router, soak.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from load.cache_bench import REWORDINGS, questions, start_valkey
from load.harness import ROOT, free_port, start
from load.telemetry_overhead import cpu_seconds

UPSTREAM_TTFT_MS = 20
SCRIPT = ' <<script {"ttft_ms": %d, "tokens_per_s": %d}>>'
QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
TIMEOUT_S = 30.0
SCENARIOS = ("ladder", "cache", "stream", "escalation", "router", "soak", "workers")
HEAD = "| p50 | p90 | p99 | p99.9 | max | errors | CPU ms per request |"  # of a row()
RULE = "|---" * 7 + "|"


@dataclass
class Target:
    name: str
    url: str  # the chat completions endpoint
    model: str
    pids: dict[str, int]  # the processes whose CPU this target's requests cost
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # request fields this target needs


# A direct call asks for what the gateway asks the small model for.
DIRECT_EXTRA = {"logprobs": True}


@dataclass
class Step:
    """One target at one rate: latencies (ms from the scheduled send), errors, CPU."""

    target: str
    rate: float
    latencies: list[float]
    errors: int
    cpu_ms: dict[str, float]  # process -> CPU ms per request
    served: dict[str, int] = field(default_factory=dict)  # routes; failures by HTTP status

    @property
    def sent(self) -> int:
        return len(self.latencies) + self.errors

    def q(self, name: str) -> float:
        return quantile(self.latencies, dict(QUANTILES)[name])


def quantile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson send times (seconds from the start)."""
    rng, at, times = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return times
        times.append(at)


class Load:
    """An open-loop load generator over one pooled aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def step(self, target: Target, rate: float, seconds: float, prompts: Any,
                   *, stream: bool = False, extra: dict[str, Any] | None = None) -> Step:
        """Send `prompts(i)` at `rate`; with `stream`, latency is to the first content byte."""
        loop = asyncio.get_running_loop()
        before = {name: cpu_seconds(pid) for name, pid in target.pids.items()}
        begin = loop.time() + 0.05
        tasks = []
        for i, offset in enumerate(arrivals(rate, seconds, seed=int(rate * 1000) + 7)):
            body = {"model": target.model, "max_tokens": 16, **target.extra, **(extra or {}),
                    "messages": [{"role": "user", "content": prompts(i)}]}
            if stream:
                body["stream"] = True
            delay = begin + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self.one(target, body, begin + offset, stream)))
        results = await asyncio.gather(*tasks)
        after = {name: cpu_seconds(pid) for name, pid in target.pids.items()}
        latencies = [ms for ms, _ in results if ms is not None]
        served: dict[str, int] = {}
        for _, route in results:
            if route:
                served[route] = served.get(route, 0) + 1
        cpu = {name: 1000 * (after[name] - before[name]) / max(len(results), 1)
               for name in target.pids if before[name] is not None and after[name] is not None}
        return Step(target.name, rate, latencies, len(results) - len(latencies), cpu, served)

    async def one(self, target: Target, body: dict[str, Any], scheduled: float,
                  stream: bool) -> tuple[float | None, str | None]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async with self.session.post(target.url, data=orjson.dumps(body),
                                             headers=target.headers) as response:
                    route = response.headers.get("x-smallfirst-route")
                    if response.status != 200:
                        await response.read()
                        return None, f"HTTP {response.status}"
                    if not stream:
                        await response.read()
                        return (loop.time() - scheduled) * 1000, route
                    first = None
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {") and b'"content"' in line:
                            first = (loop.time() - scheduled) * 1000
                    return first, route
        except TimeoutError:
            return None, "timeout"
        except aiohttp.ClientError as exc:
            return None, type(exc).__name__


# ---- the processes ---------------------------------------------------------------------


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def gateway(self, name: str, upstream: str, tree: Path = ROOT, **settings: Any) -> str:
        port = free_port()
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
            "policies": str(tree / "policies"), "auth": "off", "port": port,
            "watch_policies": False, "log_level": "warning", **settings,
        }))
        base = f"http://127.0.0.1:{port}"
        self.add(start([sys.executable, "-m", "tooling.cli", "serve", "--config", str(config)],
                       f"{base}/readyz", cwd=tree))  # ready: warmed up, models loaded
        return base

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def litellm_proxy(procs: Processes, upstream: str, version: str) -> tuple[str, int, str]:
    """LiteLLM's proxy in its own virtual environment under .bench/ (installed on first use)."""
    venv = ROOT / ".bench" / f"litellm-{version}"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(f"installing litellm[proxy]=={version} into {venv.relative_to(ROOT)} ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                        f"litellm[proxy]=={version}"], check=True)
    port, key = free_port(), "sk-bench-" + uuid.uuid4().hex[:8]
    config = procs.workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "small-stand-in",
        "litellm_params": {"model": "openai/small-stand-in", "api_base": f"{upstream}/v1",
                           "api_key": "none"}}]}))
    base = f"http://127.0.0.1:{port}"
    proc = procs.add(start([str(binary), "--config", str(config), "--port", str(port),
                            "--num_workers", "1"], f"{base}/health/liveliness",
                           env={"LITELLM_MASTER_KEY": key}))
    return base, proc.pid, key


# ---- the scenarios ---------------------------------------------------------------------


def unique(tag: str, ttft_ms: int = UPSTREAM_TTFT_MS, tokens_per_s: int = 0) -> Any:
    script = SCRIPT % (ttft_ms, tokens_per_s)
    return lambda i: f"{tag} {i}: how far is the moon?{script}"


async def ladder(load: Load, targets: list[Target], rates: list[float],
                 seconds: float) -> list[Step]:
    steps, saturated = [], set()
    for rate in rates:
        for target in targets:
            if target.name in saturated:
                continue
            step = await load.step(target, rate, seconds, unique(uuid.uuid4().hex[:8]))
            steps.append(step)
            print(f"  ladder {target.name:16} {rate:5.0f}/s  p50 {step.q('p50'):8.1f}  "
                  f"p99 {step.q('p99'):8.1f} ms  errors {step.errors}", flush=True)
            if step.errors > 0.2 * step.sent or step.q("p99") > 10_000:
                saturated.add(target.name)  # the next rate would only queue further
            await asyncio.sleep(1.0)
    return steps


async def cache_hits(load: Load, memory: Target, redis: Target | None, rates: list[float],
                     semantic_rates: list[float], seconds: float) -> list[Step]:
    pairs = questions(len(REWORDINGS) * 1000)
    steps: list[Step] = []

    async def rising(target: Target, name: str, step_rates: list[float], prompts: Any) -> None:
        for n, rate in enumerate(step_rates):
            step = await load.step(target, rate, seconds, prompts(n))
            step.target = name
            steps.append(step)
            print(f"  cache  {name:30} {rate:5.0f}/s  p50 {step.q('p50'):7.1f}  "
                  f"p99 {step.q('p99'):7.1f} ms  served {step.served}", flush=True)
            if step.errors > 0.2 * step.sent or step.q("p99") > 10_000:
                return  # saturated: a higher rate would only queue further

    def asked(n: int) -> Any:
        return lambda i: pairs[i % len(pairs)][0]

    def reworded(n: int) -> Any:  # a fresh rewording per rate: never an exact repeat
        forms = questions(len(pairs), n)
        return lambda i: forms[i % len(forms)][1]

    for target in [memory, *([redis] if redis else [])]:
        await fill(load, target, [question for question, _ in pairs])
        await rising(target, f"exact hit, {target.name}", rates, asked)
    if redis is not None:
        await rising(redis, "semantic hit, Redis", semantic_rates, reworded)
        await rising(redis, "miss, Redis exact + semantic", semantic_rates,
                     lambda n: unique(uuid.uuid4().hex[:8]))
    return steps


async def fill(load: Load, target: Target, prompts: list[str]) -> None:
    """Ask every question once, four at a time, then wait until the last is an exact hit
    (cache writes happen after the answers)."""
    gate = asyncio.Semaphore(4)
    quiet = Target(target.name, target.url, target.model, {}, target.headers)

    async def ask(prompt: str) -> str | None:
        async with gate:
            body = {"model": target.model, "max_tokens": 16,
                    "messages": [{"role": "user", "content": prompt}]}
            return (await load.one(quiet, body, asyncio.get_running_loop().time(), False))[1]

    await asyncio.gather(*(ask(prompt) for prompt in prompts))
    for _ in range(50):
        if await ask(prompts[-1]) == "cache_exact":
            return
        await asyncio.sleep(0.2)


async def streaming(load: Load, direct: Target, gateway: Target, rate: float,
                    seconds: float) -> list[Step]:
    steps = []
    prompts = unique(uuid.uuid4().hex[:8], tokens_per_s=400)
    for name, target in (("direct upstream", direct),
                         ("direct mode (fast)", Target(**{**gateway.__dict__, "model": "fast"})),
                         ("holdback (auto)", gateway),
                         ("buffer (quality)", Target(**{**gateway.__dict__,
                                                        "model": "quality"}))):
        step = await load.step(target, rate, seconds, prompts, stream=True)
        step.target = name
        steps.append(step)
        print(f"  stream {name:20} TTFB p50 {step.q('p50'):7.1f}  p99 {step.q('p99'):7.1f} ms",
              flush=True)
    return steps


# ---- the report ------------------------------------------------------------------------


def machine(args_litellm: str | None) -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in (
        "fastapi", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson", "litellm",
        "opentelemetry-sdk"))
    if args_litellm:
        versions += f"; LiteLLM proxy {args_litellm}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return {"cpu": f"{cpu}, {os.cpu_count()} logical cores", "python": platform.python_version(),
            "os": platform.platform(), "versions": versions, "commit": commit}


def row(step: Step, base: Step | None = None) -> str:
    cells = [f"{step.q(name):.1f}" if base is None else f"{step.q(name) - base.q(name):+.1f}"
             for name, _ in QUANTILES]
    cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in step.cpu_ms.items())
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(step.served.items())
                      if kind.startswith("HTTP") or kind == "timeout" or kind.endswith("Error"))
    errors = f"{step.errors}/{step.sent}" + (f" ({kinds})" if kinds else "")
    return f"| {' | '.join(cells)} | {errors} | {cpu} |"


def write_report(out: Path, info: dict[str, Any], ladder_steps: list[Step],
                 cache_steps: list[Step], stream_steps: list[Step], more: list[str]) -> None:
    """The report of the scenarios that ran; `more`: the sections of `load.bench_costs`."""
    lines = [
        "# Benchmarks", "",
        f"Written by `{info['command']}` ({info['seconds']} s per step). Every process ran on "
        "this one machine at once: the load generator, the scripted upstream (a stand-in "
        f"model answering after {UPSTREAM_TTFT_MS} ms), the gateway(s) and, when compared, "
        "LiteLLM's proxy. Arrivals are open loop (Poisson); latency counts from each "
        "request's scheduled send time. All figures in ms.", "",
        f"- machine: {info['cpu']}; load average before {info['load_before']}, "
        f"after {info['load_after']}",
        f"- {info['os']}, Python {info['python']}, commit {info['commit']}",
        f"- {info['versions']}", "",
    ]
    if info.get("note"):
        lines += [info["note"], ""]
    if ladder_steps:
        lines += headline(ladder_steps) + ladder_section(ladder_steps)
    if cache_steps:
        lines += cache_section(cache_steps)
    if stream_steps:
        lines += stream_section(stream_steps)
    lines += [*more, ""]
    out.write_text("\n".join(lines))


def ladder_section(ladder_steps: list[Step]) -> list[str]:
    lines = ["## Overhead ladder (non-streamed, small route, unique prompts)", "",
              "Each target's latency, then its overhead: the same percentile minus the direct "
              "upstream's at the same rate. CPU: each process's CPU ms per request in the "
              "step.", "", "| target | rate/s " + HEAD, "|---|---" + RULE]
    direct = {s.rate: s for s in ladder_steps if s.target == "direct upstream"}
    for step in ladder_steps:
        lines.append(f"| {step.target} | {step.rate:.0f} " + row(step))
    lines += ["", "| overhead over direct | rate/s " + HEAD, "|---|---" + RULE]
    for step in ladder_steps:
        if step.target != "direct upstream" and step.rate in direct:
            lines.append(f"| {step.target} | {step.rate:.0f} " + row(step, direct[step.rate]))
    return [*lines, "", "![latency by rate](benchmarks/ladder.png)", ""]


def cache_section(cache_steps: list[Step]) -> list[str]:
    lines = ["## Cache (non-streamed, end to end)", "",
              "Exact hits repeat questions asked once before; semantic hits reword them (only "
              "the share served from the semantic cache is a hit, see `served`); misses are "
              "unique prompts through a gateway with Redis and the semantic cache on.", "",
              "| kind | rate/s " + HEAD + " served |", "|---|---" + RULE + "---|"]
    for step in cache_steps:
        served = ", ".join(f"{k} {v}" for k, v in sorted(step.served.items()))
        lines.append(f"| {step.target} | {step.rate:.0f} " + row(step) + f" {served} |")
    return [*lines, ""]


def stream_section(stream_steps: list[Step]) -> list[str]:
    lines = ["## Streaming: time to the first content byte", "",
              "The upstream streams 16 tokens at 400 tokens/s after its first. Direct mode "
              "relays the first token; holdback (policy auto) holds 16 tokens for judgement; "
              "buffer (quality) judges the whole answer first.", "",
              "| mode | rate/s " + HEAD, "|---|---" + RULE]
    for step in stream_steps:
        lines.append(f"| {step.target} | {step.rate:.0f} " + row(step))
    return [*lines, "", "![time to first byte](benchmarks/streaming.png)", ""]


def headline(ladder_steps: list[Step]) -> list[str]:
    """Per target: the highest rate held with p99 overhead under 50 ms and no errors, and its
    overhead and CPU at the lowest rate."""
    direct = {s.rate: s for s in ladder_steps if s.target == "direct upstream"}
    lines = ["## Headline", "", "| target | highest rate with p99 overhead < 50 ms, no errors "
             "| at the lowest rate: overhead p50 / p99 | CPU ms per request there |",
             "|---|---|---|---|"]
    for name in dict.fromkeys(s.target for s in ladder_steps if s.target != "direct upstream"):
        steps = [s for s in ladder_steps if s.target == name and s.rate in direct]
        if not steps:
            continue
        held = [s.rate for s in steps
                if s.errors == 0 and s.q("p99") - direct[s.rate].q("p99") < 50]
        first = steps[0]
        cpu = ", ".join(f"{process} {ms:.2f}" for process, ms in first.cpu_ms.items())
        lines.append(
            f"| {name} | {f'{max(held):.0f}/s' if held else 'none'} | "
            f"{first.q('p50') - direct[first.rate].q('p50'):+.1f} / "
            f"{first.q('p99') - direct[first.rate].q('p99'):+.1f} ms "
            f"at {first.rate:.0f}/s | {cpu} |")
    return [*lines, ""]


def plots(folder: Path, ladder_steps: list[Step], stream_steps: list[Step]) -> None:
    """The plots of the scenarios that ran (one that did not keep its earlier plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if ladder_steps:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
        for name in dict.fromkeys(s.target for s in ladder_steps):
            steps = [s for s in ladder_steps if s.target == name]
            for ax, q in zip(axes, ("p50", "p99"), strict=True):
                ax.plot([s.rate for s in steps], [s.q(q) for s in steps], marker="o",
                        label=name)
        for ax, q in zip(axes, ("p50", "p99"), strict=True):
            ax.set(xlabel="requests/s", ylabel=f"{q} latency, ms", yscale="log", title=q)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "ladder.png")
    if stream_steps:
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
        for step in stream_steps:
            ordered = sorted(step.latencies)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))],
                    label=step.target)
        ax.set(xlabel="time to first content byte, ms", ylabel="share of requests",
               xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "streaming.png")


# ---- the run ---------------------------------------------------------------------------


async def scenarios(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    from load import bench_costs  # it builds on this module

    results: dict[str, Any] = {"ladder": [], "cache": [], "stream": []}
    if {"ladder", "cache", "stream"} & args.scenarios:
        results.update(await gateway_scenarios(args, procs))
    return {**results, **await bench_costs.scenarios(args, procs)}


async def gateway_scenarios(args: argparse.Namespace,
                            procs: Processes) -> dict[str, list[Step]]:
    """The overhead ladder, cache and streaming scenarios that `args` select."""
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    up_pid = procs.add(start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                             f"{upstream}/health")).pid
    gateway = procs.gateway("smallfirst", upstream)
    pids = {"gateway": procs.procs[-1].pid, "upstream": up_pid}
    targets = [Target("direct upstream", f"{upstream}/v1/chat/completions", "small-stand-in",
                      {"upstream": up_pid}, extra=DIRECT_EXTRA)]
    main = Target("smallfirst", f"{gateway}/v1/chat/completions", "auto", pids)
    targets.append(main)
    if args.baseline:
        base = procs.gateway("baseline", upstream, tree=args.baseline.resolve())
        name = f"baseline {args.baseline_name}".strip()
        targets.append(Target(name, f"{base}/v1/chat/completions", "auto",
                              {"gateway": procs.procs[-1].pid, "upstream": up_pid}))
    if args.litellm:
        base, pid, key = litellm_proxy(procs, upstream, args.litellm_version)
        targets.append(Target("LiteLLM proxy", f"{base}/v1/chat/completions",
                              "small-stand-in", {"proxy": pid, "upstream": up_pid},
                              {"authorization": f"Bearer {key}"}, DIRECT_EXTRA))
    redis = None
    if not args.no_redis:
        valkey, redis_url = start_valkey(procs.workdir)
        procs.add(valkey)
        redis_gateway = procs.gateway("redis", upstream, redis_url=redis_url,
                                      cache_prefix="bench-" + uuid.uuid4().hex[:6])
        redis = Target("Redis", f"{redis_gateway}/v1/chat/completions", "auto",
                       {"gateway": procs.procs[-1].pid, "valkey": valkey.pid})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"content-type": "application/json"}) as session:
        load = Load(session)
        for target in targets:  # warm up connections, lazy imports and the upstream
            await load.step(target, 50, 2.0, unique("warm"))
        ladder_steps, cache_steps, stream_steps = [], [], []
        if "ladder" in args.scenarios:
            print("overhead ladder", flush=True)
            ladder_steps = await ladder(load, targets, args.rates, args.seconds)
        if "cache" in args.scenarios:
            print("cache", flush=True)
            memory = Target("in-process", main.url, "auto", pids)
            cache_steps = await cache_hits(load, memory, redis, args.hit_rates,
                                           args.semantic_rates, args.seconds)
        if "stream" in args.scenarios:
            print("streaming", flush=True)
            stream_steps = await streaming(load, targets[0], main, args.stream_rate,
                                           args.seconds)
        workers = None
        if "workers" in args.scenarios:
            from load.workers_bench import workers_ladder

            print("1 against 2 workers", flush=True)
            workers = await workers_ladder(load, procs, upstream, targets[0], args.rates,
                                           args.seconds)
    return {"ladder": ladder_steps, "cache": cache_steps, "stream": stream_steps,
            "workers": workers}


def command(args: argparse.Namespace) -> str:
    """This run's command line, with the baseline's folder (a path of this machine) and the
    note (printed on its own) elided."""
    elided = {str(args.baseline): "DIR", args.note: "NOTE"}
    return "python -m load.bench " + shlex.join(elided.get(arg, arg) for arg in sys.argv[1:])


def rates(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def names(text: str) -> set[str]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    if unknown := chosen - set(SCENARIOS):
        raise argparse.ArgumentTypeError(f"unknown scenarios {', '.join(sorted(unknown))}; "
                                         f"choose from {', '.join(SCENARIOS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each step")
    parser.add_argument("--rates", type=rates, default=rates("25,50,100,200,300"))
    parser.add_argument("--hit-rates", type=rates, default=rates("100,300,500"))
    parser.add_argument("--semantic-rates", type=rates, default=rates("10,25,50"))
    parser.add_argument("--stream-rate", type=float, default=20.0)
    parser.add_argument("--baseline", type=Path, help="another source tree to run side by side")
    parser.add_argument("--baseline-name", default="",
                        help="what the baseline is, for the report (e.g. its commit)")
    parser.add_argument("--litellm", action="store_true",
                        help="also LiteLLM's proxy (installed into .bench/ on first use)")
    parser.add_argument("--litellm-version", default="1.108.7",
                        help="the proxy's version (newer [proxy] extras need the separate "
                             "litellm-proxy package)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis cache scenarios")
    parser.add_argument("--only", type=names, default=set(SCENARIOS), metavar="NAME,...",
                        help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--skip", type=names, default=set(), metavar="NAME,...",
                        help="run all scenarios but these")
    parser.add_argument("--note", help="a line for the report (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    from load import bench_costs  # it builds on this module

    bench_costs.add_arguments(parser)
    args = parser.parse_args()
    args.scenarios = args.only - args.skip
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    info: dict[str, Any] = {**machine(args.litellm_version if args.litellm else None),
                            "seconds": args.seconds, "note": args.note,
                            "command": command(args),
                            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp))
        try:
            results = asyncio.run(scenarios(args, procs))
        finally:
            procs.stop()
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plots(args.out.parent / "benchmarks", results["ladder"], results["stream"])
    bench_costs.plots(args.out.parent / "benchmarks", results)
    more = bench_costs.report(results, args)
    if results.get("workers"):
        from load.workers_bench import section

        more += section(*results["workers"])
    write_report(args.out, info, results["ladder"], results["cache"], results["stream"], more)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
