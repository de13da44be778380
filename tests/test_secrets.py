"""Secrets never leave the process: provider keys, tenant keys, the small model's key, the
Redis password and a wrong key a client sent appear in no log line, error body, admin answer,
metric, trace or decision-log row."""

from __future__ import annotations

import gzip
import json
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import redis
import yaml

from tests.conftest import (
    POLICIES,
    GatewayRunner,
    RedisServer,
    free_port,
    script,
    upstream_config,
)

FRONTIER_KEY = "sk-frontier-SECRET-4f1c9a"
TENANT_KEY = "sk-tenant-SECRET-77b2e0"
ADMIN_KEY = "sk-admin-SECRET-19d3aa"
WRONG_KEY = "sk-wrong-SECRET-c0ffee"
SECRETS = (FRONTIER_KEY, TENANT_KEY, ADMIN_KEY, WRONG_KEY)


def test_no_sink_ever_holds_a_secret(session_gateways: GatewayRunner, upstream: str,
                                     tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"acme": {"keys": [TENANT_KEY]},
                                                "ops": {"keys": [ADMIN_KEY], "admin": True}}}))
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    auto["learning"] = {"log_sample_rate": 1.0, "log_escalations": True, "log_text": True}
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    decisions = tmp_path / "decisions.jsonl"
    config = upstream_config(upstream, auth="on", api_keys_file=str(keys),
                             decision_log=str(decisions))
    config["frontier_api_key"] = FRONTIER_KEY
    base = session_gateways.start(config, policies=policies)

    def chat(key: str, text: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "auto", "messages": [{"role": "user", "content": text}]})

    answers = [
        chat(TENANT_KEY, "hello" + script(key="sec-ok")),
        chat(TENANT_KEY, "unsure" + script(logprob=-4, key="sec-escalate")),
        chat(TENANT_KEY, "broken" + script(status=500, key="sec-fail")),
        chat(WRONG_KEY, "who am I"),
        chat(f"{TENANT_KEY}x", "almost"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 502, 401, 401]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    sinks = {f"response {n}": a.text + json.dumps(dict(a.headers))
             for n, a in enumerate(answers)}
    for path in ("/admin/policies", "/admin/budget", "/metrics", "/v1/models"):
        sinks[path] = httpx.get(base + path, headers=admin, timeout=30).text
    session_gateways.last_process.stop()  # flush the logs and the decision log
    sinks["gateway log"] = session_gateways.last_process.log.read_text()
    sinks["decision log"] = decisions.read_text() if decisions.exists() else ""
    assert sinks["decision log"], "the decision log recorded nothing"
    assert '"route"' in sinks["gateway log"]  # the access log is on
    for sink, text in sinks.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {sink}"
            assert secret.split("SECRET-")[1] not in text, f"part of {secret} in {sink}"


SMALL_KEY = "sk-small-SECRET-5e5e11"
REDIS_PASSWORD = "redis-pw-SECRET-a11ce5"
WRONG_REDIS_PASSWORD = "redis-pw-SECRET-bad0bad"
MORE_SECRETS = (*SECRETS, SMALL_KEY, REDIS_PASSWORD, WRONG_REDIS_PASSWORD)


class RawOTLP:
    """An OTLP/HTTP receiver that keeps every export's raw bytes (strings travel as UTF-8)."""

    def __init__(self) -> None:
        self.exports: list[bytes] = []
        received = self.exports

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append(body)
                self.send_response(200)  # an empty protobuf message is a valid reply
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_traces_redis_and_the_small_model_key_leak_nowhere(
        gateways: GatewayRunner, upstream: str, redis_server: RedisServer, tmp_path: Path) -> None:
    """The same greps, over more sinks: OTLP traces and metrics (with prompt text recorded),
    a Redis password in the cache URL (also a wrong one, refused at start-up), and the small
    model's key."""
    admin_client = redis.Redis.from_url(redis_server.url)
    admin_client.execute_command("ACL", "SETUSER", "sf-secrets", "on", f">{REDIS_PASSWORD}",
                                 "~*", "&*", "+@all")
    admin_client.close()
    url = f"redis://sf-secrets:{{}}@127.0.0.1:{redis_server.port}/0"
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"acme": {"keys": [TENANT_KEY]},
                                                "ops": {"keys": [ADMIN_KEY], "admin": True}}}))
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    auto["telemetry"] = {"record_content": True}
    auto["cache"] = {"lookup_deadline_ms": 3000}
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    otlp = RawOTLP()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_METRIC_EXPORT_INTERVAL": "500"}
    config = upstream_config(upstream, auth="on", api_keys_file=str(keys),
                             redis_url=url.format(REDIS_PASSWORD), small_api_key=SMALL_KEY,
                             cache_prefix=f"secrets-{uuid.uuid4().hex[:6]}")
    config["frontier_api_key"] = FRONTIER_KEY
    base = gateways.start(config, policies=policies, env=env)

    def chat(key: str, text: str, **extra: object) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "auto", "messages": [{"role": "user", "content": text}],
                                **extra})

    answers = [
        chat(TENANT_KEY, "How do I reverse a list in Python?" + script(key="sec2-ok")),
        chat(TENANT_KEY, "unsure" + script(logprob=-4, key="sec2-escalate"), stream=True),
        chat(TENANT_KEY, "broken" + script(status=401, key="sec2-denied")),
        chat(TENANT_KEY, "broken" + script(status=500, key="sec2-fail"), stream=True),
        chat(WRONG_KEY, "who am I"),
    ]
    time.sleep(0.5)  # the first answer's cache write, then an exact and a semantic hit
    answers.append(chat(TENANT_KEY, "How do I reverse a list in Python?" + script(key="sec2-ok")))
    answers.append(chat(TENANT_KEY, "how do i reverse a list in python" + script(key="sec2-ok")))
    assert [a.status_code for a in answers[:3]] == [200, 200, 502]  # upstream 401: ours
    assert answers[4].status_code == 401
    assert answers[5].headers["x-smallfirst-route"] == "cache_exact"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    sinks = {f"response {n}": a.text + json.dumps(dict(a.headers))
             for n, a in enumerate(answers)}
    for path in ("/admin/policies", "/admin/budget", "/metrics", "/readyz"):
        sinks[path] = httpx.get(base + path, headers=admin, timeout=30).text
    gateways.last_process.stop()  # the exporters flush at shutdown
    sinks["gateway log"] = gateways.last_process.log.read_text()
    sinks["OTLP exports"] = b"".join(otlp.exports).decode("utf-8", "replace")
    otlp.server.shutdown()
    assert "How do I reverse a list" in sinks["OTLP exports"]  # spans with content arrived
    assert "smallfirst.requests" in sinks["OTLP exports"]  # and metrics

    refused = {**config, "redis_url": url.format(WRONG_REDIS_PASSWORD)}
    try:
        gateways.start(refused, policies=policies)
    except RuntimeError as exc:  # start-up refused: its message quotes the log
        sinks["refused start-up"] = str(exc)
    sinks["refused gateway log"] = gateways.last_process.log.read_text()
    for sink, text in sinks.items():
        for secret in MORE_SECRETS:
            assert secret not in text, f"{secret} in {sink}"
            assert secret.split("SECRET-")[1] not in text, f"part of {secret} in {sink}"
