"""Security promises on a real gateway process: every route's auth, admin-only endpoints, keys
revoked by editing the keys file, no client-chosen upstream URL or header ever reaching a
backend, and sanitised request ids."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import GatewayRunner, Process, free_port, script, upstream_config
from tests.test_fuzz import assert_openai_error

KEYS = {"acme": {"keys": ["sk-acme"]}, "globex": {"keys": ["sk-globex"]},
        "ops": {"keys": ["sk-ops"], "admin": True}}
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Secured:
    base: str
    keys: Path
    process: Process

    def call(self, method: str, path: str, key: str | None = None,
             headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
        auth = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.base + path, headers={**auth, **(headers or {})},
                             timeout=30, **kwargs)  # type: ignore[arg-type]

    def write_keys(self, tenants: dict) -> None:
        self.keys.write_text(yaml.safe_dump({"tenants": tenants}))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Secured]:
    runner = GatewayRunner(tmp_path_factory.mktemp("secured"))
    keys = runner.workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": KEYS}))
    base = runner.start(upstream_config(upstream, auth="on", api_keys_file=str(keys)))
    yield Secured(base, keys, runner.last_process)
    runner.stop_all()


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("GET", "/admin/policies"),
             ("GET", "/admin/budget"), ("POST", "/admin/policies/reload")]
ADMIN_ONLY = [route for route in PROTECTED if route[1].startswith("/admin")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("key", [None, "sk-wrong", "sk-acm", "sk-acmee", "SK-ACME",
                                 "sha256:" + "0" * 64])
def test_every_protected_route_refuses_a_missing_or_wrong_key(
        secured: Secured, method: str, path: str, key: str | None) -> None:
    response = secured.call(method, path, key, json=CHAT)
    assert response.status_code == 401
    assert_openai_error(response)
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_admin_endpoints_need_an_admin_key(secured: Secured, method: str, path: str) -> None:
    refused = secured.call(method, path, "sk-acme")
    assert refused.status_code == 403
    assert_openai_error(refused)
    assert secured.call(method, path, "sk-ops").status_code == 200


def test_tenant_keys_serve_and_open_routes_stay_open(secured: Secured) -> None:
    for key in ("sk-acme", "sk-globex", "sk-ops"):
        assert secured.call("POST", "/v1/chat/completions", key, json=CHAT).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert secured.call("GET", path).status_code == 200


def test_a_revoked_key_stops_working_without_a_restart(secured: Secured) -> None:
    temp = {"temp": {"keys": ["sk-temp"]}}
    secured.write_keys({**KEYS, **temp})
    assert eventually(lambda: secured.call("GET", "/v1/models", "sk-temp").status_code) == 200

    secured.write_keys(KEYS)  # revoked
    assert eventually(lambda: secured.call("GET", "/v1/models", "sk-temp").status_code,
                      want=401) == 401
    assert secured.call("GET", "/v1/models", "sk-acme").status_code == 200

    secured.keys.write_text("tenants: [not: a mapping\n")  # a broken edit: the last good keys
    time.sleep(1.5)  # past the once-a-second check
    assert secured.call("GET", "/v1/models", "sk-acme").status_code == 200
    assert secured.call("GET", "/v1/models", "sk-temp").status_code == 401
    assert "API keys file rejected" in secured.process.log.read_text()
    secured.write_keys(KEYS)


def eventually(probe: object, want: int = 200, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()  # type: ignore[operator]
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


# ---- no server-side request forgery, no header injection -------------------------------------


@dataclass
class Trap:
    """A listener no request may ever reach: it counts every connection it accepts."""

    port: int = field(default_factory=free_port)
    hits: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    self.hits.append(conn.recv(4096))
                except OSError:
                    self.hits.append(b"")


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    listener = Trap()
    yield listener
    listener.sock.close()


INJECTED = "INJECTED-ANSWER"


def forgeries(trap: Trap) -> dict[str, dict]:
    url = f"http://127.0.0.1:{trap.port}/v1"
    header = {"x-upstream-script": json.dumps({"text": INJECTED}), "authorization": "Bearer x"}
    return {
        "api_base": {"api_base": url},
        "base_url": {"base_url": url},
        "api_key": {"api_key": "sk-attacker", "api_base": url},
        "extra_headers": {"extra_headers": header},
        "headers": {"headers": header},
        "extra_body": {"extra_body": {"api_base": url, "messages": [
            {"role": "user", "content": "x" + script(text=INJECTED)}]}},
        "custom_llm_provider": {"custom_llm_provider": "openai", "api_base": url},
        "metadata": {"metadata": {"api_base": url}, "litellm_params": {"api_base": url}},
        "mock_response": {"mock_response": INJECTED},
        "in-a-message": {"messages": [{"role": "user", "content": "hi", "api_base": url}]},
    }


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["auto", "frontier-stand-in", "small-stand-in"])
def test_no_client_field_redirects_or_injects_into_a_backend(
        secured: Secured, trap: Trap, upstream: str, model: str, stream: bool) -> None:
    for name, fields in forgeries(trap).items():
        key = f"ssrf-{uuid.uuid4().hex[:8]}"
        body = {"model": model, "stream": stream,
                "messages": [{"role": "user", "content": "hi" + script(key=key)}], **fields}
        response = secured.call("POST", "/v1/chat/completions", "sk-acme", json=body,
                                headers={"x-upstream-script": json.dumps({"text": INJECTED})})
        assert response.status_code == 200, (name, response.text[:300])
        assert INJECTED not in response.text, name
        if name != "in-a-message":  # that one replaces the message holding the script key
            assert httpx.get(f"{upstream}/stats").json()["keys"].get(key) == 1, name
    assert trap.hits == []


def test_a_model_name_cannot_pick_a_provider_or_url(secured: Secured, trap: Trap) -> None:
    for model in (f"http://127.0.0.1:{trap.port}/v1", "openai/gpt-4o",
                  f"hosted_vllm/x?api_base=http://127.0.0.1:{trap.port}", "../small-stand-in"):
        response = secured.call("POST", "/v1/chat/completions", "sk-acme",
                                json={**CHAT, "model": model})
        assert response.status_code == 404, model
        assert_openai_error(response)
    assert trap.hits == []


# ---- request ids -----------------------------------------------------------------------------


def raw_request_id(base: str, header: bytes) -> tuple[bytes, list[bytes]]:
    """(status line, x-request-id values) of a GET /healthz with a raw `x-request-id` line."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"x-request-id: " + header + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert not any(line.lower().startswith((b"x-injected", b"set-cookie")) for line in head)
    return head[0], [line.split(b":", 1)[1].strip() for line in head
                     if line.lower().startswith(b"x-request-id:")]


@pytest.mark.parametrize("given", [
    b"abc\rx-injected: 1", b"abc\nx-injected: 1", b"a" * 65, b"semi;colon", b"sp ace",
    b"caf\xc3\xa9", b"<script>", b"", b"\x00nul", b"%0d%0aset-cookie:x"])
def test_a_hostile_request_id_is_replaced(secured: Secured, given: bytes) -> None:
    status, ids = raw_request_id(secured.base, given)
    if status.startswith(b"HTTP/1.1 400"):
        return  # the HTTP parser refused the line outright: nothing was echoed
    assert status.startswith(b"HTTP/1.1 200"), status
    (echoed,) = ids
    assert echoed != given and len(echoed) == 32 and echoed.isalnum()


def test_a_sane_request_id_is_echoed(secured: Secured) -> None:
    given = b"req-2024.07_ABC" + b"9" * 49  # 64 characters, the limit
    assert raw_request_id(secured.base, given) == (b"HTTP/1.1 200 OK", [given])
