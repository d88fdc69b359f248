"""The Kubernetes compiler on a small three-deployment app: objects, pod settings, autoscaling, errors.

Every variant's objects are validated: built-in kinds against the Kubernetes 1.30 OpenAPI
schemas (kubernetes-validate, strict), KEDA / Gateway API / Prometheus Operator kinds against
the JSON schemas in shoal.kubernetes.validate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.kubernetes import names
from shoal.kubernetes.compiler import (
    HPA_EXTERNAL_METRIC,
    CompileError,
    CompileOptions,
    compile_app,
    compile_apps,
    cpu_quantity,
    keda_query,
    memory_quantity,
    to_yaml_stream,
)
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import (
    ObjectInvalid,
    check_restricted,
    restricted_violations,
    validate_object,
    validate_objects,
)

DEMO = "tests.kubernetes.k8s_demo_app:app"
BASE = CompileOptions(namespace="ml", image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/mig-1g.10gb", gateway="web")

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    apps, _ = load_apps(DEMO)
    return apps[0]


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    opts = dataclasses.replace(BASE, **changes)
    return compile_apps([(app.spec, app.entry)], opts).objects


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {[o['metadata']['name'] for o in find(objs, kind)]}"
    return found[0]


def container(dep: Obj) -> Obj:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(dep: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(dep)["env"]}


# --------------------------------------------------------------------------------------------


def test_objects_per_deployment_and_per_app(demo: LoadedApp) -> None:
    objs = build(demo)
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "NetworkPolicy", "Service", "Deployment",
                            "PodDisruptionBudget", "ScaledObject", "HTTPRoute", "TriggerAuthentication",
                            "PodMonitor", "PrometheusRule"])
    for dep in ("Api", "Tokenizer", "Model"):
        name = names.workload_name("default", dep)
        one(objs, "Deployment", name)
        svc = one(objs, "Service", name)
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is False
        assert svc["spec"]["ports"] == [{"name": "rpc", "port": names.RPC_PORT, "targetPort": "rpc",
                                         "protocol": "TCP"}]
        pdb = one(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    # Only the autoscaling deployment gets an autoscaler; never both kinds.
    assert [o["metadata"]["name"] for o in find(objs, "ScaledObject")] == ["default-model"]
    assert not find(objs, "HorizontalPodAutoscaler")
    assert one(objs, "Service", names.ingress_service_name("default"))["spec"]["type"] == "ClusterIP"
    # No Secret unless asked: the pods reference it.
    assert not find(objs, "Secret")
    validate_objects(objs)


def test_every_object_is_namespaced_and_labelled(demo: LoadedApp) -> None:
    objs = build(demo, labels={"team": "search", "cost-center": "ml-42"})
    for o in objs:
        meta = o["metadata"]
        assert meta["namespace"] == "ml"
        labels = meta["labels"]
        assert labels["app.kubernetes.io/part-of"] == "default"
        assert labels["app.kubernetes.io/managed-by"] == "shoal"
        assert labels["app.kubernetes.io/version"] == "v1"
        assert labels["team"] == "search" and labels["cost-center"] == "ml-42"
    for dep in find(objs, "Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["team"] == "search"
        # The scaler pod (autoscaling) is the app's, not a deployment's.
        assert pod_labels["app.kubernetes.io/name"] == dep["metadata"]["annotations"].get("shoal.dev/deployment",
                                                                                          "shoal-scaler")
        assert pod_labels["shoal.dev/instance"] == "default"
        # The selector is immutable on a Deployment: no version or user label in it.
        assert set(dep["spec"]["selector"]["matchLabels"]) == {
            "app.kubernetes.io/part-of", "shoal.dev/instance", "app.kubernetes.io/name"}
    validate_objects(objs)


def test_container_contract(demo: LoadedApp) -> None:
    objs = build(demo)
    for dep_name in ("Api", "Tokenizer", "Model"):
        dep = one(objs, "Deployment", names.workload_name("default", dep_name))
        c = container(dep)
        assert c["image"] == "registry.example.com/demo:1"
        assert c["command"] == ["shoal", "replica"]
        assert c["args"] == ["--deployment", dep_name]
        env = env_of(dep)
        assert env[names.ENV_DEPLOYMENT] == dep_name
        assert env[names.ENV_APP] == "default"
        assert env[names.ENV_CONFIG] == "/etc/shoal/serve.yaml"
        assert env[names.ENV_NAMESPACE] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
        assert env[names.ENV_POD_NAME] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
        assert env[names.ENV_POD_IP] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
        assert env[names.ENV_SECRET] == {"secretKeyRef": {"name": names.secret_name("default"),
                                                          "key": names.SECRET_KEY}}
        assert names.ENV_RESOLVER_FILE not in env
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        expected = {"rpc": names.RPC_PORT, "admin": names.ADMIN_PORT}
        if dep_name == "Api":
            expected["http"] = names.HTTP_PORT
        assert ports == expected
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/etc/shoal"]["readOnly"] is True
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/etc/shoal"]["name"]]["configMap"]["name"] == names.config_map_name("default")


def test_config_map_holds_the_serve_config(demo: LoadedApp) -> None:
    objs = build(demo)
    cm = one(objs, "ConfigMap", names.config_map_name("default"))
    config = yaml.safe_load(cm["data"][names.CONFIG_FILE_NAME])
    (app,) = config["applications"]
    assert app["name"] == "default"
    assert app["import_path"] == DEMO
    assert app["route_prefix"] == "/"
    assert {d["name"] for d in app["deployments"]} == {"Api", "Tokenizer", "Model"}
    assert config["http_options"]["host"] == "0.0.0.0"
    assert config["http_options"]["port"] == names.HTTP_PORT
    # The pods' shoal can read it back.
    from shoal.schema import ServeDeploySchema

    ServeDeploySchema.from_dict(config)
    # A config change rolls the pods that read it: one hash per deployment (test_k8s_workloads).
    hashes = {d["spec"]["template"]["metadata"]["annotations"]["shoal.dev/config-hash"]
              for d in find(objs, "Deployment") if "shoal.dev/deployment" in d["metadata"]["annotations"]}
    assert len(hashes) == 3


def test_probes_and_shutdown(demo: LoadedApp) -> None:
    objs = build(demo, startup_timeout_s=900, prestop_sleep_s=7)
    model = one(objs, "Deployment", "default-model")
    c = container(model)
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/-/healthz", "port": "admin"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 900
    assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    # health_check_period_s / timeout_s defaults (10 s / 30 s).
    assert c["readinessProbe"]["periodSeconds"] == 10
    assert c["readinessProbe"]["timeoutSeconds"] == 30
    assert c["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "7"]}}
    # graceful_shutdown_timeout_s=30 in the demo, plus the preStop sleep, plus a margin.
    assert model["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30 + 7 + 5
    assert model["spec"]["progressDeadlineSeconds"] >= 900
    tok = one(objs, "Deployment", "default-tokenizer")
    assert tok["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20 + 7 + 5
    validate_objects(objs)


def test_restricted_pod_security_on_every_pod_template(demo: LoadedApp) -> None:
    """Pod Security Standards "restricted", plus a read-only root with writable emptyDirs."""
    variants = (build(demo), build(demo, gateway=None, ingress_class="nginx", create_secret=True),
                build(demo, canary_of="v0", version="v2"))
    for objs in variants:
        check_restricted(objs)
        for dep in find(objs, "Deployment"):
            pod = dep["spec"]["template"]["spec"]
            assert restricted_violations(pod) == []
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for field in ("hostNetwork", "hostPID", "hostIPC"):
                assert not pod.get(field)
            for vol in pod["volumes"]:
                assert set(vol) - {"name"} <= {"configMap", "emptyDir", "secret", "projected",
                                               "downwardAPI", "persistentVolumeClaim", "ephemeral"}
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert not sc["capabilities"].get("add")
                assert sc["runAsNonRoot"] is True
                assert sc.get("privileged") is not True
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
                for p in c.get("ports", []):
                    assert "hostPort" not in p
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                replica = c["name"] == "replica"  # not the autoscaler pod's container: no /dev/shm there
                for writable in ("/tmp", "/var/cache/shoal", "/dev/shm")[:3 if replica else 2]:
                    assert "emptyDir" in volumes[mounts[writable]]
                assert not replica or volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["HOME"] == "/var/cache/shoal"


def test_restricted_checker_finds_violations(demo: LoadedApp) -> None:
    import copy

    dep = one(build(demo), "Deployment", "default-api")
    pod = dep["spec"]["template"]["spec"]
    bad = copy.deepcopy(pod)
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    c = bad["containers"][0]
    c["securityContext"]["allowPrivilegeEscalation"] = True
    c["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    c["securityContext"]["readOnlyRootFilesystem"] = False
    del c["securityContext"]["seccompProfile"]
    del bad["securityContext"]["seccompProfile"]
    c["ports"].append({"containerPort": 80, "hostPort": 80})
    problems = "\n".join(restricted_violations(bad))
    for expected in ("hostNetwork", "hostPath", "allowPrivilegeEscalation", "do not drop ALL", "SYS_ADMIN",
                     "readOnlyRootFilesystem", "seccompProfile", "hostPort 80"):
        assert expected in problems
    with pytest.raises(ObjectInvalid, match="not Pod Security restricted"):
        check_restricted([{**dep, "spec": {**dep["spec"], "template": {"spec": bad}}}])


def test_resources_from_ray_actor_options(demo: LoadedApp) -> None:
    objs = build(demo)
    tok = container(one(objs, "Deployment", "default-tokenizer"))["resources"]
    scratch = {"ephemeral-storage": "12Gi"}  # /tmp, cache and logs (test_k8s_workloads)
    assert tok == {"requests": {"cpu": "500m", "memory": "2Gi", **scratch},
                   "limits": {"cpu": "500m", "memory": "2Gi", **scratch}}
    api = container(one(objs, "Deployment", "default-api"))["resources"]
    # Ray reserves one CPU when num_cpus is unset; memory from --default-memory.
    assert api == {"requests": {"cpu": "1", "memory": "2Gi", **scratch}, "limits": {"cpu": "1", "memory": "2Gi",
                                                                                     **scratch}}
    model = one(objs, "Deployment", "default-model")
    assert container(model)["resources"]["limits"] == {"cpu": "1", "memory": "2Gi", **scratch,
                                                       "nvidia.com/mig-1g.10gb": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        model["spec"]["template"]["spec"]["tolerations"]
    unlimited = build(demo, cpu_limits=False)
    assert "cpu" not in container(one(unlimited, "Deployment", "default-tokenizer"))["resources"]["limits"]


def test_quantities() -> None:
    assert cpu_quantity(1) == "1" and cpu_quantity(0.25) == "250m" and cpu_quantity(2.5) == "2500m"
    assert memory_quantity(2 * 1024**3) == "2Gi" and memory_quantity(512 * 1024**2) == "512Mi"
    assert memory_quantity(1000) == "1000"


def _single(name: str = "Gpu", **options: Any) -> LoadedApp:
    @serve.deployment(name=name, **options)
    class D:
        pass

    spec = build_app_spec(D.bind(), name="one")
    return LoadedApp(spec=spec, entry={"name": "one", "route_prefix": "/", "import_path": "x:app"})


def test_whole_gpus_and_fraction_errors() -> None:
    whole = _single(ray_actor_options={"num_gpus": 2}, num_replicas=3)
    objs = build(whole, gpu_resource=None)
    dep = one(objs, "Deployment", "one-gpu")
    assert container(dep)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert dep["spec"]["replicas"] == 3
    frac = _single(ray_actor_options={"num_gpus": 0.25})
    with pytest.raises(CompileError, match=r"deployment 'Gpu'.*num_gpus=0.25.*--gpu-resource"):
        build(frac, gpu_resource=None)
    shared = build(frac, gpu_resource="nvidia.com/gpu.shared")
    assert container(one(shared, "Deployment", "one-gpu"))["resources"]["limits"]["nvidia.com/gpu.shared"] == "1"
    validate_objects(shared)


def test_keda_scaled_object(demo: LoadedApp) -> None:
    objs = build(demo)
    so = one(objs, "ScaledObject", "default-model")
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "default-model"}
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == 4
    # The app's scaler applies the delays (5 s up, 60 s down): the HPA adds none.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    md = trigger["metadata"]
    assert md["url"] == f"http://default-shoal-scaler.ml.svc.cluster.local:{names.SCALER_PORT}/scale/Model"
    assert md["valueLocation"] == "desired" and md["targetValue"] == "1" and md["activationTargetValue"] == "0"
    # The autoscaled Deployment leaves replicas to the autoscaler.
    assert "replicas" not in one(objs, "Deployment", "default-model")["spec"]
    assert one(objs, "Deployment", "default-api")["spec"]["replicas"] == 2
    assert validate_object(so) == "crd"


def test_keda_query_shape() -> None:
    q = keda_query("ns", 'we"ird', "D", namespace_label="")
    assert q == ('(sum(shoal_replica_ongoing_requests{app="we\\"ird",deployment="D"}) or vector(0)) + '
                 '(sum(shoal_handle_queued_requests{app="we\\"ird",deployment="D"}) or vector(0))')


def test_hpa_instead_of_keda() -> None:
    app = _single(name="Model", autoscaling_config={"min_replicas": 1, "max_replicas": 5,
                                                    "target_ongoing_requests": 3, "downscale_delay_s": 7200})
    objs = build(app, autoscaler="hpa")
    assert not find(objs, "ScaledObject")
    hpa = one(objs, "HorizontalPodAutoscaler", "one-model")
    spec = hpa["spec"]
    assert spec["minReplicas"] == 1 and spec["maxReplicas"] == 5
    metric = spec["metrics"][0]["external"]
    assert metric["metric"]["name"] == HPA_EXTERNAL_METRIC
    assert metric["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600  # the API's maximum
    validate_objects(objs)


def test_hpa_cannot_scale_to_zero(demo: LoadedApp) -> None:
    with pytest.raises(CompileError, match=r"'Model'.*min_replicas 0.*cannot scale to zero.*--autoscaler keda"):
        build(demo, autoscaler="hpa")


def test_ingress_min_replicas_zero_is_raised_to_one_with_keep_one() -> None:
    app = _single(name="Front", autoscaling_config={"min_replicas": 0, "max_replicas": 2})
    res = compile_app(app.spec, app.entry, dataclasses.replace(BASE, ingress_at_zero="keep-one"))
    assert one(res.objects, "ScaledObject", "one-front")["spec"]["minReplicaCount"] == 1
    assert any("min_replicas 0 raised to 1" in w for w in res.warnings)
    assert not find(res.objects, "Deployment", names.front_name("one"))
    # By default (--ingress-at-zero front) it stays at zero behind the holding front (test_k8s_front.py).
    res = compile_app(app.spec, app.entry, BASE)
    assert one(res.objects, "ScaledObject", "one-front")["spec"]["minReplicaCount"] == 0
    assert not any("raised to 1" in w for w in res.warnings)
    one(res.objects, "Deployment", names.front_name("one"))


def test_num_replicas_auto_uses_ray_defaults() -> None:
    app = _single(name="Auto", num_replicas="auto")
    so = one(build(app), "ScaledObject", "one-auto")
    assert so["spec"]["minReplicaCount"] == 1 and so["spec"]["maxReplicaCount"] == 100


def test_http_route(demo: LoadedApp) -> None:
    objs = build(demo, gateway_namespace="infra", hostnames=("demo.example.com",), route_timeout="2h")
    route = one(objs, "HTTPRoute", "default")
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "web", "namespace": "infra"}]
    assert route["spec"]["hostnames"] == ["demo.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "default-http", "port": 8000}]
    assert rule["timeouts"] == {"request": "2h"}
    validate_objects(objs)


def test_classic_ingress(demo: LoadedApp) -> None:
    objs = build(demo, gateway=None, ingress_class="nginx", hostnames=("demo.example.com",))
    assert not find(objs, "HTTPRoute")
    ing = one(objs, "Ingress", "default")
    assert ing["spec"]["ingressClassName"] == "nginx"
    path = ing["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": "default-http", "port": {"number": 8000}}
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    validate_objects(objs)


def test_no_route_without_gateway_or_ingress_class(demo: LoadedApp) -> None:
    res = compile_app(demo.spec, demo.entry, dataclasses.replace(BASE, gateway=None))
    assert not find(res.objects, "HTTPRoute") and not find(res.objects, "Ingress")
    one(res.objects, "Service", "default-http")
    assert any("port-forward" in w for w in res.warnings)


def test_app_without_http_has_no_http_objects() -> None:
    @serve.deployment
    class Worker:
        pass

    spec = build_app_spec(Worker.bind(), name="batch", route_prefix=None)
    objs = compile_app(spec, {"name": "batch", "route_prefix": None, "import_path": "x:app"}, BASE).objects
    assert not find(objs, "HTTPRoute")
    assert [s["metadata"]["name"] for s in find(objs, "Service")] == ["batch-worker"]
    ports = [p["name"] for p in container(one(objs, "Deployment", "batch-worker"))["ports"]]
    assert "http" not in ports


def test_create_secret(demo: LoadedApp) -> None:
    objs = build(demo, create_secret=True)
    secret = one(objs, "Secret", names.secret_name("default"))
    assert set(secret["data"]) == {names.SECRET_KEY}
    other = one(build(demo, create_secret=True), "Secret", names.secret_name("default"))
    assert other["data"] != secret["data"]  # random each build
    validate_objects(objs)


def test_runtime_env_vars_and_env_option() -> None:
    app = _single(name="E", ray_actor_options={"runtime_env": {"env_vars": {"MODEL": "small", "A": "dep"}}})
    app.entry["runtime_env"] = {"env_vars": {"A": "app", "B": "app"}}
    objs = build(app, env={"B": "cli", "HF_HUB_OFFLINE": "1"})
    env = env_of(one(objs, "Deployment", "one-e"))
    assert env["MODEL"] == "small" and env["A"] == "dep" and env["B"] == "cli" and env["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(CompileError, match=r"SHOAL_APP"):
        build(app, env={"SHOAL_APP": "x"})


def test_canary_objects(demo: LoadedApp) -> None:
    objs = build(demo, version="v2", canary_of="v1", canary_weight=10)
    inst = "default-v2"
    # Workloads beside the old ones, under version-suffixed names; the pods run as app "default-v2".
    for dep in ("Api", "Tokenizer", "Model"):
        d = one(objs, "Deployment", names.workload_name(inst, dep))
        assert env_of(d)[names.ENV_APP] == inst
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "default"
        assert d["metadata"]["labels"]["shoal.dev/instance"] == inst
    assert not find(objs, "Deployment", "default-api")
    cm = one(objs, "ConfigMap", names.config_map_name(inst))
    assert yaml.safe_load(cm["data"]["serve.yaml"])["applications"][0]["name"] == inst
    # The same secret as the stable version.
    assert env_of(one(objs, "Deployment", "default-v2-api"))[names.ENV_SECRET]["secretKeyRef"]["name"] == \
        names.secret_name("default")
    new_svc = one(objs, "Service", names.ingress_service_name(inst))
    old_svc = one(objs, "Service", names.ingress_service_name("default-v1"))
    assert old_svc["spec"]["selector"]["app.kubernetes.io/version"] == "v1"
    assert old_svc["spec"]["selector"]["shoal.dev/instance"] == "default"
    assert new_svc["spec"]["selector"]["shoal.dev/instance"] == inst
    route = one(objs, "HTTPRoute", "default")
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [("default-v1-http", 90), ("default-v2-http", 10)]
    assert route["metadata"]["labels"]["shoal.dev/instance"] == "default"
    assert one(objs, "ScaledObject", "default-v2-model")["spec"]["triggers"][0]["metadata"]["url"].startswith(
        "http://default-v2-shoal-scaler.")
    validate_objects(objs)


@pytest.mark.parametrize(("changes", "match"), [
    ({"image": ""}, "--image"),
    ({"namespace": "Bad_NS"}, "--namespace"),
    ({"ingress_class": "nginx"}, "--gateway and --ingress-class"),
    ({"canary_of": "v1"}, "--canary-of 'v1' is the same as --version"),
    ({"canary_of": "v0", "version": None}, "--canary-of needs --version"),
    ({"canary_of": "v0", "version": "v2", "gateway": None}, "--canary-of needs --gateway"),
    ({"canary_weight": 101}, "--weight"),
    ({"labels": {"app.kubernetes.io/name": "x"}}, "--label app.kubernetes.io/name"),
    ({"labels": {"team": "has space"}}, "--label team"),
    ({"version": "not valid!"}, "--version"),
    ({"route_timeout": "forever"}, "--route-timeout"),
    ({"gpu_resource": "not a name"}, "--gpu-resource"),
    ({"http_from_namespaces": ("UPPER",)}, "--http-from-namespace"),
])
def test_option_errors_name_the_option(demo: LoadedApp, changes: dict[str, Any], match: str) -> None:
    with pytest.raises(CompileError, match=match):
        build(demo, **changes)


def test_name_collisions_are_refused() -> None:
    @serve.deployment(name="Model")
    class A:
        def __init__(self, b: Any) -> None:
            pass

    @serve.deployment(name="model")
    class B:
        pass

    spec = build_app_spec(A.bind(B.bind()), name="app")
    with pytest.raises(CompileError, match=r"'Model' and 'model'.*'app-model'"):
        compile_app(spec, {"name": "app"}, BASE)

    @serve.deployment(name="http")
    class H:
        pass

    spec = build_app_spec(H.bind(), name="app")
    with pytest.raises(CompileError, match=r"'http'.*HTTP Service"):
        compile_app(spec, {"name": "app"}, BASE)


def test_collisions_across_apps() -> None:
    @serve.deployment(name="x")
    class X:
        pass

    @serve.deployment(name="http-x")
    class Y:
        pass

    a = build_app_spec(X.bind(), name="rag-http", route_prefix="/a")
    b = build_app_spec(Y.bind(), name="rag", route_prefix="/b")
    with pytest.raises(CompileError, match=r"name collision: two .* named 'rag-http-x'"):
        compile_apps([(a, {"name": "rag-http"}), (b, {"name": "rag"})], BASE)


def test_default_version_is_stable_and_tracks_the_image(demo: LoadedApp) -> None:
    a = build(demo, version=None)
    b = build(demo, version=None)
    c = build(demo, version=None, image="registry.example.com/demo:2")
    va = a[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    assert va == b[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    assert va != c[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    assert to_yaml_stream(a) == to_yaml_stream(b)


def test_validator_catches_mistakes(demo: LoadedApp) -> None:
    objs = build(demo)
    dep = dict(one(objs, "Deployment", "default-api"))
    dep["spec"] = dict(dep["spec"], replicass=2)
    with pytest.raises(ObjectInvalid, match=r"Deployment/default-api"):
        validate_object(dep)
    so = one(objs, "ScaledObject", "default-model")
    bad = {**so, "spec": {**so["spec"], "minReplicas": 1}}
    with pytest.raises(ObjectInvalid, match=r"ScaledObject/default-model"):
        validate_object(bad)
    route = one(objs, "HTTPRoute", "default")
    rule = dict(route["spec"]["rules"][0], timeouts={"request": "one hour"})
    with pytest.raises(ObjectInvalid, match=r"HTTPRoute/default"):
        validate_object({**route, "spec": {**route["spec"], "rules": [rule]}})


def test_pod_monitor_and_dns_any(demo: LoadedApp) -> None:
    objs = build(demo, pod_monitor=True, dns_egress="any", metrics_from_namespaces=("monitoring",))
    pm = one(objs, "PodMonitor", "default")
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s"}]
    dns = one(objs, "NetworkPolicy", "default-allow-dns")
    assert dns["spec"]["egress"] == [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    validate_objects(objs)
