"""``shoal k8s status`` against a fake cluster: the objects `shoal k8s apply` created, with the
status fields a real cluster would fill in (ready replicas, KEDA's health, the Gateway's
verdict on the route, pods in CrashLoopBackOff or OOMKilled), summarized per deployment."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from shoal.kubernetes import cli as k8s_cli
from shoal.kubernetes.cli import k8s
from shoal.kubernetes.status import summarize
from tests.kubernetes.k8s_fake_api import FakeCluster
from tests.kubernetes.test_k8s_cli import ARGS, DEMO, ROOT, invoke


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    monkeypatch.chdir(ROOT)
    fake = FakeCluster()
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: fake)
    assert invoke("apply", DEMO, *ARGS).exit_code == 0
    return fake


def of_kind(cluster: FakeCluster, kind: str) -> list[dict[str, Any]]:
    return [o for (_, k, _, _), o in cluster.objects.items() if k == kind]


def all_ready(cluster: FakeCluster) -> None:
    for d in of_kind(cluster, "Deployment"):
        d["status"] = {"replicas": d["spec"]["replicas"], "readyReplicas": d["spec"]["replicas"]}
    for r in of_kind(cluster, "HTTPRoute"):
        r["status"] = {"parents": [{"conditions": [{"type": "Accepted", "status": "True"},
                                                   {"type": "ResolvedRefs", "status": "True"}]}]}


def test_a_healthy_app_is_ready_with_exit_status_0(cluster: FakeCluster) -> None:
    all_ready(cluster)
    res = invoke("status", "-n", "ml", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    (app,) = got["applications"]
    assert app["app"] == "default" and app["ready"] is True
    deployments = {d["deployment"]: d for d in app["deployments"]}
    assert set(deployments) == {d["metadata"]["annotations"].get("shoal.dev/deployment")
                                or f"({d['metadata']['labels']['app.kubernetes.io/component']})"
                                for d in of_kind(cluster, "Deployment")}
    assert {"Api", "Tokenizer", "Model"} <= set(deployments)
    assert all(d["ready"] == d["desired"] and d["problems"] == [] for d in deployments.values())
    assert app["route"] == "HTTPRoute/default"
    table = invoke("status", "-n", "ml")
    assert table.exit_code == 0 and "accepted" in table.stdout


def test_problems_are_named_and_the_exit_status_is_1(cluster: FakeCluster) -> None:
    all_ready(cluster)
    dep = next(d for d in of_kind(cluster, "Deployment") if "shoal.dev/deployment" in d["metadata"]["annotations"])
    dep["status"]["readyReplicas"] = 0
    labels = dep["spec"]["selector"]["matchLabels"]
    for i, (waiting, last) in enumerate([("CrashLoopBackOff", "OOMKilled"), ("CrashLoopBackOff", None)]):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"p{i}", "namespace": "ml",
                            "labels": {**labels, "app.kubernetes.io/managed-by": "shoal"}},
               "status": {"phase": "Running", "containerStatuses": [{
                   "state": {"waiting": {"reason": waiting}},
                   "lastState": {"terminated": {"reason": last}} if last else {}}]}}
        cluster.objects[FakeCluster.key(pod)] = pod
    route = of_kind(cluster, "HTTPRoute")[0]
    route["status"] = {"parents": [{"conditions": [
        {"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners", "message": "no listener"}]}]}
    res = invoke("status", "-n", "ml", "--json")
    assert res.exit_code == 1
    (app,) = json.loads(res.stdout)["applications"]
    assert app["ready"] is False
    assert app["route_problem"] == "Accepted False: NotAllowedByListeners no listener"
    name = dep["metadata"]["annotations"]["shoal.dev/deployment"]
    row = next(d for d in app["deployments"] if d["deployment"] == name)
    assert row["ready"] == 0 and row["ok"] is False
    assert row["problems"] == ["2 pods: CrashLoopBackOff", "1 pod: OOMKilled (raise its memory)"]


def test_an_unreachable_cluster_is_exit_status_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: FakeCluster(unreachable=True))
    res = CliRunner().invoke(k8s, ["status", "-n", "ml"])
    assert res.exit_code == 2
    assert "cannot reach the Kubernetes API" in res.stderr


def test_no_app_found_is_exit_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: FakeCluster())
    res = invoke("status", "-n", "empty")
    assert res.exit_code == 1 and "no shoal application in namespace 'empty'" in res.stdout


def test_keda_failing_and_an_unschedulable_pod_are_explained() -> None:
    workload = {"kind": "Deployment", "metadata": {"name": "app-model", "labels": {}, "annotations": {
        "shoal.dev/app": "app", "shoal.dev/deployment": "Model"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"x": "1"}}}, "status": {"readyReplicas": 0}}
    scaled = {"kind": "ScaledObject", "metadata": {"name": "app-model"},
              "spec": {"scaleTargetRef": {"name": "app-model"}, "minReplicaCount": 0, "maxReplicaCount": 4},
              "status": {"health": {"s0-metric-api-desired": {"numberOfFailures": 5, "status": "Failing"}}}}
    pending = {"kind": "Pod", "metadata": {"name": "p", "labels": {"x": "1"}},
               "status": {"phase": "Pending", "conditions": [
                   {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    (app,) = summarize([workload], [scaled], [], [pending])
    (row,) = app.deployments
    assert row.autoscaler == "keda 0..4"
    assert "KEDA cannot read s0-metric-api-desired" in row.autoscaler_problem
    assert row.problems == ["1 pod: unschedulable (0/3 nodes are available: 3 Insufficient nvidia.com/gpu.)"]
    assert app.route == "" and not app.ready
