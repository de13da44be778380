"""The small model down, restarting or shedding load (503), through a gateway process.

The policy decides: `escalate_on_small_error: true` (the default) sends everything to the
frontier with the reason `small_unavailable`; false fails fast with a 503 and Retry-After.
Either way the gateway goes back to the small model by itself once it answers again.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import (
    POLICIES,
    GatewayRunner,
    Process,
    free_port,
    script,
    upstream_config,
    wait_http,
)

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def small_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gateway(session_gateways: GatewayRunner, upstream: str, small_port: int,
            tmp_path_factory: pytest.TempPathFactory) -> str:
    policies = tmp_path_factory.mktemp("small-faults") / "policies"
    shutil.copytree(POLICIES, policies)
    failfast = yaml.safe_load((policies / "default.yaml").read_text())
    failfast.update(name="failfast", aliases=[], escalate_on_small_error=False,
                    confidence={"scorer": "accept_all"})
    (policies / "failfast.yaml").write_text(yaml.safe_dump(failfast))
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    auto["confidence"] = {"scorer": "accept_all"}
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    config = upstream_config(upstream, small_api_base=f"http://127.0.0.1:{small_port}/v1")
    return session_gateways.start(config, policies=policies)


@pytest.fixture
def small_model(small_port: int, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Starts a scripted upstream playing the small model on `small_port`; stopped after the
    test, so each test begins with the small model down."""
    started: list[Process] = []

    def start() -> None:
        log = tmp_path / "small.log"
        process = Process([sys.executable, "-m", "load.upstream", "--port", str(small_port)],
                          log)
        started.append(process)
        wait_http(f"http://127.0.0.1:{small_port}/health", process.proc, log)

    yield start
    for process in started:
        process.stop()


def post(base: str, model: str, text: str, *, stream: bool) -> httpx.Response:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT_S,
                          headers={"cache-control": "no-cache, no-store"})
    if stream and response.status_code == 200:
        assert response.text.rstrip().endswith("data: [DONE]")
    return response


def test_down_then_back(gateway: str, small_model: Callable[[], None]) -> None:
    for stream in (False, True):
        escalated = post(gateway, "auto", "hi", stream=stream)
        assert escalated.status_code == 200
        assert escalated.headers["x-smallfirst-route"] == "escalated"
        assert escalated.headers["x-smallfirst-escalation"] == "small_unavailable"

        failed = post(gateway, "failfast", "hi", stream=stream)
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "1"
        assert failed.json()["error"]["code"] == "model_unavailable"

    small_model()  # back: both policies use it again, with nothing to reset
    deadline = time.monotonic() + TIMEOUT_S
    while post(gateway, "failfast", "hi", stream=False).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not go back to the small model"
        time.sleep(0.2)
    for stream in (False, True):
        for model in ("auto", "failfast"):
            response = post(gateway, model, "hi", stream=stream)
            assert response.headers["x-smallfirst-route"] == "small"


def test_overloaded_503(gateway: str, small_model: Callable[[], None]) -> None:
    small_model()
    for stream in (False, True):
        key = uuid.uuid4().hex[:8]
        # The small model sheds the first attempt of each key; the frontier, retried, answers.
        shed = script(status=503, retry_after=7, fail_times=1, key=f"{key}-auto")
        escalated = post(gateway, "auto", "hi" + shed, stream=stream)
        assert escalated.status_code == 200
        assert escalated.headers["x-smallfirst-escalation"] == "small_unavailable"

        shed = script(status=503, retry_after=7, fail_times=1, key=f"{key}-fast")
        failed = post(gateway, "failfast", "hi" + shed, stream=stream)
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "7"  # the small model's own, passed on
        assert failed.json()["error"]["type"] == "server_error"
        assert post(gateway, "failfast", "hi" + shed, stream=stream).status_code == 200
