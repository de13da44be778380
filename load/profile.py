"""Where a small-route request's CPU goes: a py-spy profile of the gateway under load.

    python -m load.profile [--telemetry on|off] [--seconds 15] [--out docs/perf/NAME] [--tree DIR]

Starts the scripted upstream (instant answers) and a gateway (policy `auto`, in-process
cache, unique prompts so nothing is a hit), keeps six requests in flight, and samples the
gateway with py-spy (the `dev` extra). Writes NAME.folded.gz (collapsed stacks: open it in
speedscope or flamegraph.pl), NAME.txt (the functions by inclusive share) and prints the
share of each component with its CPU ms per request. `--tree` profiles the gateway of another
source tree (e.g. an older commit exported with `git archive`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp
import yaml

from load.harness import ROOT, free_port, start
from load.telemetry_overhead import cpu_seconds

# First match wins. Left out: samples whose innermost frame is the event loop's run (py-spy
# cannot tell uvloop's epoll wait from its own work on every kernel) or the access-log
# writer's sleep.
IDLE = ("Runner.run", "_write_forever")
COMPONENTS = [
    ("access log", ("access_log.py",)),
    ("metrics (instruments, Observer)", ("Observer._record_metrics", "Observer.started",
                                         "metrics/_internal", "Tally.")),
    ("small-model HTTP client", ("OpenAIWireBackend", "aiohttp/", "httpx/", "httpcore/",
                                 "anyio/", "h11/")),
    ("response write (uvicorn send)", ("RequestResponseCycle.send",)),
    ("request JSON parse + validation", ("read_json", "openai_types.py")),
    ("cache: fingerprint, lookup, store", ("gateway/cache/",)),
    ("engine: routing, scoring, assembly", ("gateway/engine.py", "gateway/types.py",
                                            "gateway/scoring.py", "gateway/deadlines.py")),
    ("HTTP framework (FastAPI, Starlette, uvicorn)", ("fastapi/", "starlette/", "uvicorn/protocols",
                                                     "uvicorn/middleware", "gateway/api/",
                                                     "gateway/service.py")),
]


async def load(url: str, seconds: float, in_flight: int = 6) -> int:
    """Unique-prompt chat requests, `in_flight` at a time, for `seconds`; how many were sent."""
    tag, counter = uuid.uuid4().hex[:8], itertools.count()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while loop.time() < end:
            body = {"model": "auto", "max_tokens": 16, "messages": [
                {"role": "user", "content": f"{tag} {next(counter)}: how far is the moon?"}]}
            async with session.post(url, json=body) as response:
                await response.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
    return next(counter)


def clean(frame_line: str, tree: Path) -> str:
    """Stack frames with paths relative to their package (no machine paths)."""
    return re.sub(r"\((?:[^ ;()]*/(?:site-packages|lib/python3\.\d+)/|" + re.escape(str(ROOT))
                  + "/|" + re.escape(str(tree)) + "/)", "(", frame_line)


def summary(folded: list[str], cpu_ms: float) -> tuple[str, str]:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    total = 0
    for line in folded:
        stack, count = line.rsplit(" ", 1)
        n, frames = int(count), stack.split(";")
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
        if not any(idle in frames[-1] for idle in IDLE):
            parts[next((name for name, keys in COMPONENTS if any(k in stack for k in keys)),
                       "other")] += n
    functions = [f"{100 * c / total:5.1f}% {100 * own[f] / total:5.1f}%  {f}"
                 for f, c in inclusive.most_common(90)]
    attributed = sum(parts.values()) or 1
    table = ["| component | share | CPU ms per request |", "|---|---|---|"]
    table += [f"| {name} | {100 * c / attributed:.1f}% | {cpu_ms * c / attributed:.2f} |"
              for name, c in parts.most_common()]
    return "\n".join(functions), "\n".join(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--telemetry", choices=("on", "off"), default="on")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "perf" / "profile")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the gateway's source tree")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    up_port, gw_port = free_port(), free_port()
    upstream, gateway = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    procs = [start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                   f"{upstream}/health")]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
            "policies": str(args.tree / "policies"), "auth": "off", "port": gw_port,
            "watch_policies": False}))
        try:
            procs.append(start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                                str(config)], f"{gateway}/healthz",
                               env={"SMALLFIRST_METRICS": str(args.telemetry == "on").lower()},
                               cwd=args.tree.resolve()))
            url = f"{gateway}/v1/chat/completions"
            asyncio.run(load(url, 3.0))  # warm up
            raw = Path(tmp) / "profile.raw"
            recorder = subprocess.Popen([spy, "record", "-p", str(procs[-1].pid), "-r", "250",
                                         "-d", str(int(args.seconds)), "-f", "raw", "-o",
                                         str(raw), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = cpu_seconds(procs[-1].pid) or 0.0
            sent = asyncio.run(load(url, args.seconds))
            cpu_ms = 1000 * ((cpu_seconds(procs[-1].pid) or 0.0) - before) / max(sent, 1)
            recorder.wait(args.seconds + 30)
            folded = [clean(line, args.tree.resolve())
                      for line in raw.read_text().splitlines() if line.strip()]
        finally:
            for proc in procs:
                proc.terminate()
    functions, table = summary(folded, cpu_ms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out.with_suffix(".folded.gz"), "wt") as out:
        out.write("\n".join(folded) + "\n")
    header = (f"# py-spy, 250 Hz, {args.seconds:.0f} s: the gateway process, small route, "
              f"telemetry {args.telemetry}, 6 in flight, {sent} requests, "
              f"{cpu_ms:.2f} ms CPU per request\n# inclusive% self%  function (file)\n")
    args.out.with_suffix(".txt").write_text(header + functions + "\n\n" + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
