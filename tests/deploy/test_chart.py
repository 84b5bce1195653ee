"""The Helm chart (helm/hostsvc), checked with the real helm, kubernetes-validate and hostsvc.

No API server can be had here, so the chart is rendered (`helm template`) for the default
values and for ci/all-on-values.yaml, validated against the Kubernetes 1.30 schemas, and what
matters is asserted on the rendered objects: probes hit the endpoints hostsvc serves on the
ports it listens on, the ConfigMap is a config `hostsvc check` accepts, the pods are locked
down, and the schema turns a wrong value into a clear error.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

CHART = REPO / "helm" / "hostsvc"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
VARIANTS = {"default": [], "all-on": ["-f", str(ALL_ON)]}


def helm(tools: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(tools.helm), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(tools: Any, *args: str) -> list[dict[str, Any]]:
    out = helm(tools, "template", "web", str(CHART), "--namespace", "apps", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}*{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


@pytest.fixture(scope="module", params=list(VARIANTS))
def rendered(request: pytest.FixtureRequest, tools: Any) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(tools, *VARIANTS[request.param])


@pytest.fixture(scope="module")
def all_on(tools: Any) -> list[dict[str, Any]]:
    return render(tools, *VARIANTS["all-on"])


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "hostsvc")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict(tools: Any, variant: str) -> None:
    proc = helm(tools, "lint", "--strict", str(CHART), *VARIANTS[variant])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_install_dry_run_client(tools: Any, variant: str) -> None:
    proc = helm(tools, "install", "web", str(CHART), "--dry-run=client", "--namespace", "apps",
                *VARIANTS[variant])
    assert "kind: Deployment" in proc.stdout


def test_kubernetes_validate_strict_1_30(tools: Any, rendered: tuple[str, list[dict[str, Any]]],
                                         tmp_path: Path) -> None:
    variant, docs = rendered
    path = tmp_path / f"{variant}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([str(tools.kubernetes_validate), "--strict", "-k", "1.30.0", str(path)],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Every object is either validated or one of the two Prometheus Operator CRDs it cannot know.
    for doc in docs:
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        if doc["kind"] in ("ServiceMonitor", "PrometheusRule"):
            assert f"Couldn't find schema for kind {doc['kind']}" in out
        else:
            assert f"passed for resource {name} against version 1.30" in out, out


def test_default_and_all_on_render_the_expected_objects(tools: Any, all_on: list[dict[str, Any]]) -> None:
    default = render(tools)
    kinds = sorted(d["kind"] for d in default)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service"]
    assert sorted(d["kind"] for d in all_on) == sorted(kinds + [
        "ConfigMap", "HorizontalPodAutoscaler", "Ingress", "PrometheusRule", "ServiceMonitor"])


def config_of(docs: list[dict[str, Any]]) -> str:
    cm = one(docs, "ConfigMap", "hostsvc")
    return cm["data"]["hostsvc.yaml"]


def test_configmap_is_a_config_hostsvc_check_accepts(tools: Any, rendered: tuple[str, list[dict[str, Any]]],
                                                     tmp_path: Path) -> None:
    variant, docs = rendered
    path = tmp_path / "hostsvc.yaml"
    path.write_text(config_of(docs))
    # In the pod ${HOSTSVC_EXAMPLES:-/usr/share/hostsvc/apps} is the image's copy of apps/.
    env = {**os.environ, "HOSTSVC_EXAMPLES": str(REPO / "apps")}
    proc = subprocess.run([str(tools.hostsvc), "check", str(path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{variant}: hostsvc check rejected the ConfigMap:\n{proc.stderr}"
    assert "ok (2 apps, 1 static mounts, listening on 0.0.0.0:8080)" in proc.stdout


def test_ports_match_the_config(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    cfg = yaml.safe_load(config_of(docs))
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg["listen"] == f"0.0.0.0:{ports['http']}"
    assert cfg["runtime_dir"] == "/run/hostsvc"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOSTSVC_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}" == "0.0.0.0:9090"
    assert "listen" not in (cfg.get("metrics") or {}), "the listener comes from HOSTSVC_METRICS_LISTEN"
    svc = one(docs, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (8080, "http"), "metrics": (9090, "metrics")}
    assert svc["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_probes_hit_the_metrics_endpoints(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    c = container(docs)
    assert {p["name"] for p in c["ports"]} == {"http", "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_pods_are_locked_down(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    test_pod = one(docs, "Pod")["spec"]
    for spec in (pod, test_pod):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["runAsNonRoot"] is True
    # Read-only root: the runtime dir and /tmp are the only writable mounts, the config is read-only.
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/run/hostsvc"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/hostsvc"]["readOnly"] is True
    assert "configMap" in volumes[mounts["/etc/hostsvc"]["name"]]
    # The supervisor's drain fits in the pod's grace period.
    cfg = yaml.safe_load(config_of(docs))
    assert cfg["grace_period"] < pod["terminationGracePeriodSeconds"]


def test_rollout_mode_annotates_a_config_checksum(tools: Any) -> None:
    docs = render(tools)
    ann = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert len(ann["checksum/config"]) == 64
    assert "--watch" not in container(docs)["args"]
    changed = render(tools, "--set", "config.grace_period=20")
    ann2 = one(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann2["checksum/config"] != ann["checksum/config"], "a config change must roll the pods"


def test_watch_mode_reloads_in_place(all_on: list[dict[str, Any]]) -> None:
    c = container(all_on)
    assert c["args"] == ["run", "/etc/hostsvc/hostsvc.yaml", "--runtime-dir", "/run/hostsvc", "--watch"]
    ann = one(all_on, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" not in ann
    # --watch needs the kubelet's ConfigMap updates: a whole-directory mount, not a subPath.
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/hostsvc")
    assert "subPath" not in mount


def test_prometheus_annotations_without_service_monitor(tools: Any, all_on: list[dict[str, Any]]) -> None:
    ann = one(render(tools), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == \
        ("true", "9090", "/metrics")
    ann_on = one(all_on, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert not any(k.startswith("prometheus.io/") for k in ann_on), "ServiceMonitor on: no annotations"


def test_service_monitor_scrapes_the_metrics_port(all_on: list[dict[str, Any]]) -> None:
    sm = one(all_on, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                        "scrapeTimeout": "10s"}]
    svc = one(all_on, "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["apps"]}


def test_prometheus_rule_holds_the_shipped_alerts(all_on: list[dict[str, Any]]) -> None:
    rule = one(all_on, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(r.get("expr") for g in rule["spec"]["groups"] for r in g["rules"])
    # Prometheus' own templating survives Helm's untouched: {{ $labels.app }} is still there.
    assert "{{ $labels.app }}" in json.dumps(rule["spec"])


def test_grafana_dashboard_configmap(all_on: list[dict[str, Any]]) -> None:
    cm = one(all_on, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["hostsvc-dashboard.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert dashboard["panels"], "the dashboard has panels"


@pytest.mark.parametrize("chart_file, source", [
    ("dashboard.json", "deploy/grafana/hostsvc-dashboard.json"),
    ("alerts.yaml", "deploy/prometheus/hostsvc-alerts.yaml"),
])
def test_chart_files_are_the_deploy_sources(chart_file: str, source: str) -> None:
    src = REPO / source
    if not src.exists():
        pytest.skip(f"{source} does not exist; the chart ships its own files/{chart_file}")
    assert (CHART / "files" / chart_file).read_bytes() == src.read_bytes(), (
        f"helm/hostsvc/files/{chart_file} is stale: cp {source} helm/hostsvc/files/{chart_file}")


def test_hpa_pdb_ingress_redis_and_user_apps(all_on: list[dict[str, Any]]) -> None:
    deploy = one(all_on, "Deployment")
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    hpa = one(all_on, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    pdb = one(all_on, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == deploy["spec"]["selector"]
    ing = one(all_on, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(all_on, "Service")["metadata"]["name"], "port": {"name": "http"}}
    assert ing["spec"]["tls"][0]["secretName"] == "apps-example-tls"
    c = container(all_on)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOSTSVC_REDIS_URL"] == env["REDIS_URL"] == "redis://redis-master:6379/0"
    apps_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/srv/apps")
    volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == apps_mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "hostsvc-apps"
    runtime = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "runtime")
    assert runtime["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Mi"}
    assert c["image"] == "registry.example.com/hostsvc:0.1.0-ci"


def test_redis_url_from_a_secret(tools: Any) -> None:
    docs = render(tools, "--set", "redis.existingSecret=sessions", "--set", "redis.url=redis://ignored:6379")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["HOSTSVC_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "sessions", "key": "redis-url"}}
    assert env["REDIS_URL"]["value"] == "$(HOSTSVC_REDIS_URL)"


def test_helm_test_pod_checks_healthz_and_metrics_through_the_service(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    svc = one(docs, "Service")
    script = pod["spec"]["containers"][0]["args"][0]
    assert f'"http://{svc["metadata"]["name"]}:9090"' in script
    assert '"/healthz"' in script and '"/metrics"' in script
    assert pod["spec"]["containers"][0]["image"] == container(docs)["image"]
    compile(script, "helm-test", "exec")   # the check is valid Python


@pytest.mark.parametrize("args, message", [
    (["--set", "configReload=restart"], "at '/configReload': value must be one of 'rollout', 'watch'"),
    (["--set", "config.listen=0.0.0.0:80"], "at '/config': additional properties 'listen' not allowed"),
    (["--set", "probes.liveness.path=/health"], "at '/probes/liveness/path': value must be '/healthz'"),
    (["--set", "containerPorts.http=70000"], "at '/containerPorts/http': maximum: got 70,000, want 65,535"),
    (["--set", "securityContext.allowPrivilegeEscalation=true"],
     "at '/securityContext/allowPrivilegeEscalation': value must be false"),
    (["--set", "service.type=External"], "at '/service/type': value must be one of"),
    (["--set", "redis.url=localhost:6379"], "at '/redis/url'"),
    (["--set-json", 'config.apps=[{"name":"x"}]'], "at '/config/apps/0': 'anyOf' failed"),
    (["--set", "config.metrics.listen=off"], "at '/config/metrics': additional properties 'listen' not allowed"),
])
def test_schema_rejects_bad_values_clearly(tools: Any, args: list[str], message: str) -> None:
    proc = helm(tools, "template", "web", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr
