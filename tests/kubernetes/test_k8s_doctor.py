"""``shoal k8s doctor`` against the fake API: what a build needs, what the cluster has, exit status."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from shoal.kubernetes import cli as k8s_cli
from shoal.kubernetes.apply import NotAllowed
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.doctor import Finding, diagnose, parse_version, render
from shoal.kubernetes.targets import LoadedApp, load_apps
from tests.kubernetes.k8s_fake_api import FakeCluster, platform

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
OPTS = CompileOptions(namespace="ml", image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/gpu.shared", gateway="web")
TARGET = "tests.kubernetes.k8s_demo_app:app"
FLAGS = ["--image", "registry.example.com/demo:1", "-n", "ml", "--gateway", "web",
         "--gpu-resource", "nvidia.com/gpu.shared"]


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    apps, _ = load_apps(TARGET)
    return apps[0]


def check(cluster: FakeCluster, app: LoadedApp, **changes: Any) -> list[Finding]:
    opts = dataclasses.replace(OPTS, **changes)
    objs = compile_apps([(app.spec, app.entry)], opts).objects
    return diagnose(cluster, objs, opts)


def missing(findings: list[Finding]) -> list[str]:
    return [f"{f.what}: {f.detail} -> {f.fix}" for f in findings if f.status != "ok"]


def test_all_present(demo: LoadedApp) -> None:
    findings = check(platform(FakeCluster()), demo, pod_monitor=True, tls="cert-manager")
    assert missing(findings) == []
    whats = " | ".join(f.what for f in findings)
    for needed in ("Kubernetes v1.31.4", "namespace 'ml'", "ScaledObject (keda.sh/v1alpha1)",
                   "HTTPRoute (gateway.networking.k8s.io/v1)", "PodMonitor", "Certificate", "KEDA operator",
                   "GatewayClass", "Gateway ml/web"):
        assert needed in whats, needed
    assert "LeaderWorkerSet" not in whats  # no gang in the demo: not needed, not checked


def test_no_keda(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster(), without=("scaledobjects.keda.sh", "keda"))
    problems = missing(check(cluster, demo))
    assert len(problems) == 3, problems
    assert any("no CustomResourceDefinition scaledobjects.keda.sh" in p and "install KEDA" in p
               and "https://keda.sh/docs/latest/deploy/" in p for p in problems)
    assert any("KEDA operator (Deployment keda/keda-operator): not found" in p for p in problems)
    # With --autoscaler hpa KEDA is not needed; the external metrics API is.
    from shoal import serve
    from shoal.deployment import build_app_spec

    @serve.deployment(name="M", autoscaling_config={"min_replicas": 1, "max_replicas": 3})
    class M:
        pass

    app = LoadedApp(spec=build_app_spec(M.bind(), name="default"), entry={"name": "default"})
    assert missing(check(cluster, app, autoscaler="hpa")) == []
    cluster = platform(FakeCluster(), without=("external-metrics",))
    problems = missing(check(cluster, app, autoscaler="hpa"))
    assert len(problems) == 1 and "external metrics API" in problems[0] and "prometheus-adapter" in problems[0]


def test_keda_installed_but_not_running(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster())
    cluster.objects[("apps/v1", "Deployment", "keda", "keda-operator")]["status"] = {"availableReplicas": 0}
    problems = missing(check(cluster, demo))
    assert problems == ["KEDA operator (Deployment keda/keda-operator): no available replica -> "
                        "kubectl -n keda describe deployment keda-operator"]


def test_gateway_api_release_against_the_build(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster(gateway_api="v1.1.0"))
    problems = missing(check(cluster, demo))
    assert len(problems) == 1 and "Gateway API v1.1.0 (standard channel)" in problems[0]
    assert "no 'timeouts'" in problems[0] and "--gateway-api-version 1.1" in problems[0]
    assert missing(check(cluster, demo, gateway_api_version="1.1")) == []


def test_no_gateway_api(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster(), without=("httproutes.gateway.networking.k8s.io", "gatewayclass", "gateway"))
    problems = missing(check(cluster, demo))
    assert len(problems) == 3, problems
    assert any("httproutes.gateway.networking.k8s.io" in p and "--ingress-class" in p for p in problems)
    assert any(p.startswith("GatewayClass: none in the cluster") for p in problems)
    assert any(p.startswith("Gateway ml/web: not found") for p in problems)
    # An Ingress instead: no Gateway API needed, but the IngressClass is.
    problems = missing(check(cluster, demo, gateway=None, ingress_class="nginx"))
    assert problems and all("IngressClass 'nginx'" in p for p in problems)


def test_missing_crds_for_options(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster(), without=("podmonitors.monitoring.coreos.com", "certificates.cert-manager.io",
                                               "issuers.cert-manager.io", "namespace"))
    problems = missing(check(cluster, demo, pod_monitor=True, tls="cert-manager"))
    assert len(problems) == 4, problems
    assert any("podmonitors.monitoring.coreos.com" in p and "Prometheus Operator" in p for p in problems)
    assert any("certificates.cert-manager.io" in p and "cert-manager.io/docs/installation" in p for p in problems)
    assert any("kubectl create namespace ml" in p for p in problems)


def test_prometheus_behind_a_prometheus_trigger() -> None:
    def scaled_object(address: str) -> Obj:
        return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x", "namespace": "ml"},
                "spec": {"triggers": [{"type": "prometheus", "metadata": {"serverAddress": address}}]}}

    cluster = platform(FakeCluster(), without=("prometheus",))
    inside = missing(diagnose(cluster, [scaled_object("http://prometheus-operated.monitoring.svc:9090")], OPTS))
    assert inside == ["Prometheus at http://prometheus-operated.monitoring.svc:9090: no Service "
                      "monitoring/prometheus-operated -> install Prometheus (e.g. kube-prometheus-stack), or build "
                      "with --prometheus-url of yours (https://prometheus-operator.dev/)"]
    assert missing(diagnose(platform(FakeCluster()), [scaled_object("http://prometheus-operated.monitoring.svc:9090")],
                            OPTS)) == []
    outside = missing(diagnose(cluster, [scaled_object("https://prom.example.com")], OPTS))
    assert len(outside) == 1 and "not an in-cluster Service address" in outside[0]


def test_crd_without_the_version_the_build_uses(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster())
    crd = cluster.objects[("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", "scaledobjects.keda.sh")]
    crd["spec"]["versions"][0]["name"] = "v2"
    assert any("serves v2, not v1alpha1" in p for p in missing(check(cluster, demo)))


def test_kubernetes_version() -> None:
    assert parse_version("v1.31.4-eks-1a2b3c") == (1, 31) and parse_version("v1.29.3+k3s1") == (1, 29)
    apps, _ = load_apps(TARGET)
    old = missing(check(platform(FakeCluster(version="v1.28.9")), apps[0]))
    assert len(old) == 1 and "older than 1.30" in old[0]
    newer = check(platform(FakeCluster(version="v1.40.0")), apps[0])
    assert missing(newer) == [] and "newer than" in newer[0].detail


def test_forbidden_reads_are_unknown_not_fatal(demo: LoadedApp) -> None:
    cluster = platform(FakeCluster())
    real_list = cluster.list

    def list_(api_version: str, kind: str, namespace: str, selector: str) -> list[Obj]:
        if kind == "GatewayClass":
            raise NotAllowed("GatewayClass list: not allowed: forbidden")
        return real_list(api_version, kind, namespace, selector)

    cluster.list = list_  # type: ignore[method-assign]
    findings = check(cluster, demo)
    assert [f.status for f in findings if f.status != "ok"] == ["unknown"]
    assert "?       Gateway: GatewayClass list: not allowed" in render(findings)


# --- the command --------------------------------------------------------------------------------


def run(cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: cluster)
    return CliRunner().invoke(k8s_cli.k8s, ["doctor", TARGET, *FLAGS, *args])


def test_command_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    good = run(platform(FakeCluster()), monkeypatch)
    assert good.exit_code == 0, good.output
    assert "ok      ScaledObject (keda.sh/v1alpha1)" in good.output and "checks passed" in good.output
    bad = run(platform(FakeCluster(), without=("keda",)), monkeypatch)
    assert bad.exit_code == 1
    assert "MISSING KEDA operator (Deployment keda/keda-operator): not found" in bad.output
    assert "-> install KEDA into namespace 'keda'" in bad.output
    elsewhere = run(platform(FakeCluster(), without=("keda",)), monkeypatch, "--keda-namespace", "autoscaling")
    assert "Deployment autoscaling/keda-operator" in elsewhere.output
    down = run(FakeCluster(unreachable=True), monkeypatch)
    assert down.exit_code == 2 and "cannot reach the Kubernetes API" in down.output
    v11 = run(platform(FakeCluster(gateway_api="v1.1.0")), monkeypatch, "--gateway-api-version", "1.1")
    assert v11.exit_code == 0, v11.output


def test_command_help() -> None:
    out = CliRunner().invoke(k8s_cli.k8s, ["doctor", "--help"])
    assert out.exit_code == 0
    assert "Exit status: 0 all present, 1 something missing" in out.output
    assert "--keda-namespace" in out.output and "--gateway-api-version" in out.output
