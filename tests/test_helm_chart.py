"""The Helm chart, rendered and linted offline (Helm's Go SDK through helm-python-sdk) for the
default values and every value set in `ci/`, each manifest validated strictly against the
Kubernetes schemas (kubernetes-validate), and its wiring checked against the gateway's own
code: its settings loader, its policy loader, its keys file, its routes.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from gateway.api.auth import KeyStore
from gateway.config import load_settings
from gateway.policy_store import load_policy_dir
from tests.conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "smallfirst"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUE_SETS = {"default": {}} | {
    path.stem: yaml.safe_load(path.read_text()) for path in sorted((CHART / "ci").glob("*.yaml"))}
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", latest_version())
CRD_KINDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by wiring below
RELEASE, NAMESPACE = "demo", "llm"


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for name, text in sorted(files.items()) if name.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


class Manifests:
    """Rendered resources of one value set, looked up by kind and component."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.all = render(values)

    def of(self, kind: str, component: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.all if r["kind"] == kind and (
            component is None
            or r["metadata"]["labels"].get("app.kubernetes.io/component") == component)]

    def one(self, kind: str, component: str | None = None) -> dict[str, Any]:
        found = self.of(kind, component)
        assert len(found) == 1, f"{len(found)} {kind} ({component})"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [r for r in self.all if r["kind"] == kind and r["metadata"]["name"] == name]
        assert found, f"no {kind} named {name}"
        return found[0]

    @property
    def gateway_pod(self) -> dict[str, Any]:
        return self.one("Deployment", "gateway")["spec"]["template"]

    @property
    def gateway_container(self) -> dict[str, Any]:
        return self.gateway_pod["spec"]["containers"][0]

    @property
    def gateway_env(self) -> dict[str, Any]:
        return {e["name"]: e.get("value", e.get("valueFrom"))
                for e in self.gateway_container["env"]}

    def service_for(self, url: str) -> dict[str, Any]:
        """The Service a cluster URL names, checked to serve on the URL's port."""
        parts = urlsplit(url)
        service = self.named("Service", parts.hostname)
        assert parts.port in [p["port"] for p in service["spec"]["ports"]], url
        return service

    def pods_behind(self, service: dict[str, Any]) -> list[dict[str, Any]]:
        """Pod templates the Service selects, each checked to expose its target ports."""
        selector = service["spec"]["selector"].items()
        pods = [r["spec"]["template"] for r in self.all
                if r["kind"] in {"Deployment", "StatefulSet"}
                and selector <= r["spec"]["template"]["metadata"]["labels"].items()]
        for pod in pods:
            named = {p.get("name") for c in pod["spec"]["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in named, (service["metadata"]["name"], port)
        return pods


@functools.cache
def set_of(name: str) -> Manifests:
    return Manifests(VALUE_SETS[name])


@pytest.fixture(params=sorted(VALUE_SETS))
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return set_of(request.param)


@pytest.fixture
def default() -> Manifests:
    return set_of("default")


# ---- render, lint, validate ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_passes(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_every_manifest_validates_strictly(manifests: Manifests) -> None:
    problems = []
    for resource in manifests.all:
        if resource["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{resource['kind']}/{resource['metadata']['name']} "
                                f"(Kubernetes {version}): {exc.message} at {list(exc.path)}")
    assert problems == []


def test_invalid_values_are_refused_by_the_schema() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="replica"):
        chart.validate_schema({"gateway": {"replicas": 0, "replica": 2}})


def test_workers_per_pod_reach_the_gateway() -> None:
    assert Manifests({"gateway": {"workers": 4}}).gateway_env["SMALLFIRST_WORKERS"] == "4"
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="workers"):
        chart.validate_schema({"gateway": {"workers": 0}})


def schema_paths(node: dict[str, Any], prefix: str = "", refs: bool = True) -> Iterator[str]:
    """Dotted paths of the schema's properties (through shared definitions if `refs`)."""
    if "$ref" in node and refs:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    for key, child in node.get("properties", {}).items():
        yield f"{prefix}{key}"
        yield from schema_paths(child, f"{prefix}{key}.", refs)


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict) and value and not free_form(f"{prefix}{key}"):
            yield from value_paths(value, f"{prefix}{key}.")


def free_form(path: str) -> bool:
    """A map whose keys are the user's (gateway settings, resources, labels): no properties."""
    node: dict[str, Any] = SCHEMA
    for part in path.split("."):
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = node["properties"][part]
    return "properties" not in node and "$ref" not in node


def test_every_value_is_in_the_schema() -> None:
    in_schema = set(schema_paths(SCHEMA))
    missing = [path for path in value_paths(VALUES) if path not in in_schema]
    assert missing == []
    # ...and the schema's own properties (shared definitions aside) are all in values.yaml.
    assert sorted(set(schema_paths(SCHEMA, refs=False)) - set(value_paths(VALUES))) == []


def test_every_section_is_documented_in_the_schema() -> None:
    assert all(SCHEMA["properties"][key].get("description")
               for key in VALUES if key not in {"imagePullSecrets"})


# ---- wiring ----------------------------------------------------------------------------------


def test_gateway_calls_the_vllm_and_redis_services_the_chart_creates(default: Manifests) -> None:
    env = default.gateway_env
    small = default.service_for(env["SMALLFIRST_SMALL_API_BASE"])
    assert urlsplit(env["SMALLFIRST_SMALL_API_BASE"]).path == "/v1"
    [vllm_pod] = default.pods_behind(small)
    args = vllm_pod["spec"]["containers"][0]["args"]
    served = f"--served-model-name={VALUES['vllm']['servedModelName']}"
    assert served in args and env["SMALLFIRST_SMALL_MODEL"] == f"hosted_vllm/{served.split('=')[1]}"
    vllm_port = {p["name"]: p["containerPort"] for p in vllm_pod["spec"]["containers"][0]["ports"]}
    assert f"--port={vllm_port['http']}" in args
    redis = default.service_for(env["SMALLFIRST_REDIS_URL"])
    assert urlsplit(env["SMALLFIRST_REDIS_URL"]).scheme == "redis"
    [redis_pod] = default.pods_behind(redis)
    assert redis_pod["spec"]["containers"][0]["image"].startswith("redis:8")
    collector = default.service_for(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert default.pods_behind(collector)
    assert default.pods_behind(default.one("Service", "gateway"))


def test_external_vllm_replaces_the_chart_s_own() -> None:
    chart = set_of("external-vllm")
    external = VALUE_SETS["external-vllm"]["vllm"]["external"]
    assert not chart.of("StatefulSet", "vllm") and not chart.of("Service", "vllm")
    assert chart.gateway_env["SMALLFIRST_SMALL_API_BASE"] == external["apiBase"]
    assert chart.gateway_env["SMALLFIRST_SMALL_MODEL"] == f"hosted_vllm/{external['model']}"
    assert chart.gateway_env["SMALLFIRST_SMALL_API_KEY"] == {
        "secretKeyRef": {"name": "vllm-router", "key": "token"}}
    # The frontier key given as a value lands in the chart's Secret and reaches the gateway.
    ref = chart.gateway_env["SMALLFIRST_FRONTIER_API_KEY"]["secretKeyRef"]
    secret = chart.named("Secret", ref["name"])
    assert secret["stringData"][ref["key"]] == VALUE_SETS["external-vllm"]["frontier"]["apiKey"][
        "value"]


def test_external_redis_comes_from_its_secret() -> None:
    chart = set_of("external-redis")
    assert not chart.of("StatefulSet", "redis") and not chart.of("Service", "redis")
    assert chart.gateway_env["SMALLFIRST_REDIS_URL"] == {
        "secretKeyRef": {"name": "shared-redis", "key": "url"}}
    assert chart.gateway_env["SMALLFIRST_FRONTIER_API_KEY"] == {
        "secretKeyRef": {"name": "provider-keys", "key": "openai"}}
    keys = next(v for v in chart.gateway_pod["spec"]["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "smallfirst-tenants"
    assert not chart.of("Secret")  # every secret is the operator's own


def mounted_volume(chart: Manifests, path: str) -> dict[str, Any]:
    [mount] = [m for m in chart.gateway_container["volumeMounts"] if m["mountPath"] == path]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    return next(v for v in chart.gateway_pod["spec"]["volumes"] if v["name"] == mount["name"])


def policy_files(chart: Manifests, into: Path) -> Path:
    """The policies ConfigMap mounted where the gateway reads policies, written out."""
    volume = mounted_volume(chart, chart.gateway_env["SMALLFIRST_POLICIES"])
    config_map = chart.named("ConfigMap", volume["configMap"]["name"])
    for name, text in config_map["data"].items():
        (into / name).write_text(text)
    return into


def test_policies_configmap_is_mounted_where_the_gateway_reads_policies(
    default: Manifests, tmp_path: Path
) -> None:
    folder = policy_files(default, tmp_path)
    shipped = sorted((ROOT / "policies").glob("*.yaml"))
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in shipped]
    for path in shipped:
        assert (folder / path.name).read_text() == path.read_text()
    policies = load_policy_dir(folder)
    assert default.gateway_env["SMALLFIRST_DEFAULT_POLICY"] in policies.by_name


def test_extra_policies_are_added_and_valid(tmp_path: Path) -> None:
    policies = load_policy_dir(policy_files(set_of("everything"), tmp_path))
    assert {"support", "auto", "quality"} <= policies.by_name.keys()


def test_policy_edits_do_not_restart_pods_but_config_edits_do() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return Manifests(values).gateway_pod["metadata"]["annotations"]

    base = annotations({"auth": {"tenants": {"t": {"keys": ["k"]}}}})
    policy_edit = annotations({"auth": {"tenants": {"t": {"keys": ["k"]}}},
                               "policies": {"files": {"x.yaml": "route: cascade\n"}}})
    config_edit = annotations({"auth": {"tenants": {"t": {"keys": ["k"]}}},
                               "gateway": {"config": {"max_in_flight": 9}}})
    assert policy_edit == base
    assert config_edit["checksum/config"] != base["checksum/config"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_config_and_env_load_as_gateway_settings(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = set_of(name)
    volume = mounted_volume(chart, "/etc/smallfirst/config")
    config = chart.named("ConfigMap", volume["configMap"]["name"])["data"]["config.yaml"]
    assert "--config" in chart.gateway_container["args"]
    path = tmp_path / "config.yaml"
    path.write_text(config)
    for key in list(os.environ):
        if key.startswith("SMALLFIRST_"):
            monkeypatch.delenv(key)
    for key, value in chart.gateway_env.items():
        monkeypatch.setenv(key, value if isinstance(value, str) else f"from-secret-{key.lower()}")
    settings = load_settings(path)  # the gateway's own loader: unknown keys fail here
    assert settings.host == "0.0.0.0" and settings.port == VALUES["gateway"]["port"]
    assert settings.workers == VALUES["gateway"]["workers"] == 1
    assert str(settings.policies) == VALUES["policies"]["mountPath"]
    for key, value in VALUE_SETS[name].get("gateway", {}).get("config", {}).items():
        assert getattr(settings, key) is not None and key in yaml.safe_load(config)
        if not isinstance(value, dict):
            assert getattr(settings, key) == value


@pytest.mark.parametrize(("config", "use"), [
    ({"small_api_base": "http://elsewhere/v1"}, "vllm"),
    ({"redis_url": "redis://elsewhere:6379"}, "redis"),
    ({"policies": "/somewhere"}, "policies"),
    ({"workers": 4}, "gateway.workers"),
])
def test_gateway_config_may_not_shadow_the_chart_s_wiring(config: dict[str, str], use: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as error:
        chart.render({"gateway": {"config": config}}, name=RELEASE)
    assert f"gateway.config.{next(iter(config))} is set by the chart; use {use}" in str(error.value)


def test_generated_admin_key_is_a_working_keys_file(default: Manifests, tmp_path: Path) -> None:
    volume = mounted_volume(default, "/etc/smallfirst/keys")
    secret = default.named("Secret", volume["secret"]["secretName"])["stringData"]
    assert default.gateway_env["SMALLFIRST_API_KEYS_FILE"] == "/etc/smallfirst/keys/keys.yaml"
    (tmp_path / "keys.yaml").write_text(secret["keys.yaml"])
    tenant = KeyStore.from_file(tmp_path / "keys.yaml").authenticate(
        f"Bearer {secret['admin-key']}")
    assert tenant.name == "admin" and tenant.admin
    assert len(secret["admin-key"]) > 30


def test_probes_hit_the_gateway_s_real_routes(default: Manifests, cascade_gateway: str) -> None:
    container = default.gateway_container
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert port_names[get["port"]] == VALUES["gateway"]["port"]
        assert httpx.get(cascade_gateway + get["path"]).status_code == 200, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert httpx.get(cascade_gateway + re.search(r"(/\w+)'", dockerfile).group(1)).is_success


def test_termination_grace_outlasts_the_longest_request(
    default: Manifests, tmp_path: Path
) -> None:
    def longest_s(budget: Any) -> float:
        small = budget.small_timeout if budget.small_deadline == "adaptive" \
            else budget.small_total_ms
        worst = max(budget.small_timeout, small + budget.escalation)
        return (budget.queueing + budget.cache + budget.embedding + budget.routing + worst) / 1000

    policies = load_policy_dir(policy_files(default, tmp_path)).policies
    pod = default.gateway_pod["spec"]
    drain = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + max(
        longest_s(p.latency_budget) for p in policies)


def test_gateway_runs_locked_down(manifests: Manifests) -> None:
    pod = manifests.gateway_pod["spec"]
    container = manifests.gateway_container
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = mounted_volume(manifests, "/tmp")
    assert "emptyDir" in tmp
    assert manifests.gateway_env["SMALLFIRST_CACHE_DIR"].startswith("/tmp/")


def test_autoscaling_and_disruption_budget() -> None:
    default, minimal, everything = set_of("default"), set_of("minimal"), set_of("everything")
    deployment = default.one("Deployment", "gateway")
    hpa = default.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = default.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        default.gateway_pod["metadata"]["labels"].items()
    assert not minimal.of("HorizontalPodAutoscaler")
    assert minimal.one("Deployment", "gateway")["spec"]["replicas"] == 3
    [in_flight] = [m for m in everything.one("HorizontalPodAutoscaler")["spec"]["metrics"]
                   if m["type"] == "Pods"]
    metric = in_flight["pods"]["metric"]["name"]
    assert metric in (CHART / "dashboards" / "overview.json").read_text()


def test_no_telemetry_means_no_collector_and_no_export() -> None:
    minimal = set_of("minimal")
    assert not minimal.of("Deployment", "otel-collector") and not minimal.of("ServiceMonitor")
    assert not any(k.startswith("OTEL_EXPORTER") for k in minimal.gateway_env)
    assert not [c for c in minimal.of("ConfigMap") if "dashboards" in c["metadata"]["name"]]


def test_vllm_gets_gpus_speculative_decoding_and_shared_weights() -> None:
    everything = set_of("everything")
    vllm = everything.one("StatefulSet", "vllm")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert vllm["spec"]["replicas"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = next(a for a in container["args"] if a.startswith("--speculative-config="))
    assert json.loads(spec.split("=", 1)[1]) == VALUE_SETS["everything"]["vllm"][
        "speculativeConfig"]
    assert "--enable-prefix-caching" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    weights = next(v for v in vllm["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"]["claimName"] == "model-weights"
    assert "volumeClaimTemplates" not in vllm["spec"]
    assert "volumeClaimTemplates" in set_of("default").one("StatefulSet", "vllm")["spec"]


def test_service_monitor_scrapes_the_gateway_metrics() -> None:
    everything = set_of("everything")
    monitor = everything.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = everything.one("Service", "gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_network_policies_let_only_the_gateway_reach_the_backends(default: Manifests) -> None:
    gateway_labels = default.gateway_pod["metadata"]["labels"].items()
    for component in ("vllm", "redis", "otel-collector"):
        policy = default.one("NetworkPolicy", component)
        [workload] = [r for r in default.all if r["kind"] in {"Deployment", "StatefulSet"}
                      and r["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        pod = workload["spec"]["template"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
            pod["metadata"]["labels"].items()
        rule = policy["spec"]["ingress"][0]
        [peer] = rule["from"]
        assert peer["podSelector"]["matchLabels"].items() <= gateway_labels
        named = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["port"] for p in rule["ports"]} <= named


def test_dashboards_configmap_holds_the_repository_json(default: Manifests) -> None:
    config_map = default.one("ConfigMap", "dashboards")
    assert config_map["metadata"]["labels"][VALUES["dashboards"]["label"]] == \
        VALUES["dashboards"]["labelValue"]
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert sorted(config_map["data"]) == [p.name for p in files]
    for path in files:
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())


def test_the_readme_install_command_renders() -> None:
    readme = (ROOT / "README.md").read_text()
    [command] = [block for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                 if "helm install" in block]
    values: dict[str, Any] = {}
    for expression in re.findall(r"--set (\S+)", command):
        values = merge(values, helm.parse_set_string(expression))
    chart = Manifests(values)
    env = chart.gateway_env
    assert env["SMALLFIRST_FRONTIER_MODEL"] == values["frontier"]["model"]
    assert env["SMALLFIRST_FRONTIER_API_KEY"]["secretKeyRef"]["name"] in command
    assert chart.gateway_container["image"].startswith(values["gateway"]["image"]["repository"])


def merge(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into
