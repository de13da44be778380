"""1 against 2 workers: the overhead ladder (non-streamed, small route, unique prompts) through a
gateway with `workers: 1` and one with `workers: 2`, side by side with the direct upstream.

    python -m load.workers_bench [--rates 100,200,300] [--seconds 20]

Also `python -m load.bench --only workers` (a section of docs/benchmarks.md). CPU per
request counts every worker's process; `share` is each worker's part of the requests, from the
gateway's own `/metrics`. Two workers can only help where the machine has a core to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from load.bench import Load, Processes, Step, Target, ladder, rates, row, unique
from load.harness import free_port, start

STEP_HEAD = "| p50 | p90 | p99 | p99.9 | max | errors | CPU ms per request |"


def worker_pids(supervisor: int) -> list[int]:
    return [int(pid) for pid in
            Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]


async def both_listed(base: str, workers: int) -> None:
    """Until every worker has joined `/metrics` (the first one ready answers before)."""
    if workers == 1:
        return
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            text = (await client.get(f"{base}/metrics")).text
            if all(f'worker="{slot}"' in text for slot in range(workers)):
                return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{base}: not all {workers} workers came up")


def shares(base: str) -> dict[str, float]:
    """Requests served per worker label, from one scrape."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        if family.name == "smallfirst_requests":
            for sample in family.samples:
                worker = sample.labels.get("worker", "0")
                out[worker] = out.get(worker, 0) + sample.value
    return out


async def workers_ladder(load: Load, procs: Processes, upstream: str, direct: Target,
                         rate_list: list[float], seconds: float) -> tuple[list[Step], str]:
    """The ladder for the direct upstream, 1 worker and 2 workers; and the 2 workers' shares."""
    targets = [direct]
    two = ""
    for n in (1, 2):
        base = procs.gateway(f"workers-{n}", upstream, workers=n)
        supervisor = procs.procs[-1].pid
        await both_listed(base, n)
        pids = {"gateway": supervisor} if n == 1 else \
            {f"worker {i}": pid for i, pid in enumerate(worker_pids(supervisor))}
        targets.append(Target(f"{n} worker{'s' * (n > 1)}", f"{base}/v1/chat/completions",
                              "auto", pids))
        two = base
    for target in targets:
        await load.step(target, 50, 2.0, unique("warm"))
    steps = await ladder(load, targets, rate_list, seconds)
    served = shares(two)
    total = sum(served.values()) or 1
    return steps, ", ".join(f"worker {w} {v / total:.0%}" for w, v in sorted(served.items()))


def section(steps: list[Step], share: str) -> list[str]:
    """The report's lines: latency by rate, then the overhead over the direct upstream."""
    direct = {s.rate: s for s in steps if s.target == "direct upstream"}
    lines = ["## 1 against 2 workers (non-streamed, small route, unique prompts)", "",
             f"Requests the 2 workers served, by worker: {share}.", "",
             "| target | rate/s " + STEP_HEAD, "|---|---" + "|---" * 7 + "|"]
    lines += [f"| {s.target} | {s.rate:.0f} " + row(s) for s in steps]
    lines += ["", "| overhead over direct | rate/s " + STEP_HEAD, "|---|---" + "|---" * 7 + "|"]
    lines += [f"| {s.target} | {s.rate:.0f} " + row(s, direct[s.rate]) for s in steps
              if s.target != "direct upstream" and s.rate in direct]
    return [*lines, ""]


async def run(args: argparse.Namespace, procs: Processes) -> list[str]:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    up = procs.add(start([sys.executable, "-m", "load.upstream", "--port", str(port)],
                         f"{upstream}/health"))
    direct = Target("direct upstream", f"{upstream}/v1/chat/completions", "small-stand-in",
                    {"upstream": up.pid}, extra={"logprobs": True})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"content-type": "application/json"}) as session:
        steps, share = await workers_ladder(Load(session), procs, upstream, direct, args.rates,
                                            args.seconds)
    return section(steps, share)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=rates, default=rates("100,200,300"))
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp))
        try:
            lines: Any = asyncio.run(run(args, procs))
        finally:
            procs.stop()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
