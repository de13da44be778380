"""Telemetry from a real gateway process: OTLP traces and metrics, /metrics, latency budgets.

An OTLP/HTTP receiver runs inside the test and decodes what the gateway exports with the
`opentelemetry.proto` classes; the gateway finds it through the standard `OTEL_*` variables.
Every request carries a W3C `traceparent`, so its spans are found by trace id.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import POLICIES, ROOT, GatewayRunner, free_port, script, upstream_config

ROOT_SPAN = "POST /v1/chat/completions"
SMALL_SPAN = "chat small-stand-in"
FRONTIER_SPAN = "chat frontier-stand-in"

# A policy that opts in to prompt and completion text on spans.
RECORDED_POLICY = """\
name: recorded
description: Test policy that records prompt and completion text on spans.
telemetry:
  record_content: true
"""
# A policy whose escalation allocation a slow frontier that fails once overspends. The engine
# gives each frontier attempt `escalation` ms as its deadline, while the budget's escalation
# spend is the whole component: every attempt plus the backoff between them. Two attempts of
# 0.8 s each stay inside their 1.5 s deadlines, so the request succeeds, yet together they
# take over 1.6 s: the component is honestly over its allocation. The other allocations are
# roomy so that only escalation can be flagged on a busy machine.
TIGHT_POLICY = """\
name: tight
description: Test policy with a small escalation allocation.
latency_budget:
  p99_ms: 10000
  queueing: 500
  routing: 500
  small_ttft: 2000
  small_generation: 4000
  escalation: 1500
"""
SLOW_ATTEMPT_MS = 800


# ---- an OTLP/HTTP receiver -----------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int

    @classmethod
    def of(cls, span: SpanProto) -> SpanRecord:
        return cls(span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                   span.kind, {a.key: _value(a.value) for a in span.attributes},
                   span.status.code)


@dataclass
class OTLPReceiver:
    """Collects the spans and metric names a gateway exports over OTLP/HTTP (protobuf)."""

    spans: list[SpanRecord] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)  # name -> data points
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, body: bytes) -> bytes:
        if path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            spans = [SpanRecord.of(span) for rs in request.resource_spans
                     for ss in rs.scope_spans for span in ss.spans]
            with self.lock:
                self.spans.extend(spans)
            return ExportTraceServiceResponse().SerializeToString()
        if path == "/v1/metrics":
            request = ExportMetricsServiceRequest.FromString(body)
            with self.lock:
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            data = getattr(metric, metric.WhichOneof("data"))
                            self.metrics.setdefault(metric.name, []).extend(data.data_points)
            return ExportMetricsServiceResponse().SerializeToString()
        raise KeyError(path)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"the OTLP receiver never got {what}")


def _serve(receiver: OTLPReceiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            try:
                reply, status = receiver.handle(self.path, body), 200
            except KeyError:
                reply, status = b"", 404
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    collected = OTLPReceiver()
    server = _serve(collected)
    collected.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield collected
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(
    upstream: str, receiver: OTLPReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway exporting traces and metrics to the receiver, with two extra test policies.

    It stops before the receiver does: its last export at shutdown then lands at once
    instead of retrying against a closed port until the OTLP timeout.
    """
    policies = tmp_path_factory.mktemp("telemetry-policies")
    for path in POLICIES.glob("*.yaml"):
        (policies / path.name).write_text(path.read_text())
    (policies / "recorded.yaml").write_text(RECORDED_POLICY)
    (policies / "tight.yaml").write_text(TIGHT_POLICY)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # type: ignore[attr-defined]
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    runner = GatewayRunner(tmp_path_factory.mktemp("telemetry-gateway"))
    try:
        yield runner.start(upstream_config(upstream), policies=policies, env=env)
    finally:
        runner.stop_all()


# ---- sending traced requests ---------------------------------------------------------------


@dataclass
class Traced:
    """One request sent with a fresh `traceparent`, and what came back."""

    response: httpx.Response
    trace_id: str
    parent_id: str
    key: str  # the upstream script key, for its /stats
    marker: str  # text only this request's prompt contains


def send(
    gateway: str, *, model: str = "auto", stream: bool = False,
    headers: dict[str, str] | None = None, **directive: Any,
) -> Traced:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    key = f"tel-{uuid.uuid4().hex[:12]}"
    marker = f"marker-{uuid.uuid4().hex}"
    body = {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": f"{marker}{script(key=key, **directive)}"}]}
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", **(headers or {})}
    with httpx.Client(timeout=30) as client:
        if stream:
            with client.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                               headers=headers) as response:
                response.read()
        else:
            response = client.post(f"{gateway}/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return Traced(response, trace_id, parent_id, key, marker)


def spans_of(receiver: OTLPReceiver, traced: Traced, *names: str) -> list[SpanRecord]:
    """The request's spans, once its root span and every span named in `names` arrived."""
    def arrived() -> bool:
        have = [s.name for s in receiver.trace(traced.trace_id)]
        return ROOT_SPAN in have and all(have.count(n) >= names.count(n) for n in set(names))

    receiver.wait(arrived, f"the spans {names} of trace {traced.trace_id}")
    return receiver.trace(traced.trace_id)


def one(spans: list[SpanRecord], name: str) -> SpanRecord:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name}: {[s.name for s in spans]}"
    return found[0]


def check_root(spans: list[SpanRecord], traced: Traced, route: str) -> SpanRecord:
    root = one(spans, ROOT_SPAN)
    assert root.kind == SpanProto.SPAN_KIND_SERVER
    assert root.parent_id == traced.parent_id  # a child of the caller's span, in its trace
    assert root.attributes["smallfirst.route"] == route
    assert root.attributes["smallfirst.policy"]
    assert root.attributes["http.response.status_code"] == 200
    return root


def children(spans: list[SpanRecord], parent: SpanRecord) -> list[str]:
    return [s.name for s in spans if s.parent_id == parent.span_id]


def descends(spans: list[SpanRecord], span: SpanRecord, ancestor: SpanRecord) -> bool:
    by_id = {s.span_id: s for s in spans}
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        if span is ancestor:
            return True
    return False


def check_model_span(span: SpanRecord, system: str, model: str) -> None:
    """GenAI semantic-convention attributes of one successful model call."""
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.system"] == system
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert span.status != Status.STATUS_CODE_ERROR


def backend_traceparent(upstream: str, key: str) -> tuple[str, str]:
    """(trace id, parent span id) of the last `traceparent` the upstream got for `key`."""
    seen = httpx.get(f"{upstream}/stats").json()["traceparent"][key]
    _, trace_id, parent_id, _ = seen.split("-")
    return trace_id, parent_id


def assert_no_text(spans: list[SpanRecord], traced: Traced) -> None:
    for span in spans:
        for name, value in span.attributes.items():
            assert traced.marker not in json.dumps(value), f"prompt text on {span.name}.{name}"
        assert "gen_ai.input.messages" not in span.attributes
        assert "gen_ai.output.messages" not in span.attributes


# ---- traces, per route ---------------------------------------------------------------------


def test_small_route_spans(gateway: str, upstream: str, receiver: OTLPReceiver) -> None:
    traced = send(gateway)
    assert traced.response.headers["x-smallfirst-route"] == "small"
    spans = spans_of(receiver, traced, SMALL_SPAN)
    root = check_root(spans, traced, "small")
    assert {"auth", "policy", "difficulty", SMALL_SPAN, "confidence"} <= set(children(spans, root))
    small = one(spans, SMALL_SPAN)
    check_model_span(small, "vllm", "small-stand-in")
    assert small.attributes["smallfirst.ttft_ms"] >= 0
    assert small.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert FRONTIER_SPAN not in {s.name for s in spans}
    # The backend got the trace context of the model call's span.
    assert backend_traceparent(upstream, traced.key) == (traced.trace_id, small.span_id)
    assert_no_text(spans, traced)


def test_escalated_route_spans(gateway: str, upstream: str, receiver: OTLPReceiver) -> None:
    traced = send(gateway, logprob=-3)  # an unsure small answer: escalated
    assert traced.response.headers["x-smallfirst-route"] == "escalated"
    spans = spans_of(receiver, traced, SMALL_SPAN, FRONTIER_SPAN)
    root = check_root(spans, traced, "escalated")
    assert {"auth", "policy", "difficulty", SMALL_SPAN, "confidence", "frontier"} <= set(
        children(spans, root))
    check_model_span(one(spans, SMALL_SPAN), "vllm", "small-stand-in")
    frontier = one(spans, FRONTIER_SPAN)
    check_model_span(frontier, "openai", "frontier-stand-in")
    assert frontier.parent_id == one(spans, "frontier").span_id
    assert frontier.attributes["smallfirst.attempt"] == 1
    # The frontier call was the last one under this script key; it carried its own span.
    assert backend_traceparent(upstream, traced.key) == (traced.trace_id, frontier.span_id)
    assert_no_text(spans, traced)


def test_frontier_route_shows_each_attempt(
    gateway: str, upstream: str, receiver: OTLPReceiver
) -> None:
    # Named directly, the frontier answers; its first attempt fails (503) and is retried.
    traced = send(gateway, model="frontier-stand-in", status=503, fail_times=1)
    assert traced.response.headers["x-smallfirst-route"] == "frontier"
    spans = spans_of(receiver, traced, FRONTIER_SPAN, FRONTIER_SPAN)
    root = check_root(spans, traced, "frontier")
    assert "difficulty" not in {s.name for s in spans} and SMALL_SPAN not in {
        s.name for s in spans}
    attempts = sorted((s for s in spans if s.name == FRONTIER_SPAN),
                      key=lambda s: s.attributes["smallfirst.attempt"])
    assert [s.attributes["smallfirst.attempt"] for s in attempts] == [1, 2]
    failed, succeeded = attempts
    assert failed.status == Status.STATUS_CODE_ERROR
    assert failed.attributes["error.type"] == "503"
    assert "gen_ai.usage.output_tokens" not in failed.attributes
    check_model_span(succeeded, "openai", "frontier-stand-in")
    assert all(descends(spans, s, root) for s in attempts)
    assert backend_traceparent(upstream, traced.key) == (traced.trace_id, succeeded.span_id)
    assert_no_text(spans, traced)


def test_streamed_answer_spans(gateway: str, receiver: OTLPReceiver) -> None:
    traced = send(gateway, stream=True)
    assert traced.response.headers["x-smallfirst-route"] == "small"
    spans = spans_of(receiver, traced, SMALL_SPAN)
    check_root(spans, traced, "small")
    check_model_span(one(spans, SMALL_SPAN), "vllm", "small-stand-in")
    assert_no_text(spans, traced)


def test_cache_hit_spans(gateway: str, receiver: OTLPReceiver) -> None:
    first = send(gateway)
    body = {"model": "auto", "messages": [{"role": "user", "content": first.marker
                                           + script(key=first.key)}]}
    for _ in range(40):  # the cache is written just after the first response
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30,
                              headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        route = response.headers["x-smallfirst-route"]
        if route in ("cache_exact", "cache_semantic"):
            break
        time.sleep(0.05)
    assert route in ("cache_exact", "cache_semantic"), "the repeat was never a cache hit"
    traced = Traced(response, trace_id, parent_id, first.key, first.marker)
    spans = spans_of(receiver, traced, "cache")
    root = check_root(spans, traced, route)
    assert "cache" in children(spans, root)
    assert not [s for s in spans if s.name.startswith("chat ")]
    assert_no_text(spans, traced)


def test_request_without_traceparent_starts_a_trace(
    gateway: str, upstream: str, receiver: OTLPReceiver
) -> None:
    key = f"tel-{uuid.uuid4().hex[:12]}"
    body = {"model": "auto", "messages": [{"role": "user", "content": script(key=key)}]}
    assert httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30).status_code == 200
    trace_id, _ = backend_traceparent(upstream, key)  # the trace the gateway started
    receiver.wait(lambda: ROOT_SPAN in {s.name for s in receiver.trace(trace_id)},
                  "the root span of the untraced request")
    assert one(receiver.trace(trace_id), ROOT_SPAN).parent_id == ""


def test_content_is_recorded_only_when_the_policy_opts_in(
    gateway: str, receiver: OTLPReceiver
) -> None:
    traced = send(gateway, model="recorded")
    spans = spans_of(receiver, traced, SMALL_SPAN)
    small = one(spans, SMALL_SPAN)
    prompt = json.loads(small.attributes["gen_ai.input.messages"])
    assert traced.marker in prompt[-1]["content"]
    answer = json.loads(small.attributes["gen_ai.output.messages"])
    assert answer[0]["role"] == "assistant" and answer[0]["content"]
    # Only the model-call spans carry text, and only under this policy.
    with_text = {s.name for s in spans if traced.marker in json.dumps(s.attributes)}
    assert with_text == {SMALL_SPAN}


# ---- metrics -------------------------------------------------------------------------------


def test_metrics_arrive_over_otlp(gateway: str, receiver: OTLPReceiver) -> None:
    send(gateway)
    wanted = {"smallfirst.requests", "smallfirst.request.duration",
              "smallfirst.component.duration", "smallfirst.gateway.overhead",
              "smallfirst.tokens", "smallfirst.budget.spend", "smallfirst.budget.allocation",
              "smallfirst.requests.in_flight"}

    def arrived() -> bool:
        with receiver.lock:
            return wanted <= set(receiver.metrics)

    receiver.wait(arrived, f"the metrics {wanted}")
    with receiver.lock:
        routes = {_value(a.value) for p in receiver.metrics["smallfirst.requests"]
                  for a in p.attributes if a.key == "route"}
        allocations = {(attrs["policy"], attrs["component"])
                       for p in receiver.metrics["smallfirst.budget.allocation"]
                       for attrs in [{a.key: _value(a.value) for a in p.attributes}]}
    assert "small" in routes
    assert ("auto", "total") in allocations and ("tight", "escalation") in allocations


def test_prometheus_exposition_parses(gateway: str) -> None:
    send(gateway)
    text = httpx.get(f"{gateway}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "smallfirst_requests": "counter",
        "smallfirst_request_duration_seconds": "histogram",
        "smallfirst_request_time_to_first_token_seconds": "histogram",
        "smallfirst_component_duration_seconds": "histogram",
        "smallfirst_gateway_overhead_seconds": "histogram",
        "smallfirst_budget_spend_seconds": "histogram",
        "smallfirst_budget_allocation_seconds": "gauge",
        "smallfirst_tokens": "counter",
        "smallfirst_cost_usd": "counter",
        "smallfirst_saved_usd": "counter",
        "smallfirst_requests_in_flight": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name
    labels = {k for s in families["smallfirst_requests"].samples for k in s.labels}
    assert {"policy", "route", "status"} <= labels
    assert not labels & {"tenant", "user", "prompt", "request_id"}  # low cardinality only
    buckets = {s.labels["le"] for s in families["smallfirst_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert {"0.001", "60.0", "+Inf"} <= buckets  # 1 ms .. 60 s
    allocation = {(s.labels["policy"], s.labels["component"]): s.value
                  for s in families["smallfirst_budget_allocation_seconds"].samples}
    assert allocation[("tight", "escalation")] == 1.5  # from the policy file, in seconds


# ---- latency budget ------------------------------------------------------------------------


def test_budget_flags_the_component_a_slow_upstream_overspends(gateway: str) -> None:
    # See TIGHT_POLICY: a small answer well inside its allocations, then a frontier call
    # whose first attempt stalls and fails and whose retry stalls again.
    assert send(gateway, model="tight").response.headers["x-smallfirst-route"] == "small"
    slow = send(gateway, model="frontier-stand-in", headers={"x-smallfirst-policy": "tight"},
                stall_before_ms=SLOW_ATTEMPT_MS, status=503, fail_times=1)
    assert slow.response.headers["x-smallfirst-route"] == "frontier"

    report = httpx.get(f"{gateway}/admin/budget").json()["tight"]
    escalation = report["components"]["escalation"]
    assert escalation["allocation_ms"] == 1500
    assert escalation["p99_ms"] >= 2 * SLOW_ATTEMPT_MS and escalation["over"]
    assert not report["components"]["small_ttft"]["over"]
    assert not report["components"]["total"]["over"]
    assert report["over"] == ["escalation"]

    env = {**os.environ, "SMALLFIRST_API_KEY": ""}
    cli = [sys.executable, "-m", "tooling.cli", "budget", "--url", gateway]
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env,
                             cwd=ROOT, check=True)
    assert json.loads(as_json.stdout)["tight"]["over"] == ["escalation"]
    table = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=ROOT,
                           check=True).stdout
    block = table[table.index("policy tight"):].split("\npolicy ")[0].splitlines()
    rows = {line.split()[0]: line for line in block[2:]}
    assert rows["escalation"].endswith("OVER")
    assert not rows["small_ttft"].endswith("OVER")


def test_budget_cli_reports_a_missing_gateway() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "budget", "--url",
         f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "cannot reach" in result.stderr
