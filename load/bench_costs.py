"""The benchmark's scenarios of what the cascade itself costs (run by `load.bench`):

- escalation: a request the cascade escalates (the small model answers, its answer is
  rejected, the frontier answers) against the same request under a frontier-only policy and
  sent straight to the frontier upstream;
- router: the learned difficulty and confidence scorers (the shipped bundle) against the
  heuristic policy `auto`: the `difficulty` and `confidence` step times the gateway reports in
  `Server-Timing`, and the end-to-end difference;
- soak: the gateway's resident memory and open descriptors over a constant-rate run of mixed
  traffic (`load.soak`).

Escalation and router run against a gateway of their own with a frontier. Two scripted upstream
processes play the models, the small one answering after 20 ms and the frontier after 60 ms;
requests carry the same script for both, so only the route differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from load import soak
from load.bench import HEAD, QUANTILES, RULE, Load, Processes, Step, Target, quantile, rates, row
from load.cache_bench import questions
from load.harness import free_port, start
from tooling.stand_in import fixed_threshold_policies

SMALL_TTFT_MS = 20
FRONTIER_TTFT_MS = 60
# exp(-2) = 0.14, under policy auto's 0.5: every small answer is rejected and escalated.
REJECTED = ' <<script {"logprob": -2.0}>>'
POLICIES = {
    "frontier-only": {"route": "frontier_only",
                      "description": "Every request to the frontier (benchmark baseline)."},
    "learned": {"route": "cascade",
                "description": "The shipped router bundle scores difficulty and confidence.",
                # Both scorers run on every request, neither changes its route: only their
                # cost differs from policy auto.
                "difficulty": {"scorer": "learned", "skip_threshold": 0.0},
                "confidence": {"scorer": "learned", "threshold": 0.0}},
}
SOAK_SAMPLES = 10
WARMUP_SAMPLES = 2  # as load.soak's
Timings = dict[tuple[str, float], list[dict[str, float]]]  # Server-Timing, by target and rate
SCORED = "scored "  # a response's scores, next to its timings: "scored difficulty": 1


async def scenarios(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    """The selected scenarios' results: `escalation` and `router` steps, `timings` (each of
    their steps' Server-Timing components, by target and rate) and the `soak`."""
    results: dict[str, Any] = {"escalation": [], "router": [], "timings": {}, "soak": None}
    if {"escalation", "router"} & args.scenarios:
        gateway, pids, frontier = cascade_gateway(procs)
        async with Probe() as probe:
            if "escalation" in args.scenarios:
                print("escalation", flush=True)
                results["escalation"] = await escalation(
                    probe, gateway, pids, frontier, args.escalation_rates, args.cost_seconds)
            if "router" in args.scenarios:
                print("router scoring", flush=True)
                results["router"] = await router(probe, gateway, pids, args.router_rate,
                                                 args.cost_seconds)
        results["timings"] = probe.timings
    if "soak" in args.scenarios:
        print(f"soak ({args.soak_s:.0f} s at {args.soak_rate:.0f}/s)", flush=True)
        results["soak"] = await soak_memory(procs.workdir, args.soak_s, args.soak_rate)
    return results


def cascade_gateway(procs: Processes) -> tuple[str, dict[str, int], str]:
    """A small and a frontier upstream and a gateway cascading from one to the other, with
    the shipped policies (`auto` at its fixed stand-in threshold) and this benchmark's; the
    gateway, its processes, the frontier."""
    upstreams = {}
    for name, ttft_ms in (("small upstream", SMALL_TTFT_MS),
                          ("frontier upstream", FRONTIER_TTFT_MS)):
        port = free_port()
        upstreams[name] = f"http://127.0.0.1:{port}", procs.add(start(
            [sys.executable, "-m", "load.upstream", "--port", str(port),
             "--script", json.dumps({"ttft_ms": ttft_ms})],
            f"http://127.0.0.1:{port}/health")).pid
    policies = fixed_threshold_policies(procs.workdir / "cascade-policies")
    for name, policy in POLICIES.items():
        (policies / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **policy}))
    frontier = upstreams["frontier upstream"][0]
    gateway = procs.gateway("cascade", upstreams["small upstream"][0], policies=str(policies),
                            frontier_model="openai/frontier-stand-in",
                            frontier_api_base=f"{frontier}/v1", frontier_api_key="stand-in")
    pids = {"gateway": procs.procs[-1].pid,
            **{name: pid for name, (_, pid) in upstreams.items()}}
    return gateway, pids, frontier


class Probe:
    """The load generator, over a session that also reads every response's Server-Timing
    and scores; those of a measured step are kept in `timings`, by target and rate."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []
        self.timings: Timings = {}

    async def __aenter__(self) -> Probe:
        async def on_end(session: Any, context: Any,
                         params: aiohttp.TraceRequestEndParams) -> None:
            headers = params.response.headers
            if "server-timing" in headers:
                self.seen.append({**server_timing(headers["server-timing"]),
                                  **scored(headers.get("x-smallfirst-scores", ""))})

        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(on_end)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace],
            headers={"content-type": "application/json"})
        self.load = Load(self.session)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def warm(self, target: Target, rate: float, suffix: str = "") -> None:
        """Connections, lazy imports and the upstreams warmed up (unique prompts: no cache
        hits), nothing kept."""
        await self.load.step(target, rate, 2.0, prompts(f"warm {uuid.uuid4().hex[:8]}", suffix))

    async def measure(self, target: Target, rate: float, seconds: float,
                      suffix: str = "") -> Step:
        self.seen.clear()
        step = await self.load.step(target, rate, seconds,
                                    prompts(uuid.uuid4().hex[:8], suffix))
        self.timings[(target.name, rate)] = list(self.seen)
        print(f"  {target.name:26} {rate:5.0f}/s  p50 {step.q('p50'):7.1f}  "
              f"p99 {step.q('p99'):7.1f} ms  served {step.served}", flush=True)
        await asyncio.sleep(1.0)
        return step


def server_timing(header: str) -> dict[str, float]:
    """`difficulty;dur=1.2, total;dur=30.0` -> {"difficulty": 1.2, "total": 30.0}"""
    return {name: float(ms) for name, ms in re.findall(r"([\w.-]+);dur=([\d.]+)", header)}


def scored(header: str) -> dict[str, float]:
    """`difficulty=0.812, confidence=0.135` -> {"scored difficulty": 1, ...}: which scorers
    gave an opinion (a learned one has none when the embedding missed its budget)."""
    return {SCORED + name: 1 for name in re.findall(r"(\w+)=", header)}


def prompts(tag: str, suffix: str = "") -> Any:
    """Unique questions (no cache hits, a fresh embedding each) of a realistic shape."""
    asked = [question for question, _ in questions(240)]
    return lambda i: f"{asked[i % len(asked)]} ({tag} {i}){suffix}"


async def escalation(probe: Probe, gateway: str, pids: dict[str, int], frontier: str,
                     rates: list[float], seconds: float) -> list[Step]:
    url = f"{gateway}/v1/chat/completions"
    targets = [
        Target("cascade, escalated", url, "auto", pids),
        Target("frontier-only policy", url, "frontier-only", pids),
        Target("direct frontier upstream", f"{frontier}/v1/chat/completions",
               "frontier-stand-in", {"frontier upstream": pids["frontier upstream"]}),
    ]
    steps, saturated = [], set()
    for target in targets:
        await probe.warm(target, 20, REJECTED)
    for rate in rates:
        for target in targets:
            if target.name not in saturated:
                steps.append(step := await probe.measure(target, rate, seconds, REJECTED))
                if step.errors > 0.2 * step.sent or step.q("p99") > 10_000:
                    saturated.add(target.name)  # the next rate would only queue further
    return steps


async def router(probe: Probe, gateway: str, pids: dict[str, int], rate: float,
                 seconds: float) -> list[Step]:
    steps = []
    url = f"{gateway}/v1/chat/completions"
    for name, policy in (("heuristic (auto)", "auto"), ("learned (bundle default)", "learned")):
        target = Target(name, url, policy, pids)
        await probe.warm(target, rate)
        steps.append(await probe.measure(target, rate, seconds))
    return steps


async def soak_memory(workdir: Path, seconds: float, rate: float) -> soak.Soak:
    """`load.soak`'s run: mixed traffic at `rate`, the gateway sampled once idle, ten times."""
    folder = workdir / "soak"
    folder.mkdir()
    base, pid, redis_url, handles = soak.stack(folder)
    try:
        print(soak.HEADER, flush=True)
        return await soak.run(base, pid, redis_url, duration_s=seconds,
                              every_s=seconds / SOAK_SAMPLES, rate=rate, echo=True)
    finally:
        soak.stop(handles)


# ---- the report ------------------------------------------------------------------------


def report(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The markdown sections of the scenarios that ran."""
    lines: list[str] = []
    if results["escalation"]:
        lines += escalation_section(results["escalation"], results["timings"],
                                    args.cost_seconds)
    if results["router"]:
        lines += router_section(results["router"], results["timings"], args.cost_seconds)
    if results["soak"] is not None:
        lines += soak_section(results["soak"], args.soak_s, args.soak_rate)
    return lines


def steps_table(label: str, steps: list[Step]) -> list[str]:
    """One row per step: its latency percentiles and what served it."""
    return [f"| {label} | rate/s " + HEAD + " served |", "|---|---" + RULE + "---|",
            *(f"| {s.target} | {s.rate:.0f} " + row(s) + f" {served(s)} |" for s in steps)]


def escalation_section(steps: list[Step], timings: Timings, seconds: float) -> list[str]:
    lines = ["## Escalation cost over frontier-only", "",
             f"Non-streamed, unique prompts, {seconds:g} s per step. The small model answers "
             f"after {SMALL_TTFT_MS} ms, the frontier after {FRONTIER_TTFT_MS} ms (two "
             "scripted upstream processes). Cascade: policy `auto` tries the small model, "
             "rejects its answer (a scripted mean logprob of -2, confidence 0.14 under the "
             "threshold 0.5) and escalates; frontier-only: a policy with `route: "
             "frontier_only`; direct: the frontier upstream without the gateway.", "",
             *added_cost(steps), *steps_table("target", steps)]
    lines += ["", "The added cost of trying the small model first (cascade minus frontier-only) "
              "and of the whole gateway (minus direct), per percentile and per process:", "",
              "| difference | rate/s " + DIFFERENCE_HEAD, "|---|---" + "|---" * 6 + "|"]
    for rate in dict.fromkeys(s.rate for s in steps):
        at = {s.target: s for s in steps if s.rate == rate}
        for a, b in (("cascade, escalated", "frontier-only policy"),
                     ("cascade, escalated", "direct frontier upstream"),
                     ("frontier-only policy", "direct frontier upstream")):
            if a in at and b in at:
                lines.append(f"| {a} - {b} | {rate:.0f} " + difference(at[a], at[b]))
    return [*lines, "", *components(steps, timings)]


def added_cost(steps: list[Step]) -> list[str]:
    """The headline: what trying the small model first added at the lowest rate."""
    at = {s.target: s for s in steps if s.rate == steps[0].rate}
    cascade, frontier = at.get("cascade, escalated"), at.get("frontier-only policy")
    if cascade is None or frontier is None:
        return []
    cpu = sum(cascade.cpu_ms.values()) - sum(frontier.cpu_ms.values())
    return [f"**Trying the small model first** added {cascade.q('p50') - frontier.q('p50'):+.1f}"
            f" ms at p50 and {cascade.q('p99') - frontier.q('p99'):+.1f} ms at p99 to an "
            f"escalated request at {cascade.rate:.0f}/s, and {cpu:+.2f} ms of CPU (all "
            "processes), against the frontier-only policy.", ""]


def router_section(steps: list[Step], timings: Timings, seconds: float) -> list[str]:
    lines = ["## Router scoring time", "",
             f"Non-streamed, unique questions, {seconds:g} s at {steps[0].rate:.0f}/s per "
             "policy, small answers accepted. Heuristic: policy `auto` (difficulty "
             "`always_small`, confidence from logprobs); learned: the shipped router bundle "
             "for both (`difficulty` includes waiting for the prompt's embedding, computed "
             "in a worker thread, up to the policy's `embedding` budget).", "",
             *scoring_time(steps, timings), *steps_table("policy", steps)]
    if len(steps) == 2:
        lines += ["", "| difference | rate/s " + DIFFERENCE_HEAD, "|---|---" + "|---" * 6 + "|",
                  f"| learned - heuristic | {steps[1].rate:.0f} " + difference(*steps[::-1])]
    return [*lines, "", *components(steps, timings)]


def scoring_time(steps: list[Step], timings: Timings) -> list[str]:
    """The headline: the learned scorers' time, and what they added end to end."""
    if len(steps) != 2:
        return []
    heuristic, learned = steps
    seen = timings.get((learned.target, learned.rate), [])

    def step_ms(name: str) -> str:
        values = [t[name] for t in seen if name in t]
        return f"{quantile(values, 0.5):.1f} / {quantile(values, 0.99):.1f} ms"

    scored = sum(SCORED + "difficulty" in t for t in seen)
    cpu = learned.cpu_ms.get("gateway", 0.0) - heuristic.cpu_ms.get("gateway", 0.0)
    return [f"**The learned scorers** took {step_ms('difficulty')} (difficulty, p50 / p99) and "
            f"{step_ms('confidence')} (confidence) at {learned.rate:.0f}/s, and added "
            f"{learned.q('p50') - heuristic.q('p50'):+.1f} ms at p50, "
            f"{learned.q('p99') - heuristic.q('p99'):+.1f} ms at p99 and {cpu:+.2f} ms of "
            "gateway CPU per request against the heuristic policy. The difficulty scorer "
            f"gave a score to {scored} of {len(seen)} requests (the others had none: their "
            "embedding came after its budget).", ""]


DIFFERENCE_HEAD = "| p50 | p90 | p99 | p99.9 | max | CPU ms per request |"


def difference(step: Step, base: Step) -> str:
    """`step`'s latency percentiles and CPU per process minus `base`'s."""
    cells = [f"{step.q(name) - base.q(name):+.1f}" for name, _ in QUANTILES]
    cpu = ", ".join(f"{process} {ms - base.cpu_ms.get(process, 0.0):+.2f}"
                    for process, ms in step.cpu_ms.items())
    return f"| {' | '.join(cells)} | {cpu} |"


def components(steps: list[Step], timings: Timings) -> list[str]:
    """Each step's gateway components from `Server-Timing`, p50 / p99 (`-` where one did
    not run), and how many responses each scorer gave an opinion on."""
    seen = {(step.target, step.rate): timings.get((step.target, step.rate), [])
            for step in steps}
    keys = list(dict.fromkeys(key for rows in seen.values() for t in rows for key in t))
    names = [key for key in keys if not key.startswith(SCORED)]
    if not names:
        return []
    lines = ["The gateway's own time per component (`Server-Timing`), p50 / p99 in ms, and "
             "the responses each scorer gave a score for (`x-smallfirst-scores`):", "",
             "| target | rate/s | timed | " + " | ".join(names) + " | scored |",
             "|---|---|---" + "|---" * len(names) + "|---|"]
    for (target, rate), rows in seen.items():
        if not rows:
            continue
        cells = []
        for name in names:
            values = [t[name] for t in rows if name in t]
            cells.append(f"{quantile(values, 0.5):.1f} / {quantile(values, 0.99):.1f}"
                         if values else "-")
        scores = ", ".join(f"{key.removeprefix(SCORED)} {sum(key in t for t in rows)}"
                           for key in keys if key.startswith(SCORED))
        lines.append(f"| {target} | {rate:.0f} | {len(rows)} | " + " | ".join(cells) +
                     f" | {scores or '-'} |")
    return [*lines, ""]


def soak_section(result: soak.Soak, seconds: float, rate: float) -> list[str]:
    samples = result.samples
    lines = ["## Soak: the gateway's memory", "",
             f"{seconds:g} s of mixed traffic (`load.soak`: cache hits, small answers, "
             "escalations, streams, tool calls, clients leaving mid-stream) at "
             f"{rate:g} requests/s, {result.sent} requests; {len(samples)} samples, each taken "
             "once nothing was in flight and idle pooled connections had expired. Growth: the "
             f"last sample against the first, and against the first after {WARMUP_SAMPLES} "
             "warm-up samples.", "",
             "| measure | start | end | max | growth | after warm-up |",
             "|---|---|---|---|---|---|"]
    for key, name, form in (("rss_mb", "resident memory, MB", "{:.1f}"),
                            ("fds", "open descriptors", "{:d}"),
                            ("tasks", "asyncio tasks", "{:d}"),
                            ("redis_clients", "Redis connections", "{:d}")):
        values = [s[key] or 0 for s in samples]
        warm = values[min(WARMUP_SAMPLES, len(values) - 1)]
        cells = [form.format(v) for v in (values[0], values[-1], max(values))]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {growth(values[0], values[-1])} | {growth(warm, values[-1])} |")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items()))
    return [*lines, "", f"Client outcomes: {outcomes}.", "",
            "![memory over the soak](benchmarks/soak.png)", ""]


def growth(first: float, last: float) -> str:
    """In percent, and for counts (ints) also in units."""
    percent = f"{100 * (last / first - 1):+.1f}%" if first else "-"
    return percent if isinstance(first, float) else f"{percent} ({last - first:+d})"


def served(step: Step) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(step.served.items()))


def plots(folder: Path, results: dict[str, Any]) -> None:
    """The soak's memory and descriptors over time (soak.png)."""
    if results["soak"] is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["soak"].samples
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), dpi=80)
    for ax, key, label in zip(axes, ("rss_mb", "fds"), ("resident memory, MB",
                                                        "open descriptors"), strict=True):
        ax.plot([s["t_s"] for s in samples], [s[key] for s in samples], marker="o")
        ax.set(xlabel="seconds", ylabel=label, ylim=(0, None))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "soak.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--escalation-rates", type=rates, default=rates("10,25"),
                        help="rates of the escalation scenario")
    parser.add_argument("--router-rate", type=float, default=20.0,
                        help="rate of the router scoring scenario")
    parser.add_argument("--cost-seconds", type=float, default=30.0,
                        help="length of each escalation and router step")
    parser.add_argument("--soak-s", type=float, default=600.0, help="length of the soak")
    parser.add_argument("--soak-rate", type=float, default=10.0,
                        help="requests per second in the soak")

