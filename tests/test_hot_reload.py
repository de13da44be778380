"""Policy hot reload on real gateway processes: file watcher, SIGHUP and the admin endpoint.

Each gateway serves its own copy of the policy directory; every test restores the files it
edits, so the gateways can be shared by the whole module.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import GatewayRunner, Process, script, upstream_config

WATCH_TIMEOUT_S = 10.0


@dataclass
class Served:
    base: str
    policies: Path
    process: Process

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=30)

    def admin(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/admin/policies")
        assert response.status_code == 200
        return response.json()

    def reload(self) -> httpx.Response:
        return httpx.post(f"{self.base}/admin/policies/reload")

    def model_ids(self) -> set[str]:
        return {m.id for m in self.client().models.list()}

    def ask(self, model: str, **script_fields: Any) -> httpx.Headers:
        """Headers of a non-streamed answer (a confident one unless the script says else)."""
        fields = {"text": "fine thanks", "key": f"reload-{uuid.uuid4().hex[:10]}", **script_fields}
        raw = self.client().chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi" + script(**fields)}]
        )
        raw.parse()
        return raw.headers


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRunner]:
    runner = GatewayRunner(tmp_path_factory.mktemp("reload"))
    yield runner
    runner.stop_all()


def serve(runner: GatewayRunner, upstream: str, **config: Any) -> Served:
    base = runner.start(upstream_config(upstream, **config))
    return Served(base, runner.last_policy_dir, runner.last_process)


@pytest.fixture(scope="module")
def watched(runner: GatewayRunner, upstream: str) -> Served:
    """Reloads on its own when a policy file changes."""
    return serve(runner, upstream, watch_policies=True)


@pytest.fixture(scope="module")
def manual(runner: GatewayRunner, upstream: str) -> Served:
    """Reloads only when told: SIGHUP or POST /admin/policies/reload."""
    return serve(runner, upstream, watch_policies=False)


@pytest.fixture
def edit(request: pytest.FixtureRequest) -> Iterator[Callable[[Path, str], None]]:
    """Write a policy file; the original content (or absence) is restored after the test."""
    originals: dict[Path, str | None] = {}

    def write(path: Path, text: str) -> None:
        originals.setdefault(path, path.read_text() if path.exists() else None)
        path.write_text(text)

    yield write
    for path, text in originals.items():
        if text is None:
            path.unlink()
        else:
            path.write_text(text)


def wait_until(check: Callable[[], Any], timeout: float = WATCH_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def restore(served: Served) -> None:
    """After `edit` put the files back: make the gateway serve them again."""
    assert served.reload().status_code == 200
    assert served.admin()["last_error"] is None


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"the shipped policy no longer contains {old!r}"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


# ---- a good edit takes effect without a restart ----------------------------------------------


def test_watcher_picks_up_a_new_alias(watched: Served, edit) -> None:
    chat = watched.policies / "chat.yaml"
    with pytest.raises(openai.NotFoundError):
        watched.ask("chat-next")
    edit(chat, chat.read_text() + "aliases: [chat-next]\n")
    assert wait_until(lambda: "chat-next" in watched.model_ids()), "watcher did not reload"
    headers = watched.ask("chat-next")
    assert headers["x-smallfirst-policy"] == "chat"
    assert watched.admin()["reloads"] >= 1


def test_watcher_picks_up_a_route_change(watched: Served, edit) -> None:
    auto = watched.policies / "default.yaml"
    assert watched.ask("auto")["x-smallfirst-route"] == "small"
    edit(auto, replaced(auto.read_text(), "route: cascade", "route: frontier_only"))
    assert wait_until(lambda: watched.ask("auto")["x-smallfirst-route"] == "frontier")


def test_sighup_reloads(manual: Served, edit) -> None:
    fast = manual.policies / "autocomplete.yaml"
    before = manual.admin()["reloads"]
    text = replaced(fast.read_text(), "aliases: [autocomplete]", "aliases: [autocomplete, tab]")
    edit(fast, text)
    # Without a watcher nothing changes on its own ...
    time.sleep(0.5)
    assert "tab" not in manual.model_ids()
    # ... until the signal.
    manual.process.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "tab" in manual.model_ids(), timeout=5)
    assert manual.admin()["reloads"] == before + 1
    assert manual.ask("tab")["x-smallfirst-policy"] == "fast"
    assert manual.process.proc.poll() is None  # SIGHUP reloads; it does not stop the server


def test_reload_endpoint_applies_a_route_change(manual: Served, edit) -> None:
    auto = manual.policies / "default.yaml"
    assert manual.ask("auto")["x-smallfirst-route"] == "small"
    edit(auto, replaced(auto.read_text(), "route: cascade", "route: frontier_only"))
    response = manual.reload()
    assert response.status_code == 200
    body = response.json()
    assert body["last_error"] is None
    assert {p["name"]: p["route"] for p in body["policies"]}["auto"] == "frontier_only"
    assert manual.ask("auto")["x-smallfirst-route"] == "frontier"


def test_a_new_policy_file_is_served_after_reload(manual: Served, edit) -> None:
    edit(manual.policies / "batch.yaml", "name: batch\nroute: small_only\n")
    assert manual.reload().status_code == 200
    headers = manual.ask("batch", logprob=-5)  # unsure, yet small_only never escalates
    assert headers["x-smallfirst-policy"] == "batch"
    assert headers["x-smallfirst-route"] == "small"


# ---- a bad edit is rejected and the last good policies keep serving --------------------------

BAD_EDITS: dict[str, tuple[str, Callable[[str], str], str, str]] = {
    # name: (file, edit, the line the error must point at, what the error says)
    "invalid-yaml": (
        "chat.yaml",
        lambda text: replaced(text, "mode: holdback", "mode: holdback: now"),
        "mode: holdback", "invalid YAML",
    ),
    "value-out-of-range": (
        "chat.yaml",
        lambda text: replaced(text, "threshold: 0.55", "threshold: 7"),
        "threshold: 7", "confidence.threshold: Input should be less than or equal to 1",
    ),
    "unknown-setting": (
        "chat.yaml",
        lambda text: replaced(text, "  holdback_ms: 300", "  holdback_ms: 300\n  hold_forever: 1"),
        "hold_forever", "streaming.hold_forever: Extra inputs are not permitted",
    ),
    "bad-mode": (
        "chat.yaml",
        lambda text: replaced(text, "mode: holdback", "mode: telepathy"),
        "mode: telepathy", "streaming.mode",
    ),
    "zero-deadline": (
        "chat.yaml",
        lambda text: replaced(text, "small_ttft: 500", "small_ttft: 0"),
        "small_ttft: 0", "latency_budget.small_ttft: Input should be greater than 0",
    ),
    "infinite-deadline": (
        "chat.yaml",
        lambda text: replaced(text, "escalation: 20000", "escalation: .inf"),
        "escalation: .inf", "latency_budget.escalation: Input should be a finite number",
    ),
    "absurd-size": (
        "chat.yaml",
        lambda text: replaced(text, "holdback_tokens: 12", "holdback_tokens: 1000000000"),
        "holdback_tokens: 1000000000",
        "streaming.holdback_tokens: Input should be less than or equal to 4096",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_reload_endpoint_rejects_a_bad_edit(manual: Served, edit, case: str) -> None:
    name, change, needle, message = BAD_EDITS[case]
    path = manual.policies / name
    good = manual.admin()
    edit(path, change(path.read_text()))
    line = line_of(path.read_text(), needle)

    response = manual.reload()
    assert response.status_code == 422
    (problem,) = response.json()["last_error"]
    assert problem.startswith(f"{path}:{line}: "), problem
    assert message in problem

    status = manual.admin()
    assert status["last_error"] == [problem]
    assert status["reloads"] == good["reloads"]
    assert status["policies"] == good["policies"]  # the old set keeps serving
    headers = manual.ask(path.stem)
    assert headers["x-smallfirst-policy"] == path.stem
    assert headers["x-smallfirst-route"] == "small"
    ready = httpx.get(f"{manual.base}/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["policies"] is False


def test_a_duplicate_name_is_rejected(manual: Served, edit) -> None:
    extra = manual.policies / "zz-copy.yaml"
    edit(extra, "name: copycat\naliases: [auto]\n")
    response = manual.reload()
    assert response.status_code == 422
    (problem,) = response.json()["last_error"]
    assert problem.startswith(f"{extra}:1: ") and "'auto' is already used" in problem
    assert manual.ask("auto")["x-smallfirst-policy"] == "auto"
    assert "copycat" not in manual.model_ids()


def test_removing_the_default_policy_is_rejected(manual: Served, edit) -> None:
    default = manual.policies / "default.yaml"
    edit(default, replaced(default.read_text(), "name: auto", "name: automatic"))
    response = manual.reload()
    assert response.status_code == 422
    assert "default policy 'auto' missing" in response.json()["last_error"][0]
    assert manual.ask("auto")["x-smallfirst-policy"] == "auto"


def test_watcher_rejects_a_bad_edit_and_keeps_serving(watched: Served, edit) -> None:
    chat = watched.policies / "chat.yaml"
    edit(chat, replaced(chat.read_text(), "threshold: 0.55", "threshold: -1"))
    line = line_of(chat.read_text(), "threshold: -1")
    errors = wait_until(lambda: watched.admin()["last_error"])
    assert errors, "the watcher did not report the bad edit"
    assert re.match(rf"{re.escape(str(chat))}:{line}: confidence\.threshold: ", errors[0])
    assert watched.ask("chat")["x-smallfirst-policy"] == "chat"


@pytest.fixture(autouse=True)
def clean_slate(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test (and after `edit` restored the files) reload both gateways."""
    yield
    for name in ("manual", "watched"):
        if name in request.fixturenames:
            served: Served = request.getfixturevalue(name)
            restore(served)
