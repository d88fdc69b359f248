"""``shoal k8s apply``'s logic against a small in-memory fake of the Kubernetes API (k8s_fake_api)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from shoal.kubernetes import apply as ka
from shoal.kubernetes.apply import (
    FIELD_MANAGER,
    ApplyConflict,
    ApplyRejected,
    Ref,
    Scope,
    execute,
    plan_apply,
    render_diff,
)
from shoal.kubernetes.compiler import CompileOptions, compile_apps, instance_name, prune_selector
from shoal.kubernetes.targets import LoadedApp, load_apps
from tests.kubernetes.k8s_fake_api import FakeCluster

Obj = dict[str, Any]


OPTS = CompileOptions(namespace="ml", image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/gpu.shared", gateway="web")


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    apps, _ = load_apps("tests.kubernetes.k8s_demo_app:app")
    return apps[0]


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).objects


def scope(**kw: Any) -> list[Scope]:
    return [Scope("ml", prune_selector("default"), **kw)]


def deploy(cluster: FakeCluster, objs: list[Obj], scopes: list[Scope] | None = None, **kw: Any) -> dict[str, int]:
    plan = plan_apply(objs, cluster, scopes or scope())
    return execute(plan, cluster, **kw)


# --------------------------------------------------------------------------------------------


def test_first_apply_creates_everything_then_nothing_changes(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    objs = build(demo)
    counts = deploy(cluster, objs)
    assert counts["created"] == len(objs) and counts["pruned"] == 0
    applied = [c[1] for c in cluster.calls if c[0] == "apply"]
    assert applied == [FakeCluster.key(o) for o in objs]  # build order: config before workloads
    again = deploy(cluster, build(demo))
    assert again == {"created": 0, "configured": 0, "unchanged": len(objs), "skipped": 0, "pruned": 0}


def test_prune_removes_what_the_build_no_longer_has(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo))
    # Someone else's object with similar names, and another app's: never touched.
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "default-extra", "namespace": "ml", "labels": {"app": "x"}},
               "spec": {"template": {"spec": {}}}}
    cluster.apply(foreign, field_manager=FIELD_MANAGER, force=False, dry_run=False)
    other_app = copy.deepcopy(cluster.objects[("apps/v1", "Deployment", "ml", "default-api")])
    other_app["metadata"]["name"] = "other-api"
    other_app["metadata"]["labels"]["app.kubernetes.io/part-of"] = "other"
    cluster.objects[FakeCluster.key(other_app)] = other_app
    # The new build drops the Tokenizer deployment and its ScaledObject-free objects.
    objs = [o for o in build(demo) if "tokenizer" not in o["metadata"]["name"]]
    plan = plan_apply(objs, cluster, scope())
    pruned = sorted(str(r) for r in plan.prune)
    assert pruned == ["deployment.apps/default-tokenizer", "networkpolicy.networking.k8s.io/default-tokenizer",
                      "poddisruptionbudget.policy/default-tokenizer", "service/default-tokenizer"]
    counts = execute(plan, cluster)
    assert counts["pruned"] == 4
    assert cluster.names("Deployment") == ["default-api", "default-extra", "default-model", "default-shoal-scaler",
                                           "other-api"]
    # Routes go first, service accounts last: the order of PRUNE_KINDS.
    deleted = [c[1][0] for c in cluster.calls if c[0] == "delete"]
    order = [k for _, k in ka.PRUNE_KINDS]
    assert deleted == sorted(deleted, key=order.index)


def test_no_prune(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo))
    objs = [o for o in build(demo) if o["kind"] != "PodDisruptionBudget"]
    plan = plan_apply(objs, cluster, scope(), prune=False)
    assert plan.prune == []


def test_switching_autoscaler_prunes_the_other_kind(demo: LoadedApp) -> None:
    from shoal import serve
    from shoal.deployment import build_app_spec

    @serve.deployment(name="M", autoscaling_config={"min_replicas": 1, "max_replicas": 3})
    class M:
        pass

    app = LoadedApp(spec=build_app_spec(M.bind(), name="default"), entry={"name": "default"})
    cluster = FakeCluster()
    deploy(cluster, build(app))
    assert cluster.names("ScaledObject") == ["default-m"]
    deploy(cluster, build(app, autoscaler="hpa"))
    assert cluster.names("ScaledObject") == []
    assert cluster.names("HorizontalPodAutoscaler") == ["default-m"]


def test_secret_is_created_once_and_never_overwritten_or_pruned(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo, create_secret=True))
    key = ("v1", "Secret", "ml", "default-rpc")
    first = cluster.objects[key]["data"]
    counts = deploy(cluster, build(demo, create_secret=True))
    assert counts["skipped"] == 3  # the RPC secret, the pod certificate and the scaler's token
    assert cluster.objects[key]["data"] == first
    deploy(cluster, build(demo))  # without --create-secret: the Secret stays
    assert key in cluster.objects
    assert not any(c == ("list", ("Secret", prune_selector("default"))) for c in cluster.calls)


def test_server_side_dry_run_diff(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo, version="v1"))
    before = copy.deepcopy(cluster.objects)
    objs = [o for o in build(demo, version="v2") if "tokenizer" not in o["metadata"]["name"]]
    plan = plan_apply(objs, cluster, scope())
    text, mode = render_diff(plan, cluster)
    assert mode == "server"
    assert cluster.objects == before  # a dry run changes nothing
    assert "--- live/deployment.apps/default-api\n+++ new/deployment.apps/default-api" in text
    assert "-    app.kubernetes.io/version: v1\n+    app.kubernetes.io/version: v2" in text
    assert "--- live/deployment.apps/default-tokenizer\n+++ (pruned)" in text
    # Server bookkeeping and server defaults are not noise in a server-side diff.
    changes = text.split("+++ (pruned)")[0]
    assert "managedFields" not in text and "resourceVersion" not in text and "dnsPolicy" not in changes
    unchanged, _ = render_diff(plan_apply(build(demo, version="v1"), cluster, scope()), cluster)
    assert unchanged == ""


def test_local_diff_when_the_server_refuses_dry_runs(demo: LoadedApp) -> None:
    cluster = FakeCluster(refuse_dry_run=True)
    deploy(cluster, build(demo, version="v1"))
    objs = build(demo, version="v1", labels={"team": "search"})
    text, mode = render_diff(plan_apply(objs, cluster, scope()), cluster)
    assert mode == "local"
    assert "+    team: search" in text
    # Fields the build does not set (server defaults) are left out of a local comparison.
    assert "dnsPolicy" not in text and "status" not in text
    nothing, _ = render_diff(plan_apply(build(demo, version="v1"), cluster, scope()), cluster)
    assert nothing == ""


def test_diff_of_a_new_app_and_masked_secrets(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    text, _ = render_diff(plan_apply(build(demo, create_secret=True), cluster, scope()), cluster)
    assert "+++ new/secret/default-rpc" in text
    assert "rpc-secret: '***'" in text
    secret = next(o for o in build(demo, create_secret=True) if o["kind"] == "Secret")
    assert secret["data"]["rpc-secret"] not in text


def test_kinds_the_cluster_does_not_serve(demo: LoadedApp) -> None:
    cluster = FakeCluster(unserved=("ScaledObject", "PodMonitor"))
    plan = plan_apply(build(demo), cluster, scope())  # listing for prune skips unserved kinds
    with pytest.raises(ApplyRejected, match=r"does not serve keda.sh/v1alpha1 ScaledObject.*install KEDA"):
        execute(plan, cluster)


def test_conflicts_need_force(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo))
    key = ("apps/v1", "Deployment", "ml", "default-api")
    cluster.owners[key] = "kubectl-edit"
    with pytest.raises(ApplyConflict, match=r"kubectl-edit"):
        deploy(cluster, build(demo, version="v2"))
    counts = deploy(cluster, build(demo, version="v3"), force=True)
    assert counts["configured"] > 0


def test_canary_apply_leaves_the_stable_version_alone(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo, version="v1"))
    stable = sorted(cluster.objects)
    canary_objs = build(demo, version="v2", canary_of="v1", canary_weight=20)
    inst = instance_name("default", "v2", True)
    canary_scope = [Scope("ml", prune_selector("default", inst), canary_of="v1", app="default")]
    plan = plan_apply(canary_objs, cluster, canary_scope)
    assert plan.prune == [] and plan.warnings == []
    execute(plan, cluster)
    assert set(stable) <= set(cluster.objects)  # nothing of v1 was deleted
    assert "default-v2-api" in cluster.names("Deployment") and "default-api" in cluster.names("Deployment")
    route = cluster.objects[("gateway.networking.k8s.io/v1", "HTTPRoute", "ml", "default")]
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [80, 20]
    # Promote: a plain build of v2 rolls the stable objects and prunes the canary's.
    execute(plan_apply(build(demo, version="v2"), cluster, scope()), cluster)
    assert cluster.names("Deployment") == ["default-api", "default-model", "default-shoal-scaler", "default-tokenizer"]
    assert "default-v1-http" not in cluster.names("Service")
    route = cluster.objects[("gateway.networking.k8s.io/v1", "HTTPRoute", "ml", "default")]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"group": "", "kind": "Service", "name": "default-http",
                                                         "port": 8000}]


def test_canary_of_a_version_that_is_not_running(demo: LoadedApp) -> None:
    cluster = FakeCluster()
    deploy(cluster, build(demo, version="v1"))
    objs = build(demo, version="v3", canary_of="v2")
    inst = instance_name("default", "v3", True)
    plan = plan_apply(objs, cluster, [Scope("ml", prune_selector("default", inst), canary_of="v2", app="default")])
    assert any("no Deployment of application 'default' has version 'v2'" in w and "v1" in w for w in plan.warnings)


def test_ref_names() -> None:
    assert str(Ref("apps/v1", "Deployment", "ns", "x")) == "deployment.apps/x"
    assert str(Ref("v1", "Service", "ns", "x")) == "service/x"
    assert str(Ref("keda.sh/v1alpha1", "ScaledObject", "ns", "x")) == "scaledobject.keda.sh/x"


def test_missing_kubernetes_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake_import(name: str, package: str | None = None) -> Any:
        if name.startswith("kubernetes"):
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=r"install shoal's kubernetes extra"):
        ka.KubernetesAPI()


def test_real_client_without_a_cluster(tmp_path: Any) -> None:
    # "kubernetes.client", not "kubernetes": tests/kubernetes would pass for the package.
    pytest.importorskip("kubernetes.client")
    with pytest.raises(ka.ClusterUnreachable, match=r"kubeconfig"):
        ka.KubernetesAPI(kubeconfig=str(tmp_path / "missing"))
    config = tmp_path / "config"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    api = ka.KubernetesAPI(kubeconfig=str(config))

    api._api_client.configuration.retries = 0
    with pytest.raises(ka.ClusterUnreachable, match=r"cannot reach the Kubernetes API"):
        api.get("v1", "ConfigMap", "default", "x")


def test_a_deployment_whose_selector_changed_is_recreated(demo: LoadedApp) -> None:
    """An app applied by an older shoal (selectors on app.kubernetes.io/instance, which clashes with
    Argo CD's tracking label) moves to the new selector: the API refuses to change a Deployment's
    selector in place, so apply deletes it and creates it again, and says so."""
    cluster = FakeCluster()
    objs = build(demo)
    old = copy.deepcopy(objs)
    for o in old:
        if o["kind"] == "Deployment":
            o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] = "default"
            o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] = "default"
    deploy(cluster, old)
    with pytest.raises(ka.ApplyRejected, match="field is immutable"):  # what a plain re-apply meets
        cluster.apply(next(o for o in objs if o["kind"] == "Deployment"), field_manager=ka.FIELD_MANAGER,
                      force=False, dry_run=False)
    plan = plan_apply(objs, cluster, scope())
    names = sorted(r.name for r in plan.recreate)
    assert names == sorted(o["metadata"]["name"] for o in objs if o["kind"] == "Deployment")
    assert any("selector changed" in w for w in plan.warnings)
    said: list[str] = []
    counts = execute(plan, cluster, echo=said.append)
    assert counts["created"] == len(names)
    assert sum("deleted (its selector changed" in line for line in said) == len(names)
    for o in objs:
        if o["kind"] == "Deployment":
            live = cluster.get("apps/v1", "Deployment", "ml", o["metadata"]["name"])
            assert live is not None and live["spec"]["selector"] == o["spec"]["selector"]
    assert plan_apply(objs, cluster, scope()).recreate == []  # done once
