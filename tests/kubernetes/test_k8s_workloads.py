"""Workloads on a real cluster (issue 18): per-deployment config hashes and rollout strategy,
memory and ephemeral storage that quota'd namespaces admit, liveness after repeated check_health
failures, LeaderWorkerSet placement that every Kubernetes version honours, labels that do not
clash with Argo CD, and the per-pod scheduling options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.kubernetes import lws, names
from shoal.kubernetes.cli import k8s
from shoal.kubernetes.compiler import CompileError, CompileOptions, compile_app, compile_apps, to_yaml
from shoal.kubernetes.compiler.scheduling import parse_quantity
from shoal.kubernetes.pod.config import PodSettings, load_deployment
from shoal.kubernetes.pod.replica import HEALTH_FAILURE_THRESHOLD, HealthTracker
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import validate_objects

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
DEMO = "tests.kubernetes.k8s_demo_app:app"
OPTS = CompileOptions(namespace="ml", image="registry.example.com/demo:1", gpu_resource="nvidia.com/mig-1g.10gb")
K8S_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).objects


def workloads(objs: list[Obj]) -> dict[str, Obj]:
    """Each shoal deployment's Deployment or LeaderWorkerSet (not the shoal scaler's Deployment)."""
    return {o["metadata"]["annotations"]["shoal.dev/deployment"]: o for o in objs
            if o["kind"] in ("Deployment", "LeaderWorkerSet")
            and "shoal.dev/deployment" in o["metadata"]["annotations"]}


def templates(objs: list[Obj]) -> dict[str, str]:
    """Each deployment's pod template(s), as the bytes a server would compare."""
    out = {}
    for dep, wl in workloads(objs).items():
        if wl["kind"] == "Deployment":
            out[dep] = to_yaml(wl["spec"]["template"])
        else:
            lwt = wl["spec"]["leaderWorkerTemplate"]
            out[dep] = to_yaml(lwt["leaderTemplate"]) + to_yaml(lwt["workerTemplate"])
    return out


def pod_specs(objs: list[Obj]) -> list[tuple[str, Obj]]:
    out = []
    for dep, wl in workloads(objs).items():
        if wl["kind"] == "Deployment":
            out.append((dep, wl["spec"]["template"]["spec"]))
        else:
            lwt = wl["spec"]["leaderWorkerTemplate"]
            out += [(dep, lwt["leaderTemplate"]["spec"]), (dep, lwt["workerTemplate"]["spec"])]
    return out


def demo_config(tmp_path: Path, name: str, deployments: list[Obj]) -> LoadedApp:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": "demo", "route_prefix": "/", "import_path": DEMO, "deployments": deployments}]}))
    apps, _ = load_apps(str(path))
    return apps[0]


BASE_DEPS: list[Obj] = [{"name": "Api", "num_replicas": 2}, {"name": "Model", "user_config": {"v": 1}},
                        {"name": "Tokenizer", "max_ongoing_requests": 8}]


def changed(deployments: list[Obj], name: str, **options: Any) -> list[Obj]:
    return [{**d, **options} if d["name"] == name else dict(d) for d in deployments]


# --- 1. per-deployment config hashes, rollout strategy -----------------------------------------


def test_a_change_to_one_deployment_rolls_only_that_deployment(tmp_path: Path) -> None:
    before = build(demo_config(tmp_path, "a", BASE_DEPS))
    after = build(demo_config(tmp_path, "b", changed(BASE_DEPS, "Model", user_config={"v": 2})))
    t0, t1 = templates(before), templates(after)
    assert t0["Model"] != t1["Model"]
    assert t0["Api"] == t1["Api"] and t0["Tokenizer"] == t1["Tokenizer"]  # byte for byte
    # The version label follows the deployment too (it is in the pod template's labels).
    v0, v1 = (workloads(x)["Model"]["metadata"]["labels"]["app.kubernetes.io/version"] for x in (before, after))
    assert v0 != v1
    assert (workloads(before)["Api"]["metadata"]["labels"] == workloads(after)["Api"]["metadata"]["labels"])


def test_a_replica_count_change_changes_no_pod_template(tmp_path: Path) -> None:
    before = build(demo_config(tmp_path, "a", BASE_DEPS))
    after = build(demo_config(tmp_path, "b", changed(BASE_DEPS, "Api", num_replicas=5)))
    assert templates(before) == templates(after)
    assert workloads(before)["Api"]["spec"]["replicas"] == 2 and workloads(after)["Api"]["spec"]["replicas"] == 5
    # Autoscaling bounds are the autoscaler's business: no pod rolls for them either.
    after = build(demo_config(tmp_path, "c", changed(BASE_DEPS, "Model", autoscaling_config={
        "min_replicas": 1, "max_replicas": 9, "target_ongoing_requests": 3})))
    assert templates(before) == templates(after)


def test_a_callee_limit_rolls_its_callers_whose_routers_enforce_it(tmp_path: Path) -> None:
    before = templates(build(demo_config(tmp_path, "a", BASE_DEPS)))
    after = templates(build(demo_config(tmp_path, "b", changed(BASE_DEPS, "Tokenizer", max_ongoing_requests=3))))
    # Api and Model both call Tokenizer, and their routers read its max_ongoing_requests.
    assert all(before[d] != after[d] for d in ("Tokenizer", "Api", "Model"))
    # The image is in every hash.
    app = demo_config(tmp_path, "c", BASE_DEPS)
    a, b = build(app), build(app, image="registry.example.com/demo:2")
    assert all(x["metadata"]["annotations"]["shoal.dev/config-hash"] != y["metadata"]["annotations"][
        "shoal.dev/config-hash"] for x, y in zip([w["spec"]["template"] for w in workloads(a).values()],
                                                [w["spec"]["template"] for w in workloads(b).values()], strict=True))


def test_every_pod_still_reads_its_deployment_from_the_one_config_map(tmp_path: Path) -> None:
    objs = build(demo_config(tmp_path, "a", BASE_DEPS))
    config = [o for o in objs if o["kind"] == "ConfigMap"]
    assert len(config) == 1  # one file per app; each deployment's slice is hashed, not split out
    path = tmp_path / "serve.yaml"
    path.write_text(config[0]["data"][names.CONFIG_FILE_NAME])
    for dep in ("Api", "Model", "Tokenizer"):
        spec, dspec, _, callees = load_deployment(PodSettings(deployment=dep, app=None, config_path=str(path),
                                                              secret=b"s"))
        assert dspec.name == dep
    assert spec.deployments["Tokenizer"].config.max_ongoing_requests == 8
    assert callees[("demo", "Tokenizer")].max_ongoing == 8


def test_gpu_deployments_roll_without_a_surge_pod(tmp_path: Path) -> None:
    objs = build(demo_config(tmp_path, "a", BASE_DEPS))
    strategy = {d: w["spec"]["strategy"]["rollingUpdate"] for d, w in workloads(objs).items()}
    assert strategy["Model"] == {"maxSurge": 0, "maxUnavailable": 1}  # num_gpus: 0.5
    assert strategy["Api"] == strategy["Tokenizer"] == {"maxSurge": "25%", "maxUnavailable": 0}
    objs = build(demo_config(tmp_path, "a", BASE_DEPS), rollout=("1/0", "Api:0/25%"))
    strategy = {d: w["spec"]["strategy"]["rollingUpdate"] for d, w in workloads(objs).items()}
    assert strategy == {"Api": {"maxSurge": 0, "maxUnavailable": "25%"},
                        "Model": {"maxSurge": 1, "maxUnavailable": 0},
                        "Tokenizer": {"maxSurge": 1, "maxUnavailable": 0}}
    for bad in ("0/0", "1", "x/1", "Api:1/0%x"):
        with pytest.raises(CompileError, match="--rollout"):
            build(demo_config(tmp_path, "a", BASE_DEPS), rollout=(bad,))


# --- 2. memory and storage -----------------------------------------------------------------


LIMIT_RANGE = {"min": {"cpu": "50m", "memory": "64Mi"}, "max": {"cpu": "64", "memory": "512Gi",
                                                               "ephemeral-storage": "200Gi"}}
QUOTA = ("requests.cpu", "limits.cpu", "requests.memory", "limits.memory",
         "requests.ephemeral-storage", "limits.ephemeral-storage")


def _cpu(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _amount(resource: str, text: str) -> float:
    return _cpu(text) if resource == "cpu" else parse_quantity(text, resource)


def admitted(pod: Obj) -> list[str]:
    """What a namespace with LIMIT_RANGE (no defaults) and a ResourceQuota on QUOTA refuses."""
    problems = []
    for c in pod["containers"]:
        res = c.get("resources", {})
        for item in QUOTA:
            kind, resource = item.split(".", 1)
            if resource not in res.get(kind, {}):
                problems.append(f"{c['name']}: no {item} (the quota requires it)")
        for resource, amount in res.get("requests", {}).items():
            limit = res.get("limits", {}).get(resource)
            if limit is not None and _amount(resource, amount) > _amount(resource, limit):
                problems.append(f"{c['name']}: {resource} request above its limit")
        for resource, low in LIMIT_RANGE["min"].items():
            for kind in ("requests", "limits"):
                if resource in res.get(kind, {}) and _amount(resource, res[kind][resource]) < _amount(resource, low):
                    problems.append(f"{c['name']}: {kind}.{resource} below the LimitRange's min")
        for resource, high in LIMIT_RANGE["max"].items():
            if resource in res.get("limits", {}) and _amount(resource, res["limits"][resource]) > _amount(
                    resource, high):
                problems.append(f"{c['name']}: limits.{resource} above the LimitRange's max")
    for vol in pod.get("volumes", []):
        if "emptyDir" in vol and "sizeLimit" not in vol["emptyDir"]:
            problems.append(f"volume {vol['name']}: unbounded emptyDir")
    return problems


def test_every_pod_is_admitted_by_a_quota_and_limit_range_requiring_requests_and_limits(tmp_path: Path) -> None:
    demo = demo_config(tmp_path, "a", BASE_DEPS)
    gang, _ = load_apps("tests.kubernetes.k8s_gang_app:pipeline")
    for objs in (build(demo), build(gang[0])):
        for dep, pod in pod_specs(objs):
            assert admitted(pod) == [], dep
        # shoal's own pods too (the application's scaler).
        for o in objs:
            if o["kind"] == "Deployment":
                assert admitted(o["spec"]["template"]["spec"]) == [], o["metadata"]["name"]
    assert any("scaler" in o["metadata"]["name"] for o in build(demo) if o["kind"] == "Deployment")
    objs = build(demo)
    res = {d: pod["containers"][0]["resources"] for d, pod in pod_specs(objs)}
    # Tokenizer says memory: 2 GiB; Model and Api say nothing and get the default.
    assert res["Tokenizer"]["requests"]["memory"] == res["Tokenizer"]["limits"]["memory"] == "2Gi"
    assert res["Api"]["limits"]["memory"] == "2Gi" and res["Api"]["limits"]["cpu"] == "1"
    # Scratch space: /tmp 1Gi + cache 10Gi + 1Gi for logs, requested in full.
    assert res["Api"]["requests"]["ephemeral-storage"] == res["Api"]["limits"]["ephemeral-storage"] == "12Gi"
    vols = {v["name"]: v["emptyDir"] for v in pod_specs(objs)[0][1]["volumes"] if "emptyDir" in v}
    assert vols["tmp"]["sizeLimit"] == "1Gi" and vols["cache"]["sizeLimit"] == "10Gi"
    # The flags.
    objs = build(demo, default_memory="3Gi", cache_size=("40Gi", "Tokenizer:1Gi"), tmp_size="512Mi",
                 cpu_limits=False)
    specs = dict(pod_specs(objs))
    assert specs["Api"]["containers"][0]["resources"]["limits"]["memory"] == "3Gi"
    assert "cpu" not in specs["Api"]["containers"][0]["resources"]["limits"]
    assert {v["name"]: v["emptyDir"].get("sizeLimit") for v in specs["Tokenizer"]["volumes"] if "emptyDir" in v} == {
        "tmp": "512Mi", "cache": "1Gi", "dshm": "1Gi"}
    # 40Gi + 512Mi + 1Gi
    assert specs["Model"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "42496Mi"
    with pytest.raises(CompileError, match="--default-memory"):
        build(demo, default_memory="lots")


def test_a_gpu_deployment_without_memory_is_warned(tmp_path: Path) -> None:
    demo = demo_config(tmp_path, "a", BASE_DEPS)
    warnings = compile_apps([(demo.spec, demo.entry)], OPTS).warnings
    assert any("'Model' asks for GPUs but sets no memory" in w for w in warnings)
    assert not any("'Tokenizer'" in w and "memory" in w for w in warnings)


# --- 3. liveness after check_health failures ---------------------------------------------------


def test_liveness_fails_after_rays_number_of_failed_health_checks_in_a_row() -> None:
    assert HEALTH_FAILURE_THRESHOLD == 3  # Ray Serve's REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD
    h = HealthTracker()
    h.failed("RuntimeError: one")
    h.failed("RuntimeError: two")
    assert not h.healthy and h.dead is None  # unready, not dead
    h.passed()
    assert h.healthy and h.consecutive_failures == 0
    for i in range(3):
        h.failed(f"RuntimeError: {i}")
    assert h.dead is not None and "3 times in a row" in h.dead and "RuntimeError: 2" in h.dead
    h.passed()  # Ray replaces such a replica: a later pass does not bring it back
    assert h.dead is not None
    with pytest.raises(ValueError):
        HealthTracker(0)


def test_the_liveness_probe_follows_health_check_period_and_timeout(tmp_path: Path) -> None:
    objs = build(demo_config(tmp_path, "a", changed(BASE_DEPS, "Api", health_check_period_s=4,
                                                    health_check_timeout_s=12.5)))
    for dep, pod in pod_specs(objs):
        live = pod["containers"][0]["livenessProbe"]
        assert live["httpGet"]["path"] == "/-/healthz"
        if dep == "Api":
            assert (live["periodSeconds"], live["timeoutSeconds"]) == (4, 13)
        else:  # Ray's defaults: every 10 s, 30 s each
            assert (live["periodSeconds"], live["timeoutSeconds"]) == (10, 30)


# --- 4. LeaderWorkerSet placement --------------------------------------------------------------


@serve.deployment(num_ranks=2, ray_actor_options={"num_cpus": 1})
class Gang:
    def __call__(self, x: int) -> int:
        return x


def _gang(strategy: str | None) -> Obj:
    dep = Gang.options(placement_group_strategy=strategy) if strategy else Gang
    spec = build_app_spec(dep.bind(), "g", "/")
    objs = compile_app(spec, {"name": "g", "import_path": "x:y"}, OPTS).objects
    validate_objects(objs)
    return next(o for o in objs if o["kind"] == "LeaderWorkerSet")


def _affinity_terms(pod: Obj) -> list[Obj]:
    terms = []
    for kind in ("podAffinity", "podAntiAffinity"):
        a = pod.get("affinity", {}).get(kind, {})
        terms += a.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        terms += [t["podAffinityTerm"] for t in a.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    return terms


@pytest.mark.parametrize("strategy", ["STRICT_PACK", "PACK", "STRICT_SPREAD", "SPREAD", None])
def test_gang_placement_never_reaches_other_gangs_where_match_label_keys_is_dropped(strategy: str | None) -> None:
    gang_lws = _gang(strategy)
    deployment_pods = {"app.kubernetes.io/part-of": "g", "shoal.dev/instance": "g", "app.kubernetes.io/name": "Gang"}
    lwt = gang_lws["spec"]["leaderWorkerTemplate"]
    for tmpl in (lwt["leaderTemplate"], lwt["workerTemplate"]):
        pod = tmpl["spec"]
        # On 1.29/1.30 the API server drops matchLabelKeys from pod (anti-)affinity; what is left
        # must select this deployment's pods only, never every gang in the namespace.
        for term in _affinity_terms(pod):
            assert term["labelSelector"] == {"matchLabels": deployment_pods}
        within = [c for c in pod["topologySpreadConstraints"] if names.LWS_LABEL_GROUP_KEY in c.get(
            "matchLabelKeys", [])]
        if strategy in ("SPREAD", "STRICT_SPREAD"):
            (c,) = within  # matchLabelKeys in topology spread: beta, on by default since 1.27
            assert c["whenUnsatisfiable"] == ("DoNotSchedule" if strategy == "STRICT_SPREAD" else "ScheduleAnyway")
            assert c["labelSelector"] == {"matchLabels": deployment_pods}
        else:
            assert within == []
        if strategy == "STRICT_PACK":
            assert "affinity" not in pod
    annotations = gang_lws["metadata"]["annotations"]
    if strategy == "STRICT_PACK":  # LWS's webhook writes the group's own key value into the affinity
        assert annotations[lws.ANNOTATION_EXCLUSIVE_TOPOLOGY] == "kubernetes.io/hostname"
    else:
        assert lws.ANNOTATION_EXCLUSIVE_TOPOLOGY not in annotations


def test_a_gpu_gang_rolls_a_group_down_at_a_time() -> None:
    apps, _ = load_apps("tests.kubernetes.k8s_gang_app:pipeline")
    objs = build(apps[0])
    gang = next(o for o in objs if o["kind"] == "LeaderWorkerSet")
    assert gang["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert _gang(None)["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 0,
                                                                                   "maxSurge": 1}


# --- 5. Argo CD ----------------------------------------------------------------------------------


def test_no_object_or_selector_uses_argo_cds_tracking_label(tmp_path: Path) -> None:
    objs = build(demo_config(tmp_path, "a", BASE_DEPS), gateway="web")
    text = json.dumps(objs)
    assert "app.kubernetes.io/instance" not in text
    dep = workloads(objs)["Api"]
    assert dep["spec"]["selector"]["matchLabels"]["shoal.dev/instance"] == "demo"
    # Argo CD (before 3.0) may set its own instance label on what it syncs: it is the user's now.
    labelled = build(demo_config(tmp_path, "a", BASE_DEPS), labels={"app.kubernetes.io/instance": "argo-app"})
    assert workloads(labelled)["Api"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "argo-app"
    assert "app.kubernetes.io/instance" not in workloads(labelled)["Api"]["spec"]["selector"]["matchLabels"]


# --- 6. per-pod scheduling options -------------------------------------------------------------


def test_scheduling_options_for_all_or_one_deployment(tmp_path: Path) -> None:
    demo = demo_config(tmp_path, "a", BASE_DEPS)
    objs = build(demo, node_selectors=("pool=serving", "Model:nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB"),
                 tolerations=("dedicated=ml:NoSchedule", "Model:spot", "Api:zone-b:NoExecute"),
                 runtime_class=("Model:nvidia",), priority_class=("batch-low", "Api:online-high"),
                 zone_spread=("ScheduleAnyway", "Model:DoNotSchedule"))
    for version in K8S_VERSIONS:
        validate_objects(objs, version)
    pods = dict(pod_specs(objs))
    assert pods["Api"]["nodeSelector"] == {"pool": "serving"}
    assert pods["Model"]["nodeSelector"] == {"pool": "serving", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pods["Api"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "zone-b", "operator": "Exists", "effect": "NoExecute"}]
    assert pods["Model"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"}]
    assert pods["Model"]["runtimeClassName"] == "nvidia" and "runtimeClassName" not in pods["Api"]
    assert pods["Api"]["priorityClassName"] == "online-high" and pods["Tokenizer"]["priorityClassName"] == "batch-low"
    zones = {d: [c for c in p["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
             for d, p in pods.items()}
    assert zones["Api"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert zones["Model"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert zones["Model"][0]["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == "Model"
    assert "nodeSelector" not in dict(pod_specs(build(demo)))["Api"]


def test_the_cli_flags_and_a_prefix_naming_no_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    common = ["build", DEMO, "--image", "r/x:1", "--gpu-resource", "nvidia.com/mig-1g.10gb"]
    ok = CliRunner().invoke(k8s, [*common, "--zone-spread", "--node-selector", "Model:gpu=a100",
                                  "--toleration", "Model:nvidia.com/gpu", "--rollout", "Api:0/1"])
    assert ok.exit_code == 0, ok.output
    objs = [d for d in yaml.safe_load_all(ok.stdout) if d]
    pods = dict(pod_specs(objs))
    assert pods["Model"]["nodeSelector"] == {"gpu": "a100"}
    assert all(any(c["topologyKey"] == "topology.kubernetes.io/zone" for c in p["topologySpreadConstraints"])
               for p in pods.values())
    for flag, value in (("--node-selector", "Modle:gpu=a100"), ("--toleration", "Modle:x:NoSchedule"),
                        ("--runtime-class", "Modle:nvidia"), ("--priority-class", "Modle:high"),
                        ("--zone-spread", "Modle"), ("--cache-size", "Modle:1Gi"), ("--rollout", "Modle:0/1")):
        bad = CliRunner().invoke(k8s, [*common, flag, value])
        assert bad.exit_code == 2, (flag, bad.output)
        assert flag in bad.output and "no deployment named 'Modle'" in bad.output and "Tokenizer" in bad.output
    bad = CliRunner().invoke(k8s, [*common, "--node-selector", "no-equals-sign"])
    assert bad.exit_code == 2 and "--node-selector" in bad.output


@serve.deployment(ray_actor_options={"accelerator_type": "A100", "num_gpus": 1})
class OnA100:
    def __call__(self) -> str:
        return "ok"


def test_accelerator_type_maps_to_a_node_selector_through_the_label_given() -> None:
    spec = build_app_spec(OnA100.bind(), "acc", "/")
    entry = {"name": "acc", "import_path": "x:y"}
    ignored = compile_app(spec, entry, OPTS)
    assert any("accelerator_type 'A100' is ignored" in w and "--accelerator-label" in w for w in ignored.warnings)
    assert "nodeSelector" not in dict(pod_specs(ignored.objects))["OnA100"]
    mapped = compile_app(spec, entry, dataclasses.replace(OPTS, accelerator_label="example.com/accelerator"))
    assert dict(pod_specs(mapped.objects))["OnA100"]["nodeSelector"] == {"example.com/accelerator": "A100"}
    assert not any("accelerator_type" in w for w in mapped.warnings)
    with pytest.raises(CompileError, match="--accelerator-label"):
        compile_app(spec, entry, dataclasses.replace(OPTS, accelerator_label="not a key"))


def test_everything_validates_on_every_kubernetes_version(tmp_path: Path) -> None:
    demo = demo_config(tmp_path, "a", BASE_DEPS)
    gang, _ = load_apps("tests.kubernetes.k8s_gang_app:pipeline")
    for objs in (build(demo, gateway="web", zone_spread=("DoNotSchedule",), priority_class=("high",)),
                 build(gang[0], gateway="web"), [_gang("STRICT_PACK"), _gang("PACK")]):
        for version in K8S_VERSIONS:
            validate_objects(objs, version)
