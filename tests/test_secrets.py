"""Secrets never leave the process: provider keys, tenant keys and a wrong key a client sent
appear in no log line, error body, admin answer, metric or decision-log row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import yaml

from tests.conftest import POLICIES, GatewayRunner, script, upstream_config

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
