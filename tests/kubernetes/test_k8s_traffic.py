"""Issue 18, problems 5, 6 and 9: what reaches the pods and how the objects reach the cluster.

* apply deletes an autoscaler it replaces before creating the new one (KEDA's webhook refuses a
  ScaledObject for a workload an HPA still scales), and never prunes what KEDA owns;
* HTTPRoute ``timeouts`` only for Gateway API releases whose standard channel has them, checked
  against the real v1.1/v1.2 CRD schemas, and every apply asks for ``fieldValidation=Strict``;
* NetworkPolicies: HTTP only from the Gateway's namespace (or CIDRs), metrics only from the
  monitoring namespace, kubelet probes unaffected, DNS egress configurable.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.exceptions import CompileError
from shoal.kubernetes import apply as ka
from shoal.kubernetes import names
from shoal.kubernetes.apply import ApplyRejected, Scope, execute, plan_apply
from shoal.kubernetes.compiler import CompileOptions, compile_apps, prune_selector
from shoal.kubernetes.netpol import Endpoint, allowed
from shoal.kubernetes.targets import LoadedApp, load_apps
from tests.kubernetes.k8s_fake_api import FakeCluster

Obj = dict[str, Any]
NS = "ml"
OPTS = CompileOptions(namespace=NS, image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/gpu.shared", gateway="web")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    apps, _ = load_apps("tests.kubernetes.k8s_demo_app:app")
    return apps[0]


@pytest.fixture(scope="module")
def scaled() -> LoadedApp:
    @serve.deployment(name="M", autoscaling_config={"min_replicas": 1, "max_replicas": 3})
    class M:
        pass

    return LoadedApp(spec=build_app_spec(M.bind(), name="default"), entry={"name": "default"})


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).objects


def warnings_of(app: LoadedApp, **changes: Any) -> list[str]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).warnings


def scope() -> list[Scope]:
    return [Scope(NS, prune_selector("default"))]


def deploy(cluster: FakeCluster, objs: list[Obj]) -> dict[str, int]:
    return execute(plan_apply(objs, cluster, scope()), cluster)


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


# --- problem 5: switching autoscalers ---------------------------------------------------------


def test_hpa_to_keda_deletes_the_hpa_before_creating_the_scaled_object(scaled: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(scaled, autoscaler="hpa"))
    assert cluster.names("HorizontalPodAutoscaler") == ["default-m"]
    plan = plan_apply(build(scaled), cluster, scope())
    assert [str(r) for r in plan.prune_first] == ["horizontalpodautoscaler.autoscaling/default-m"]
    counts = execute(plan, cluster)
    assert counts["pruned"] == 1 and cluster.names("ScaledObject") == ["default-m"]
    # Only KEDA's own HPA is left, and it is never pruned (KEDA copied shoal's labels onto it).
    assert cluster.names("HorizontalPodAutoscaler") == ["keda-hpa-default-m"]
    deleted = [i for i, c in enumerate(cluster.calls) if c == ("delete", ("HorizontalPodAutoscaler", "default-m"))]
    created = [i for i, c in enumerate(cluster.calls) if c[0] == "apply" and c[1][1] == "ScaledObject"]
    assert deleted and created and deleted[0] < created[0]


def test_the_old_order_is_what_keda_refuses(scaled: LoadedApp) -> None:
    """The fake's webhook is KEDA's rule: apply first, prune after, and the ScaledObject is refused."""
    cluster = FakeCluster()
    deploy(cluster, build(scaled, autoscaler="hpa"))
    plan = plan_apply(build(scaled), cluster, scope())
    plan.prune_first = []
    with pytest.raises(ApplyRejected, match=r"already managed by the hpa 'default-m'"):
        execute(plan, cluster)


def test_keda_to_hpa_and_back_and_kedas_hpa_is_left_to_keda(scaled: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(scaled))
    assert cluster.names("HorizontalPodAutoscaler") == ["keda-hpa-default-m"]
    again = deploy(cluster, build(scaled))
    assert again["pruned"] == 0 and cluster.names("HorizontalPodAutoscaler") == ["keda-hpa-default-m"]
    plan = plan_apply(build(scaled, autoscaler="hpa"), cluster, scope())
    assert [str(r) for r in plan.prune_first] == ["scaledobject.keda.sh/default-m"]
    execute(plan, cluster)
    # The ScaledObject went first, and KEDA's HPA with it (garbage collected): one autoscaler at any time.
    assert cluster.names("ScaledObject") == [] and cluster.names("HorizontalPodAutoscaler") == ["default-m"]
    deploy(cluster, build(scaled))
    assert cluster.names("HorizontalPodAutoscaler") == ["keda-hpa-default-m"]


def test_an_autoscaler_of_another_workload_is_pruned_last(demo: LoadedApp, scaled: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(scaled, autoscaler="hpa"))
    # A build without the autoscaled deployment: nothing replaces its HPA, so it goes with the rest.
    plan = plan_apply([o for o in build(scaled, autoscaler="hpa") if o["kind"] != "HorizontalPodAutoscaler"],
                      cluster, scope())
    assert plan.prune_first == [] and [str(r) for r in plan.prune] == ["horizontalpodautoscaler.autoscaling/default-m"]


# --- problem 6: Gateway API versions and strict field validation ------------------------------


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as a JSON schema that refuses unknown fields (fieldValidation=Strict)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_errors(route: Obj, release: str) -> list[str]:
    import jsonschema

    doc = json.loads((DATA / f"gateway-api-{release}-httproute-spec.json").read_text())
    validator = jsonschema.Draft7Validator(_strict(doc["spec"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(route["spec"])]


@pytest.mark.parametrize("version", ["1.0", "v1.1", "1.1.0"])
def test_route_for_gateway_api_before_1_2_fits_the_standard_crd(demo: LoadedApp, version: str) -> None:
    pytest.importorskip("jsonschema")
    objs = build(demo, gateway_api_version=version, route_timeout="2h")
    route = one(objs, "HTTPRoute")
    assert "timeouts" not in route["spec"]["rules"][0]
    assert crd_errors(route, "v1.1.0") == []
    lost = [w for w in warnings_of(demo, gateway_api_version=version, route_timeout="2h") if "timeouts" in w]
    assert len(lost) == 1 and "--route-timeout 2h" in lost[0] and "v1.2" in lost[0]


def test_default_route_has_timeouts_and_needs_gateway_api_1_2(demo: LoadedApp) -> None:
    pytest.importorskip("jsonschema")
    route = one(build(demo), "HTTPRoute")
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "1h"}
    assert crd_errors(route, "v1.2.0") == []
    errors = crd_errors(route, "v1.1.0")  # the reason for the option: v1.1's CRD has no such field
    assert errors and "timeouts" in errors[0]
    assert not any("timeouts" in w for w in warnings_of(demo))


def test_apply_asks_for_strict_field_validation(demo: LoadedApp) -> None:
    # A v1.1 cluster and a v1.2 build: refused, not silently stripped of its 1 h timeout.
    cluster = FakeCluster(gateway_api="v1.1.0")
    with pytest.raises(ApplyRejected, match=r"timeouts: field not declared in schema"):
        deploy(cluster, build(demo))
    assert {c[1] for c in cluster.calls if c[0] == "field_validation"} == {"Strict"}
    # Built for the cluster's release: applies, and the diff's dry runs ask for Strict too.
    objs = build(demo, gateway_api_version="1.1")
    ka.render_diff(plan_apply(objs, cluster, scope()), cluster)
    assert deploy(cluster, objs)["created"] > 0
    assert {c[1] for c in cluster.calls if c[0] == "field_validation"} == {"Strict"}


def test_the_real_client_sends_field_validation() -> None:
    """KubernetesAPI.apply puts fieldValidation on the PATCH query (the client has no parameter for it)."""
    seen: dict[str, Any] = {}

    class Resource:
        def server_side_apply(self, **kw: Any) -> Any:
            seen.update(kw)
            return type("Out", (), {"to_dict": lambda _self: {"metadata": {"resourceVersion": "1"}}})()

    api = object.__new__(ka.KubernetesAPI)
    api._resource = lambda api_version, kind: Resource()  # type: ignore[method-assign]
    api._errors = lambda what: contextlib.nullcontext()  # type: ignore[method-assign]
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ml"}}
    api.apply(obj, field_manager="shoal", force=False, dry_run=True, field_validation="Strict")
    assert seen["query_params"] == [("fieldValidation", "Strict")]
    assert seen["field_manager"] == "shoal" and seen["dry_run"] == "All"


def test_gateway_api_version_errors(demo: LoadedApp) -> None:
    for bad in ("0.8", "2.0", "latest", "1"):
        with pytest.raises(CompileError, match=r"--gateway-api-version"):
            build(demo, gateway_api_version=bad)


# --- problem 9: network policies ---------------------------------------------------------------


def pods_of(objs: list[Obj]) -> dict[str, Endpoint]:
    out = {}
    for d in objs:
        if d["kind"] == "Deployment" and "shoal.dev/deployment" in d["metadata"]["annotations"]:  # not the scaler
            tmpl = d["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
            out[d["metadata"]["annotations"]["shoal.dev/deployment"]] = Endpoint(
                labels=tmpl["metadata"]["labels"], namespace=NS, ports=ports)
    return out


def test_http_only_from_the_gateway_namespace(demo: LoadedApp) -> None:
    objs = build(demo, gateway_namespace="gateway-system")
    api = pods_of(objs)["Api"]
    proxy = Endpoint(labels={"app": "envoy"}, namespace="gateway-system")
    same_ns = Endpoint(labels={"app": "curl"}, namespace=NS)
    other = Endpoint(labels={"app": "curl"}, namespace="team-b")
    assert allowed(objs, proxy, api, names.HTTP_PORT)
    # Before: any pod of any namespace could skip the Gateway (its auth, rate limits, TLS).
    assert not allowed(objs, other, api, names.HTTP_PORT)
    assert not allowed(objs, same_ns, api, names.HTTP_PORT)
    assert not allowed(objs, proxy, pods_of(objs)["Model"], names.HTTP_PORT)


def test_http_from_load_balancer_addresses(demo: LoadedApp) -> None:
    objs = build(demo, http_from_cidrs=("35.191.0.0/16", "130.211.0.0/22"))
    api = pods_of(objs)["Api"]
    assert allowed(objs, Endpoint(pod=False, ip="35.191.7.8"), api, names.HTTP_PORT)
    assert allowed(objs, Endpoint(pod=False, ip="130.211.1.1"), api, names.HTTP_PORT)
    assert not allowed(objs, Endpoint(pod=False, ip="35.191.7.8"), api, names.ADMIN_PORT)
    assert not allowed(objs, Endpoint(pod=False, ip="203.0.113.9"), api, names.HTTP_PORT)
    assert not allowed(build(demo), Endpoint(pod=False, ip="35.191.7.8"), api, names.HTTP_PORT)


def test_http_peers_without_a_gateway(demo: LoadedApp) -> None:
    api = pods_of(build(demo))["Api"]
    other = Endpoint(labels={}, namespace="team-b")
    same_ns = Endpoint(labels={}, namespace=NS)
    # No route: in-cluster clients of the ClusterIP Service in the app's namespace.
    objs = build(demo, gateway=None)
    assert allowed(objs, same_ns, api, names.HTTP_PORT) and not allowed(objs, other, api, names.HTTP_PORT)
    # An Ingress controller's namespace is not known: open, and said so.
    objs = build(demo, gateway=None, ingress_class="nginx")
    assert allowed(objs, other, api, names.HTTP_PORT)
    assert any("--http-from-namespace" in w for w in warnings_of(demo, gateway=None, ingress_class="nginx"))
    objs = build(demo, gateway=None, ingress_class="nginx", http_from_namespaces=("ingress-nginx",))
    assert not allowed(objs, other, api, names.HTTP_PORT)
    assert allowed(objs, Endpoint(labels={}, namespace="ingress-nginx"), api, names.HTTP_PORT)
    assert allowed(build(demo, http_from_namespaces=("*",)), other, api, names.HTTP_PORT)


def test_metrics_only_from_the_monitoring_namespace_and_probes_from_the_node(demo: LoadedApp) -> None:
    objs = build(demo)
    pods = pods_of(objs)
    prometheus = Endpoint(labels={"app": "prometheus"}, namespace="monitoring")
    other = Endpoint(labels={}, namespace="team-b")
    kubelet = Endpoint(pod=False, node=True, ip="10.0.0.5")
    for pod in pods.values():
        assert allowed(objs, prometheus, pod, names.ADMIN_PORT)
        assert not allowed(objs, other, pod, names.ADMIN_PORT)  # before: every namespace
        # Probes hit the admin port from the pod's node: NetworkPolicy does not apply to them.
        assert allowed(objs, kubelet, pod, names.ADMIN_PORT)
    assert not allowed(objs, Endpoint(pod=False, ip="10.0.0.5"), pods["Api"], names.ADMIN_PORT)
    objs = build(demo, metrics_from_namespaces=("observability", "keda"))
    assert allowed(objs, Endpoint(labels={}, namespace="keda"), pods["Model"], names.ADMIN_PORT)
    assert not allowed(objs, prometheus, pods["Model"], names.ADMIN_PORT)


def test_dns_egress_is_configurable(demo: LoadedApp) -> None:
    pod = pods_of(build(demo))["Model"]
    kube_dns = Endpoint(labels={"k8s-app": "kube-dns"}, namespace="kube-system")
    node_local = Endpoint(pod=False, ip="169.254.20.10")
    objs = build(demo)
    assert allowed(objs, pod, kube_dns, 53, "UDP") and allowed(objs, pod, kube_dns, 53, "TCP")
    assert not allowed(objs, pod, node_local, 53, "UDP")  # the NodeLocal DNSCache address: blocked by default
    objs = build(demo, dns_cidrs=("169.254.20.10/32",))
    assert allowed(objs, pod, node_local, 53, "UDP") and allowed(objs, pod, kube_dns, 53, "UDP")
    assert not allowed(objs, pod, Endpoint(pod=False, ip="169.254.20.11"), 53, "UDP")
    # OpenShift: its DNS pods listen on 5353 in openshift-dns.
    os_dns = Endpoint(labels={"dns.operator.openshift.io/daemonset-dns": "default"}, namespace="openshift-dns")
    objs = build(demo, dns_namespace="openshift-dns", dns_pod_labels={"dns.operator.openshift.io/daemonset-dns":
                                                                        "default"}, dns_ports=(5353,))
    assert allowed(objs, pod, os_dns, 5353, "UDP") and allowed(objs, pod, os_dns, 5353, "TCP")
    assert not allowed(objs, pod, os_dns, 53, "UDP") and not allowed(objs, pod, kube_dns, 53, "UDP")
    assert not allowed(build(demo), pod, os_dns, 5353, "UDP")
    objs = build(demo, dns_egress="any", dns_ports=(53, 5353))
    assert allowed(objs, pod, node_local, 5353, "UDP") and not allowed(objs, pod, node_local, 80)


def test_network_option_errors(demo: LoadedApp) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"http_from_cidrs": ("10.0.0.300/8",)}, "--http-from-cidr"),
        ({"http_from_cidrs": ("10.0.0.1",)}, "--http-from-cidr"),
        ({"dns_cidrs": ("nodelocal",)}, "--dns-cidr"),
        ({"dns_ports": (0,)}, "--dns-port"),
        ({"dns_ports": ()}, "--dns-port"),
        ({"dns_namespace": "*"}, "--dns-namespace"),
        ({"dns_pod_labels": {"k8s-app": "bad value"}}, "--dns-pod-label"),
        ({"metrics_from_namespaces": ("Monitoring",)}, "--metrics-namespace"),
    ]
    for changes, flag in cases:
        with pytest.raises(CompileError, match=flag):
            build(demo, **changes)


def test_generated_policies_validate(demo: LoadedApp) -> None:
    pytest.importorskip("kubernetes_validate")
    from shoal.kubernetes.validate import validate_object

    objs = build(demo, http_from_cidrs=("35.191.0.0/16",), dns_cidrs=("169.254.20.10/32",), dns_ports=(53, 5353),
                 gateway_namespace="gateway-system")
    for obj in objs:
        if obj["kind"] == "NetworkPolicy":
            validate_object(copy.deepcopy(obj))


def test_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from click.testing import CliRunner

    from shoal.kubernetes import cli as k8s_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = ["build", "tests.kubernetes.k8s_demo_app:app", "--image", "r.example.com/d:1", "-n", NS,
            "--gpu-resource", "nvidia.com/gpu.shared", "--gateway", "web", "--gateway-api-version", "1.1",
            "--http-from-cidr", "35.191.0.0/16", "--metrics-from-namespace", "obs", "--dns-namespace",
            "openshift-dns", "--dns-pod-label", "dns.operator.openshift.io/daemonset-dns=default",
            "--dns-port", "5353", "--dns-cidr", "169.254.20.10/32"]
    out = CliRunner().invoke(k8s_cli.k8s, args)
    assert out.exit_code == 0, out.output
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert "timeouts" not in one(objs, "HTTPRoute")["spec"]["rules"][0]
    dns = one(objs, "NetworkPolicy", "default-allow-dns")["spec"]["egress"][0]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"dns.operator.openshift.io/daemonset-dns": "default"}
    assert dns["to"][1] == {"ipBlock": {"cidr": "169.254.20.10/32"}}
    assert {p["port"] for p in dns["ports"]} == {5353}
    api = one(objs, "NetworkPolicy", "default-api")["spec"]["ingress"]
    assert {"ipBlock": {"cidr": "35.191.0.0/16"}} in api[-2]["from"]
    assert api[-1]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}]
    bad = CliRunner().invoke(k8s_cli.k8s, [*args[:-2], "--dns-pod-label", "novalue"])
    assert bad.exit_code == 2 and "--dns-pod-label" in bad.output
