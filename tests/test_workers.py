"""Several workers on one port (`workers: 2`): both serve, `/metrics` counts every request
whichever worker answers the scrape, rate limits hold across workers through Redis, SIGHUP
reaches every worker, a killed worker is replaced, SIGTERM drains them all.

One 2-worker gateway serves the module (each worker takes seconds to import); the SIGTERM test
stops it, so it comes last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.workers import RESTARTS, Supervisor, listen
from gateway.config import ConfigError
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.worker_metrics import WorkerExposition
from tests.conftest import GatewayRunner, Process, free_port, script, upstream_config, write

KEY, LIMITED_KEY = "sk-workers", "sk-workers-limited"
LIMIT = 10  # requests a minute for the limited tenant
AUTH = {"authorization": f"Bearer {KEY}"}


def scraped(base: str, family: str) -> list:
    """One metric family's samples, from one scrape of the shared port."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return [sample for found in text_string_to_metric_families(text) if found.name == family
            for sample in found.samples]


def per_worker(samples: list) -> dict[str, float]:
    totals: dict[str, float] = {}
    for sample in samples:
        worker = sample.labels["worker"]
        totals[worker] = totals.get(worker, 0) + sample.value
    return totals


def requests_by_worker(base: str) -> dict[str, float]:
    """`smallfirst_requests_total` summed per worker."""
    return per_worker(scraped(base, "smallfirst_requests"))


def workers_of(supervisor: int) -> dict[int, str]:
    """The supervisor's worker processes: pid -> slot (from their command lines)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    out = {}
    for pid in map(int, children):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker" in argv:  # not a dead one, not yet reaped
            out[pid] = argv[argv.index(b"--worker") + 1].decode().split(",")[0]
    return out


def wait_for(condition, timeout: float = 90, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def ask(base: str, n: int, text: str) -> list[str]:
    """n chat completions through the official client, each on a new connection (a new
    connection is what the kernel hands to one worker or the other)."""
    def one(i: int) -> str:
        with OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            reply = c.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"{text} {i}"}],
                extra_headers={"cache-control": "no-cache, no-store"})
        return reply.choices[0].message.content or ""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, upstream: str,
                redis_url: str) -> Iterator[tuple[str, Process]]:
    """The base URL and the supervisor of a 2-worker gateway with Redis, both workers up."""
    folder = tmp_path_factory.mktemp("workers")
    keys = write(folder / "keys.yaml", f"""
        tenants:
          open: {{keys: [{KEY}]}}
          limited: {{keys: [{LIMITED_KEY}], limits: {{requests_per_minute: {LIMIT}}}}}
        """)
    runner = GatewayRunner(folder)
    base = runner.start(upstream_config(
        upstream, workers=2, shutdown_drain_s=1, auth="on", api_keys_file=str(keys),
        redis_url=redis_url, cache_semantic=False, cache_prefix=f"workers-{free_port()}"))
    supervisor = runner.last_process
    wait_for(lambda: len(workers_of(supervisor.proc.pid)) == 2, what="2 workers")
    wait_for(lambda: all(f'worker="{slot}"' in httpx.get(f"{base}/metrics", timeout=10).text
                         for slot in "01"), what="both workers in /metrics")
    yield base, supervisor
    runner.stop_all()


def test_both_workers_serve_and_metrics_count_every_request(
        two_workers: tuple[str, Process]) -> None:
    base, supervisor = two_workers
    assert len(set(workers_of(supervisor.proc.pid))) == 2  # two processes, distinct pids
    before = sum(requests_by_worker(base).values())
    answers = ask(base, 40, "count me")
    assert len(answers) == 40 and all(answers)
    # Every scrape, whichever worker answers it, counts exactly the requests sent (the wait
    # only covers a worker too starved to answer a scrape within its second).
    wait_for(lambda: sum(requests_by_worker(base).values()) == before + 40, timeout=20,
             what="the total reaching the requests sent")
    scrapes = [requests_by_worker(base) for _ in range(8)]
    assert all(sum(s.values()) == before + 40 for s in scrapes), scrapes
    assert all(scrapes[-1].get(w, 0) > 0 for w in ("0", "1")), scrapes[-1]  # both served


def test_rate_limits_hold_across_workers_through_redis(
        two_workers: tuple[str, Process]) -> None:
    base, _ = two_workers
    before = refusals_by_worker(base)

    def one(i: int) -> int:
        body = {"model": "auto", "messages": [{"role": "user", "content": f"limited {i}"}]}
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {LIMITED_KEY}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(3 * LIMIT)))
    assert codes.count(200) == LIMIT and codes.count(429) == 2 * LIMIT, codes
    # Both workers refused some: each alone would have admitted up to the limit.
    wait_for(lambda: sum(refusals_by_worker(base).values()) - sum(before.values()) == 2 * LIMIT,
             timeout=20, what="the refusals counted")
    after = refusals_by_worker(base)
    assert all(after.get(w, 0) > before.get(w, 0) for w in ("0", "1")), (before, after)


def refusals_by_worker(base: str) -> dict[str, float]:
    """Rate-limit refusals counted in Redis, per worker."""
    samples = scraped(base, "smallfirst_rate_limited")
    for sample in samples:
        assert sample.labels["counted"] == "redis"
    return per_worker(samples)


def test_sighup_reloads_the_policies_in_every_worker(two_workers: tuple[str, Process]) -> None:
    _, supervisor = two_workers
    workers = workers_of(supervisor.proc.pid)
    reloads = supervisor.log.read_text().count("policies reloaded")
    os.kill(supervisor.proc.pid, signal.SIGHUP)
    wait_for(lambda: supervisor.log.read_text().count("policies reloaded") == reloads + 2,
             timeout=30, what="both workers reloading")
    assert workers_of(supervisor.proc.pid) == workers and supervisor.proc.poll() is None


def test_a_killed_worker_is_replaced(two_workers: tuple[str, Process]) -> None:
    base, process = two_workers
    supervisor = process.proc.pid
    first = workers_of(supervisor)
    victim = next(pid for pid, slot in first.items() if slot == "1")
    os.kill(victim, signal.SIGKILL)
    # The survivor keeps serving the port meanwhile: nothing queued is lost.
    assert all(ask(base, 8, "while one is down"))
    wait_for(lambda: len(workers_of(supervisor)) == 2 and victim not in workers_of(supervisor),
             what="a replacement worker")
    assert sorted(workers_of(supervisor).values()) == ["0", "1"]
    # The replacement counts from zero under the same label (a counter reset to Prometheus).
    wait_for(lambda: requests_by_worker(base).get("1", 0) == 0, timeout=90,
             what="the replacement's own series")
    wait_for(lambda: (ask(base, 8, "after the replacement")
                      and requests_by_worker(base).get("1", 0) > 0), timeout=90,
             what="the replacement serving")
    assert process.proc.poll() is None


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
        two_workers: tuple[str, Process]) -> None:
    base, supervisor = two_workers
    process = supervisor.proc
    pids = list(workers_of(process.pid))
    slow = script(tokens_per_s=10, output_tokens=20)  # about 2 s each

    def plain(i: int) -> int:
        body = {"model": "auto", "messages": [{"role": "user", "content": f"drain {i}{slow}"}]}
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60,
                          headers={"cache-control": "no-cache, no-store", **AUTH}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = [pool.submit(plain, i) for i in range(8)]
        wait_for(lambda: _in_flight(base) > 0, timeout=30, what="requests in flight")
        process.terminate()
        assert [c.result() for c in codes] == [200] * 8
    assert process.wait(60) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert supervisor.log.read_text().count("Application shutdown complete") == 2


def _in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "smallfirst_requests_in_flight" for s in f.samples)


# ---- the supervisor and the merged exposition, with stand-in worker commands ---------------


def supervise(code: int) -> int:
    sock = listen("127.0.0.1", free_port())
    try:
        return Supervisor(lambda slot, fd, folder: [sys.executable, "-c",
                                                    f"import sys; sys.exit({code})"],
                          2, sock, grace_s=5).run()
    finally:
        sock.close()


def test_workers_that_keep_dying_stop_the_supervisor_with_an_error() -> None:
    assert RESTARTS > 1
    assert supervise(1) == 1


def test_a_worker_refusing_its_configuration_stops_the_supervisor_with_status_2() -> None:
    assert supervise(2) == 2


def worker_metrics(folder: Path, slots: int) -> list[Metrics]:
    """In-process stand-ins for the workers' metrics, each with a request or more counted."""
    out = []
    for slot in range(slots):
        metrics = Metrics(env={})
        metrics.requests.add(slot + 1, {"policy": "auto", "route": "small"})
        metrics.duration.record(0.1, {"policy": "auto"})
        metrics.workers = WorkerExposition(metrics.registry, folder, slot)
        metrics.workers.start()
        out.append(metrics)
    return out


async def test_a_scrape_gets_every_worker_s_figures_as_of_the_scrape(tmp_path: Path) -> None:
    metrics = worker_metrics(tmp_path, 3)
    metrics[2].requests.add(5, {"policy": "auto", "route": "small"})  # after its first write
    text = (await metrics[0].exposition()).decode()
    assert text.count("# TYPE smallfirst_requests_total counter") \
        + text.count("# TYPE smallfirst_requests counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {s.labels["worker"]: s.value for s in families["smallfirst_requests"].samples}
    assert counts == {"0": 1.0, "1": 2.0, "2": 8.0}
    buckets = [s for s in families["smallfirst_request_duration_seconds"].samples
               if s.name.endswith("_count")]
    assert sorted(s.labels["worker"] for s in buckets) == ["0", "1", "2"]
    for m in metrics:
        m.workers.stop()


def dead_pid() -> int:
    import subprocess

    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    return gone.pid


async def test_a_dead_worker_s_last_figures_are_served_without_waiting_for_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = worker_metrics(tmp_path, 1)[0]
    (tmp_path / "worker-1.prom").write_text(
        f"# smallfirst worker pid={dead_pid()} scrape=0\n"
        "# HELP smallfirst_requests_total Requests\n# TYPE smallfirst_requests_total counter\n"
        'smallfirst_requests_total{policy="auto"} 7.0\n')
    text = (await metrics.exposition()).decode()
    assert 'smallfirst_requests_total{worker="1",policy="auto"} 7.0' in text
    assert "did not answer" not in caplog.text
    metrics.workers.stop()


def test_workers_come_from_the_file_the_environment_and_the_flag(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tooling import cli

    def settings(*argv: str) -> int:
        return cli._serve_settings(cli.build_parser().parse_args(["serve", *argv])).workers

    assert settings() == 1
    config = tmp_path / "config.yaml"
    config.write_text("workers: 3\n")
    assert settings("--config", str(config)) == 3
    clean_env.setenv("SMALLFIRST_WORKERS", "4")
    assert settings("--config", str(config)) == 4
    assert settings("--config", str(config), "--workers", "2") == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--workers", bad])
    clean_env.setenv("SMALLFIRST_WORKERS", "0")
    with pytest.raises(ConfigError, match="workers"):
        settings()


def test_a_scrape_while_the_watcher_writes_is_served(tmp_path: Path) -> None:
    metrics = worker_metrics(tmp_path, 1)[0]
    exposition = metrics.workers
    writer = ThreadPoolExecutor(1).submit(lambda: [exposition.write(n) for n in range(200)])
    scrapes = [asyncio.run(metrics.exposition()) for _ in range(200)]
    writer.result()
    assert all(b'worker="0"' in text for text in scrapes)
    exposition.stop()


async def test_without_the_shared_folder_a_scrape_serves_this_worker_alone(
        tmp_path: Path) -> None:
    import shutil

    shared = tmp_path / "shared"
    shared.mkdir()
    metrics = worker_metrics(shared, 1)[0]
    shutil.rmtree(shared)
    text = (await metrics.exposition()).decode()
    assert 'smallfirst_requests_total{worker="0",' in text
    metrics.workers.stop()
