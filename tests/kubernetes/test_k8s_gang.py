"""Gang deployments compile to a LeaderWorkerSet: templates per rank, rendezvous environment,
leaders behind the Services, NetworkPolicies between ranks, autoscaling by groups, validation."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileError, CompileOptions, compile_app, compile_apps
from shoal.kubernetes.netpol import Endpoint, allowed
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import ObjectInvalid, check_restricted, validate_object, validate_objects

Obj = dict[str, Any]
NS = "ml"
OPTS = CompileOptions(namespace=NS, image="registry.example.com/gang:1", version="v1", gateway="web")
GANG = names.gang_name("default", "TPLinear")


@pytest.fixture(scope="module")
def pipeline() -> LoadedApp:
    apps, _ = load_apps("tests.kubernetes.k8s_gang_app:pipeline")
    return apps[0]


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).objects


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def env_of(template: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in template["spec"]["containers"][0]["env"]}


def test_a_gang_compiles_to_a_leader_worker_set(pipeline: LoadedApp) -> None:
    objs = build(pipeline)
    validate_objects(objs)
    assert not [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "default-tplinear"]
    lws = one(objs, "LeaderWorkerSet", GANG)
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    assert "replicas" not in spec  # autoscaled: the ScaledObject owns the number of groups
    assert spec["startupPolicy"] == "LeaderCreated"
    lwt = spec["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = lwt["leaderTemplate"], lwt["workerTemplate"]
    for tmpl in (leader, worker):
        c = tmpl["spec"]["containers"][0]
        assert c["args"] == ["--deployment", "TPLinear", "--rank-from-env"]
        env = env_of(tmpl)
        assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)" and env["MASTER_PORT"] == str(names.RENDEZVOUS_PORT)
        assert env["RANK"] == "$(LWS_WORKER_INDEX)" and env["WORLD_SIZE"] == "$(LWS_GROUP_SIZE)"
        assert env[names.ENV_GANG] == GANG
        # Per-rank resources from the bundles; the same probes and security as any replica.
        scratch = {"ephemeral-storage": "12Gi"}
        assert c["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", **scratch},
                                  "limits": {"cpu": "4", "memory": "16Gi", **scratch, "nvidia.com/gpu": "1"}}
        assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # STRICT_SPREAD: the ranks of one group on different nodes (test_k8s_workloads: on every version).
        spread = tmpl["spec"]["topologySpreadConstraints"][-1]
        assert spread["matchLabelKeys"] == [names.LWS_LABEL_GROUP_KEY]
        assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    ports = {p["name"] for p in leader["spec"]["containers"][0]["ports"]}
    assert ports == {"rpc", "admin", "rendezvous"}
    assert {p["name"] for p in worker["spec"]["containers"][0]["ports"]} == {"rpc", "admin"}


def test_callers_reach_the_leaders_only_and_load_is_scaled_by_groups(pipeline: LoadedApp) -> None:
    objs = build(pipeline)
    svc = one(objs, "Service", names.headless_service_name("default", "TPLinear"))
    assert svc["spec"]["selector"][names.LWS_LABEL_WORKER_INDEX] == "0"
    pdb = one(objs, "PodDisruptionBudget", "default-tplinear")
    assert names.LWS_LABEL_WORKER_INDEX not in pdb["spec"]["selector"]["matchLabels"]  # every rank counts
    so = one(objs, "ScaledObject", "default-tplinear")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1",
                                            "kind": "LeaderWorkerSet", "name": GANG}
    hpa = one(build(pipeline, autoscaler="hpa"), "HorizontalPodAutoscaler", "default-tplinear")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    validate_object(hpa)


def test_a_gang_ingress_serves_http_from_its_leaders() -> None:
    apps, _ = load_apps("tests.kubernetes.k8s_gang_app:app")
    objs = compile_apps([(apps[0].spec, apps[0].entry)], OPTS).objects
    validate_objects(objs)
    http = one(objs, "Service", names.ingress_service_name("default"))
    assert http["spec"]["selector"][names.LWS_LABEL_WORKER_INDEX] == "0"
    lws = one(objs, "LeaderWorkerSet", GANG)
    assert lws["spec"]["replicas"] == 1
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert "http" in {p["name"] for p in lwt["leaderTemplate"]["spec"]["containers"][0]["ports"]}
    assert "http" not in {p["name"] for p in lwt["workerTemplate"]["spec"]["containers"][0]["ports"]}
    assert "resources" in lwt["workerTemplate"]["spec"]["containers"][0]  # num_ranks: ray_actor_options per rank


def _pods(objs: list[Obj]) -> dict[str, Endpoint]:
    """One endpoint per Deployment, and a leader and a worker per LeaderWorkerSet (with LWS's labels)."""
    out: dict[str, Endpoint] = {}
    for o in objs:
        name = o["metadata"]["annotations"].get("shoal.dev/deployment", "")
        if o["kind"] == "Deployment":
            tmpl = o["spec"]["template"]
            out[name] = Endpoint(labels=tmpl["metadata"]["labels"], namespace=NS)
        elif o["kind"] == "LeaderWorkerSet":
            lwt = o["spec"]["leaderWorkerTemplate"]
            for role, key, index in (("leader", "leaderTemplate", "0"), ("worker", "workerTemplate", "1")):
                labels = {**lwt[key]["metadata"]["labels"], names.LWS_LABEL_NAME: o["metadata"]["name"],
                          names.LWS_LABEL_WORKER_INDEX: index}
                out[f"{name}/{role}"] = Endpoint(labels=labels, namespace=NS)
    return out


def test_network_policies_admit_callers_to_rank_0_and_ranks_to_each_other(pipeline: LoadedApp) -> None:
    objs = build(pipeline)
    pods = _pods(objs)
    api, leader, worker = pods["Api"], pods["TPLinear/leader"], pods["TPLinear/worker"]
    rpc, admin_port = names.RPC_PORT, names.ADMIN_PORT
    assert allowed(objs, api, leader, rpc)
    assert not allowed(objs, api, worker, rpc)  # callers reach a gang through rank 0 only
    for port in (rpc, names.RENDEZVOUS_PORT, admin_port, 43117):  # collectives use ephemeral ports
        assert allowed(objs, leader, worker, port) and allowed(objs, worker, leader, port)
    assert not allowed(objs, worker, api, rpc) and not allowed(objs, leader, api, rpc)
    assert not allowed(objs, leader, worker, 43117, "UDP")
    scraper = Endpoint(labels={"app": "prometheus"}, namespace="monitoring")
    assert allowed(objs, scraper, worker, admin_port) and allowed(objs, scraper, leader, admin_port)
    assert not allowed(objs, scraper, worker, rpc)
    outsider = Endpoint(labels={"app": "other"}, namespace=NS)
    assert not allowed(objs, outsider, worker, 43117) and not allowed(objs, outsider, leader, rpc)


@serve.deployment
class Caller:
    def __init__(self, model: Any) -> None:
        self.model = model


@serve.deployment(num_ranks=3)
class Sharded:
    def __init__(self, helper: Any = None) -> None:
        self.helper = helper


def test_every_rank_of_a_gang_may_call_its_callees() -> None:
    """Every rank runs every request, so every rank reaches the gang's callees."""
    spec = build_app_spec(Sharded.bind(Caller.options(name="Helper").bind(None)), "g", "/")
    objs = compile_app(spec, {"name": "g", "import_path": "x:y"}, OPTS).objects
    validate_objects(objs)
    assert one(objs, "LeaderWorkerSet", names.gang_name("g", "Sharded"))["spec"]["leaderWorkerTemplate"]["size"] == 3
    pods = _pods(objs)
    for rank in ("leader", "worker"):
        assert allowed(objs, pods[f"Sharded/{rank}"], pods["Helper"], names.RPC_PORT)
        assert not allowed(objs, pods["Helper"], pods[f"Sharded/{rank}"], names.RPC_PORT)


def test_workers_with_different_bundles_get_the_largest_and_a_warning() -> None:
    gang = Sharded.options(placement_group_bundles=[{"CPU": 2}, {"CPU": 1, "GPU": 1}, {"CPU": 3}],
                           num_ranks=None)
    spec = build_app_spec(gang.bind(), "b", "/")
    res = compile_app(spec, {"name": "b", "import_path": "x:y"}, OPTS)
    lwt = one(res.objects, "LeaderWorkerSet", names.gang_name("b", "Sharded"))["spec"]["leaderWorkerTemplate"]
    assert lwt["leaderTemplate"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
    assert "nvidia.com/gpu" not in lwt["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"]
    assert lwt["workerTemplate"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "3"
    assert lwt["workerTemplate"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "tolerations" in lwt["workerTemplate"]["spec"] and "tolerations" not in lwt["leaderTemplate"]["spec"]
    assert any("largest of their bundles" in w for w in res.warnings)


def test_a_gang_name_that_meets_another_service_is_refused() -> None:
    spec = build_app_spec(Caller.options(name="Sharded-gang").bind(Sharded.bind()), "c", "/")
    with pytest.raises(CompileError, match="LeaderWorkerSet of gang deployment 'Sharded'"):
        compile_app(spec, {"name": "c", "import_path": "x:y"}, OPTS)


def test_the_leader_worker_set_schema_is_strict(pipeline: LoadedApp) -> None:
    lws = one(build(pipeline), "LeaderWorkerSet", GANG)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(ObjectInvalid, match="restartPolicy"):
        validate_object(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    with pytest.raises(ObjectInvalid, match=r"spec\.leaderWorkerTemplate\.workerTemplate"):
        validate_object(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"].update(maxSurge=0, maxUnavailable=0)
    with pytest.raises(ObjectInvalid, match="rollingUpdateConfiguration"):
        validate_object(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["securityContext"][
        "privileged"] = True
    with pytest.raises(ObjectInvalid, match=r"leaderTemplate.*privileged"):
        check_restricted([bad])
