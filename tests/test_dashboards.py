"""The Grafana dashboards: schema-valid, and every panel's PromQL returns data.

A real Prometheus (Debian's `prometheus` package; `make test` installs it) scrapes a real
gateway every second while a short load covers the routes (small, escalated, frontier, an
error, and a cache hit when the gateway has a response cache). Then each panel query, with
the template variables filled in, goes through Prometheus' HTTP API and must return series.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, GatewayRunner, free_port, script, upstream_config, wait_http

CHART = ROOT / "deploy" / "helm" / "smallfirst"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

# What the test puts in for Grafana's variables. Short windows: rate() over [1m] has data as
# soon as two scrapes (1 s apart) have seen a series change.
TEST_VARIABLES = {"policy": "auto", "__rate_interval": "1m", "__interval": "15s",
                  "__range": "5m", "datasource": "prometheus"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")

TARGET = {
    "type": "object",
    "required": ["refId", "expr"],
    "properties": {"refId": {"type": "string", "minLength": 1},
                   "expr": {"type": "string", "minLength": 1},
                   "legendFormat": {"type": "string"}},
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"type": "string", "enum": ["row", "timeseries", "stat", "bargauge", "gauge",
                                            "table", "barchart", "piechart", "text"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": {
            "type": "object",
            "required": ["h", "w", "x", "y"],
            "properties": {"h": {"type": "integer", "minimum": 1},
                           "w": {"type": "integer", "minimum": 1, "maximum": 24},
                           "x": {"type": "integer", "minimum": 0, "maximum": 23},
                           "y": {"type": "integer", "minimum": 0}},
        },
        "datasource": {"type": "object", "required": ["type", "uid"]},
        "targets": {"type": "array", "items": TARGET},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"properties": {"targets": {"maxItems": 0}}},
    "else": {"required": ["datasource", "targets"],
             "properties": {"targets": {"minItems": 1}}},
}
DASHBOARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "type"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                    "type": {"enum": ["query", "datasource", "custom", "interval", "constant",
                                      "textbox"]},
                    "definition": {"type": "string"},
                },
                "if": {"properties": {"type": {"const": "query"}}},
                "then": {"required": ["definition", "query", "datasource"]},
            }}},
        },
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panel_targets() -> list[Any]:
    cases = []
    for path in DASHBOARDS:
        for panel in load(path)["panels"]:
            for target in panel.get("targets", []):
                cases.append(pytest.param(
                    target["expr"], id=f"{path.stem}/{panel['title']}/{target['refId']}"))
    return cases


def fill(expr: str) -> str:
    """The query Grafana would send, with the test's variable values."""
    return _VARIABLE.sub(lambda m: TEST_VARIABLES.get(m.group(1), m.group(0)), expr)


# ---- static checks -------------------------------------------------------------------------


def test_there_are_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} >= {"overview.json", "latency-budget.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_schema(path: Path) -> None:
    board = load(path)
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} overflows the 24-column grid"
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds must be unique"
    defined = {v["name"] for v in board["templating"]["list"]}
    used = {m for p in board["panels"] for t in p.get("targets", [])
            for m in _VARIABLE.findall(t["expr"])}
    assert used <= defined | BUILTIN_VARIABLES, f"undefined variables: {used - defined}"


def test_dashboard_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_chart_carries_the_dashboards() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "smallfirst"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["dashboards"]["label"] == "grafana_dashboard"
    template = (CHART / "templates" / "dashboards-configmap.yaml").read_text()
    assert "kind: ConfigMap" in template and '.Files.Glob "dashboards/*.json"' in template


# ---- every panel query against a real Prometheus -------------------------------------------


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        response = httpx.get(f"{self.base}/api/v1/label/{label}/values",
                             params={"match[]": metric}, timeout=10)
        return response.json()["data"]

    def wait(self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], what: str,
             timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok(self.query(expr)):
                return
            time.sleep(0.2)
        raise AssertionError(f"Prometheus never saw {what} ({expr}): {self.query(expr)}")


def _total(result: list[dict[str, Any]]) -> float:
    return sum(float(r["value"][1]) for r in result)


def _start_prometheus(workdir: Path, targets: Path) -> tuple[subprocess.Popen, str]:
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "smallfirst", "metrics_path": "/metrics", "scrape_timeout": "900ms",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        }],
    }))
    port = free_port()
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _send_load(gateway: str, round_no: int) -> tuple[int, set[str]]:
    """One round over every route; the prompts are new each round so each is a cache miss."""
    def chat(content: str, model: str = "auto", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return client.post("/v1/chat/completions", json=body)

    routes: set[str] = set()
    sent = 0
    with httpx.Client(base_url=gateway, timeout=30) as client:
        requests = [
            (f"round {round_no}: small", "auto", {}),
            (f"round {round_no}: small, streamed", "auto", {"stream": True}),
            (f"round {round_no}: unsure" + script(logprob=-3), "auto", {}),
            (f"round {round_no}: straight to the frontier", "frontier-stand-in", {}),
            (f"round {round_no}: everything fails"
             + script(status=500, key=f"dash-error-{round_no}"), "auto", {}),
            (f"round {round_no}: small", "auto", {}),  # a repeat: a cache hit
            (f"round {round_no}: held to a quality target", "quality", {}),
        ]
        for content, model, extra in requests:
            response = chat(content, model, **extra)
            sent += 1
            routes.add(f"error {response.status_code}" if response.status_code >= 400
                       else response.headers["x-smallfirst-route"])
    return sent, routes


@pytest.fixture(scope="module")
def scraped(
    session_gateways: GatewayRunner, upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, set[str]]]:
    """Prometheus that scraped a gateway through two rounds of load; and the routes seen."""
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's `prometheus` binary is not installed (`make test` installs it "
                    "with apt-get; without apt the dashboard queries cannot be checked)")
    workdir = tmp_path_factory.mktemp("prometheus")
    targets = workdir / "targets.json"
    targets.write_text("[]")
    # Start Prometheus first: it boots while the gateway does, and finds the gateway through
    # the targets file once the gateway's port is known.
    proc, base = _start_prometheus(workdir, targets)
    try:
        prices = {"frontier-stand-in": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}}
        gateway = session_gateways.start(upstream_config(upstream, prices=prices))
        targets.write_text(json.dumps([{"targets": [gateway.removeprefix("http://")]}]))
        wait_http(f"{base}/-/ready", proc, workdir / "prometheus.log")
        prometheus = Prometheus(base)
        prometheus.wait('up{job="smallfirst"}', lambda r: _total(r) == 1, "the gateway up")
        # Two rounds with a scrape between them, so every counter has moved inside the
        # rate() window (a series first seen at its final value has a rate of zero).
        sent, routes = _send_load(gateway, 1)
        prometheus.wait("sum(smallfirst_requests_total)", lambda r: _total(r) >= sent,
                        "the first round")
        more, routes_2 = _send_load(gateway, 2)
        prometheus.wait("sum(smallfirst_requests_total)", lambda r: _total(r) >= sent + more,
                        "the second round")
        yield prometheus, routes | routes_2
    finally:
        proc.terminate()
        proc.wait(10)


def test_load_covered_every_route(scraped: tuple[Prometheus, set[str]]) -> None:
    _, routes = scraped
    assert {"small", "escalated", "frontier", "error 502", "cache_exact"} <= routes, routes


def test_policy_variable_lists_the_policies(scraped: tuple[Prometheus, set[str]]) -> None:
    prometheus, _ = scraped
    for path in DASHBOARDS:
        for variable in load(path)["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, f"{path.name}: unsupported variable query {variable['definition']}"
            metric, label = match.groups()
            values = prometheus.label_values(label, metric)
            assert TEST_VARIABLES[variable["name"]] in values, values


@pytest.mark.parametrize("expr", panel_targets())
def test_panel_query_returns_data(scraped: tuple[Prometheus, set[str]], expr: str) -> None:
    prometheus, _ = scraped
    result = prometheus.query(fill(expr))
    assert result, f"no series for {fill(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"only NaN for {fill(expr)}: {result}"
