"""The generated NetworkPolicies admit exactly the call graph, checked with a NetworkPolicy evaluator.

For every ordered pair of pods of an app and every port, the evaluator's verdict must equal what
the graph says: caller -> callee on the RPC port and nothing else between the app's pods; from
outside, the Gateway's namespace -> the ingress deployment's HTTP port and the monitoring
namespace -> the admin port; out of the app, DNS only.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest

from shoal.deployment import AppSpec
from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_app
from shoal.kubernetes.netpol import Endpoint, allowed, selector_matches
from shoal.kubernetes.targets import load_apps

Obj = dict[str, Any]
NS = "ml"
OPTS = CompileOptions(namespace=NS, image="registry.example.com/app:1", version="v1", gateway="web",
                      gpu_resource="nvidia.com/gpu.shared")
PORTS = (names.RPC_PORT, names.HTTP_PORT, names.ADMIN_PORT, 22, 5432)


def pods_of(objs: list[Obj]) -> dict[str, Endpoint]:
    """One Endpoint per Deployment, with its pod template's labels and named ports."""
    out = {}
    for d in objs:
        if d["kind"] != "Deployment" or "shoal.dev/deployment" not in d["metadata"]["annotations"]:
            continue  # (the autoscaler's scaler pod is not a deployment of the app)
        tmpl = d["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
        out[d["metadata"]["annotations"]["shoal.dev/deployment"]] = Endpoint(
            labels=tmpl["metadata"]["labels"], namespace=d["metadata"]["namespace"], ports=ports)
    return out


def expected(spec: AppSpec, src: str, dst: str, port: int) -> bool:
    """Between the app's own pods: the graph's edges on the RPC port, nothing else.

    (The HTTP port admits the Gateway's namespace, here the app's own, but the app's pods have no
    egress beyond their callees and DNS.)
    """
    return port == names.RPC_PORT and (src, dst) in spec.edges()


def check_exact(spec: AppSpec, objs: list[Obj]) -> None:
    pods = pods_of(objs)
    assert set(pods) == set(spec.deployments)
    for (src, s), (dst, d) in itertools.product(pods.items(), pods.items()):
        for port in PORTS:
            want = expected(spec, src, dst, port)
            assert allowed(objs, s, d, port) is want, f"{src} -> {dst}:{port} should be {want}"


@pytest.fixture(scope="module")
def rag() -> tuple[AppSpec, list[Obj]]:
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apps, _ = load_apps("examples.rag.app:app", name="rag")
    spec = apps[0].spec
    return spec, compile_app(spec, apps[0].entry, OPTS).objects


@pytest.mark.rag
def test_rag_graph_is_what_the_example_binds(rag: tuple[AppSpec, list[Obj]]) -> None:
    spec, _ = rag
    assert spec.ingress == "RAGApp"
    assert sorted(spec.edges()) == [("RAGApp", "Generator"), ("RAGApp", "Retriever"), ("Retriever", "Embedder")]


@pytest.mark.rag
def test_rag_policies_admit_exactly_the_call_graph(rag: tuple[AppSpec, list[Obj]]) -> None:
    spec, objs = rag
    pods = pods_of(objs)
    rpc = names.RPC_PORT
    # The seed's concern: a compromised generator cannot reach the embedder.
    assert not allowed(objs, pods["Generator"], pods["Embedder"], rpc)
    assert not allowed(objs, pods["Generator"], pods["Retriever"], rpc)
    # The ingress reaches both of its callees; the retriever reaches the embedder.
    assert allowed(objs, pods["RAGApp"], pods["Retriever"], rpc)
    assert allowed(objs, pods["RAGApp"], pods["Generator"], rpc)
    assert allowed(objs, pods["Retriever"], pods["Embedder"], rpc)
    # Not the other way round, and not skipping a hop.
    assert not allowed(objs, pods["Embedder"], pods["Retriever"], rpc)
    assert not allowed(objs, pods["RAGApp"], pods["Embedder"], rpc)
    check_exact(spec, objs)


@pytest.mark.rag
def test_rag_outside_traffic(rag: tuple[AppSpec, list[Obj]]) -> None:
    _, objs = rag
    pods = pods_of(objs)
    # --gateway web without --gateway-namespace: the Gateway (and its proxies) live in the app's namespace.
    gateway = Endpoint(labels={"app": "envoy"}, namespace=NS)
    prometheus = Endpoint(labels={"app": "prometheus"}, namespace="monitoring")
    stranger = Endpoint(labels={"app": "other"}, namespace=NS)
    elsewhere = Endpoint(labels={"app": "envoy"}, namespace="gateway-system")
    assert allowed(objs, gateway, pods["RAGApp"], names.HTTP_PORT)
    assert not allowed(objs, elsewhere, pods["RAGApp"], names.HTTP_PORT)  # no bypassing the Gateway
    assert not allowed(objs, elsewhere, pods["RAGApp"], names.ADMIN_PORT)
    assert not allowed(objs, gateway, pods["Generator"], names.HTTP_PORT)
    assert not allowed(objs, gateway, pods["RAGApp"], names.RPC_PORT)
    for pod in pods.values():
        assert allowed(objs, prometheus, pod, names.ADMIN_PORT)
        assert not allowed(objs, stranger, pod, names.RPC_PORT)
    # Outside the cluster (not a pod): nothing but what an ipBlock would admit, and there is none.
    internet = Endpoint(pod=False, ip="203.0.113.9")
    assert not allowed(objs, internet, pods["RAGApp"], names.HTTP_PORT)
    # Egress: DNS to kube-dns only; nothing else leaves the app.
    kube_dns = Endpoint(labels={"k8s-app": "kube-dns"}, namespace="kube-system")
    for pod in pods.values():
        assert allowed(objs, pod, kube_dns, 53, "UDP")
        assert allowed(objs, pod, kube_dns, 53, "TCP")
        assert not allowed(objs, pod, kube_dns, 80)
        assert not allowed(objs, pod, stranger, 53, "UDP")
        assert not allowed(objs, pod, internet, 443)


def test_demo_policies_admit_exactly_the_call_graph() -> None:
    apps, _ = load_apps("tests.kubernetes.k8s_demo_app:app")
    spec = apps[0].spec
    objs = compile_app(spec, apps[0].entry, OPTS).objects
    check_exact(spec, objs)


def test_namespace_restrictions() -> None:
    from dataclasses import replace

    apps, _ = load_apps("tests.kubernetes.k8s_demo_app:app")
    opts = replace(OPTS, http_from_namespaces=("gateway-system",), metrics_from_namespaces=("monitoring",))
    objs = compile_app(apps[0].spec, apps[0].entry, opts).objects
    pods = pods_of(objs)
    gw = Endpoint(labels={}, namespace="gateway-system")
    prom = Endpoint(labels={}, namespace="monitoring")
    assert allowed(objs, gw, pods["Api"], names.HTTP_PORT)
    assert not allowed(objs, prom, pods["Api"], names.HTTP_PORT)
    assert allowed(objs, prom, pods["Model"], names.ADMIN_PORT)
    assert not allowed(objs, gw, pods["Model"], names.ADMIN_PORT)
    # App pods are in neither namespace: the admin port is closed to them now.
    assert not allowed(objs, pods["Api"], pods["Model"], names.ADMIN_PORT)


def test_canary_and_stable_pods_are_isolated_from_each_other() -> None:
    from dataclasses import replace

    apps, _ = load_apps("tests.kubernetes.k8s_demo_app:app")
    stable = compile_app(apps[0].spec, apps[0].entry, OPTS).objects
    canary = compile_app(apps[0].spec, apps[0].entry, replace(OPTS, version="v2", canary_of="v1")).objects
    both = stable + canary
    s, c = pods_of(stable), pods_of(canary)
    assert allowed(both, c["Api"], c["Model"], names.RPC_PORT)
    assert not allowed(both, c["Api"], s["Model"], names.RPC_PORT)
    assert not allowed(both, s["Api"], c["Model"], names.RPC_PORT)


# --- the evaluator itself ---------------------------------------------------------------------


def _policy(spec: Obj, ns: str = "a") -> Obj:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": ns}, "spec": spec}


def test_evaluator_semantics() -> None:
    web = Endpoint(labels={"app": "web"}, namespace="a", ports={"http": 80})
    db = Endpoint(labels={"app": "db"}, namespace="a")
    other_ns = Endpoint(labels={"app": "web"}, namespace="b")
    assert allowed([], web, db, 5432)  # no policy: everything allowed
    deny = _policy({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]})
    assert not allowed([deny], web, db, 5432)
    assert allowed([deny], db, web, 80)  # web is not isolated
    allow = _policy({"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 5432}]}]})
    assert allowed([deny, allow], web, db, 5432)
    assert not allowed([deny, allow], web, db, 5433)
    assert not allowed([deny, allow], other_ns, db, 5432)  # podSelector alone: same namespace only
    assert not allowed([deny, allow], web, db, 5432, "UDP")
    cross = _policy({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["b"]}]}}]}]})
    assert allowed([cross], other_ns, db, 1)
    assert not allowed([cross], web, db, 1)
    named = _policy({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "http"}]}]})
    assert allowed([named], db, web, 80)
    assert not allowed([named], db, web, 81)
    egress = _policy({"podSelector": {}, "policyTypes": ["Egress"],
                      "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]})
    assert allowed([egress], web, Endpoint(pod=False, ip="10.2.3.4"), 443)
    assert not allowed([egress], web, Endpoint(pod=False, ip="10.1.3.4"), 443)
    assert not allowed([egress], web, db, 5432)
    ranged = _policy({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8002}]}]})
    assert allowed([ranged], web, db, 8001) and not allowed([ranged], web, db, 8003)


def test_selector_matches() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"a": "1"}}, labels)
    assert not selector_matches({"matchLabels": {"a": "2"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "c", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "b", "operator": "NotIn", "values": ["2"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, labels)
