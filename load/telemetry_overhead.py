"""What tracing and metrics cost per request, measured side by side in one run.

    python -m load.telemetry_overhead [--requests 400] [--concurrency 4] [--stream]

Starts the scripted upstream (instant answers, so the gateway's own work is what is left), a
dummy OTLP receiver (answers every export with 200 and drops it), and two gateways on the same
upstream and policies:

- off: `SMALLFIRST_METRICS=false` and no `OTEL_*` endpoint (no tracer, no meter);
- on:  metrics on, exported over OTLP and scraped from `/metrics` every `--scrape-interval`
       seconds as Prometheus would, and traces exported over OTLP/HTTP (batch processor).

The same requests (policy `auto`: small route, confidence scored) go through both, interleaved
in rounds so machine noise hits both alike. Prints p50/p90/p99 in ms and each gateway's CPU
time per request, with the difference and the ratio on/off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from load.harness import ROOT, free_port, percentiles, poster, start, timed
from load.overhead import BODY


def serve_dummy_receiver(port: int) -> None:
    """An OTLP/HTTP endpoint that accepts and drops everything (its own process)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


async def scrape(client: httpx.AsyncClient, url: str, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(httpx.HTTPError):
            await client.get(url)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def compare(
    gateways: dict[str, str], pids: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Latency samples per gateway, and its CPU milliseconds per measured request."""
    rounds, per_round = 8, max(1, args.requests // 8)
    results: dict[str, list[float]] = {name: [] for name in gateways}
    cpu: dict[str, float] = {name: 0.0 for name in gateways}
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        senders = {name: poster(client, f"{base}/v1/chat/completions", BODY, args.stream)
                   for name, base in gateways.items()}
        scraper = None
        if args.scrape_interval > 0:
            scraper = asyncio.create_task(
                scrape(client, f"{gateways['on']}/metrics", args.scrape_interval))
        try:
            for send in senders.values():  # warm up connections and lazy imports
                await timed(20, args.concurrency, send)
            for i in range(rounds):
                order = list(senders.items())
                for name, send in order if i % 2 == 0 else reversed(order):
                    before = cpu_seconds(pids[name])
                    results[name] += await timed(per_round, args.concurrency, send)
                    after = cpu_seconds(pids[name])
                    if before is not None and after is not None:
                        cpu[name] += after - before
        finally:
            if scraper is not None:
                scraper.cancel()
    return results, {name: 1000 * cpu[name] / len(results[name]) for name in gateways}


def report(
    results: dict[str, list[float]], cpu_ms: dict[str, float], args: argparse.Namespace
) -> None:
    stats = {name: percentiles(samples) for name, samples in results.items()}
    mode = "streamed" if args.stream else "non-streamed"
    print(f"{mode} chat through the gateway (small route), concurrency {args.concurrency}, "
          f"{stats['on']['n']} requests each, ms per request")
    print(f"{'':36}{'p50':>8}{'p90':>8}{'p99':>8}{'CPU/req':>9}")
    labels = {"off": "telemetry off", "on": "metrics + OTLP traces and metrics"}
    for name, label in labels.items():
        s = stats[name]
        print(f"{label:36}{s['p50']:8.2f}{s['p90']:8.2f}{s['p99']:8.2f}{cpu_ms[name]:9.2f}")
    diff = {q: stats["on"][q] - stats["off"][q] for q in ("p50", "p90", "p99")}
    ratio = {q: stats["on"][q] / stats["off"][q] for q in ("p50", "p90", "p99")}
    cpu_diff, cpu_ratio = cpu_ms["on"] - cpu_ms["off"], cpu_ms["on"] / max(cpu_ms["off"], 1e-9)
    print(f"{'on - off':36}{diff['p50']:8.2f}{diff['p90']:8.2f}{diff['p99']:8.2f}"
          f"{cpu_diff:9.2f}")
    print(f"{'on / off':36}{ratio['p50']:7.2f}x{ratio['p90']:7.2f}x{ratio['p99']:7.2f}x"
          f"{cpu_ratio:8.2f}x")
    print("CPU/req: the gateway process's CPU ms per request (all its threads, exporters "
          "included); steadier than latency on a busy machine.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between /metrics scrapes of the 'on' gateway (0: none)")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.receiver:
        serve_dummy_receiver(args.receiver)
        return
    up_port, otlp_port = free_port(), free_port()
    upstream, receiver = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{otlp_port}"
    procs = [
        start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
               f"{upstream}/health"),
        start([sys.executable, "-m", "load.telemetry_overhead", "--receiver", str(otlp_port)],
               f"{receiver}/"),
    ]
    envs = {
        "off": {"SMALLFIRST_METRICS": "false"},
        "on": {"SMALLFIRST_METRICS": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver},
    }
    gateways: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, env in envs.items():
                port = free_port()
                config = Path(tmp) / f"{name}.yaml"
                config.write_text(yaml.safe_dump({
                    "small_model": "hosted_vllm/small-stand-in",
                    "small_api_base": f"{upstream}/v1", "policies": str(ROOT / "policies"),
                    "auth": "off", "port": port, "watch_policies": False,
                }))
                gateways[name] = f"http://127.0.0.1:{port}"
                procs.append(start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                                     str(config)], f"{gateways[name]}/healthz", env))
                pids[name] = procs[-1].pid
            if httpx.get(f"{gateways['off']}/metrics").status_code != 404:
                raise SystemExit("the 'off' gateway still serves /metrics")
            report(*asyncio.run(compare(gateways, pids, args)), args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
