"""Autoscaling on Kubernetes: the scaler's objects (compiled and validated), and one pod
simulation that scales a ``min_replicas: 0`` deployment 0 -> N -> 0 through the real path (pods'
/metrics -> the scaler pod -> the ScaledObject's metrics-api URL -> the KEDA stand-in -> the
Deployment), with no request lost, while a caller of a deployment nothing scales gets its 503.

Counts, not latencies, are asserted (these machines are noisy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_sim_support import Traffic, get, metric, running, wait_for

from shoal.config import AutoscalingPolicy
from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.compiler.autoscaling import SCALER_LABEL
from shoal.kubernetes.targets import load_apps
from shoal.kubernetes.validate import restricted_violations, validate_objects

APP = "scale"
WAKE_S = 15.0  # the callers' wake deadline in the simulation (waking Worker takes ~2 s here)


def compile_scale_app(tmp: Path, **opts: Any) -> list[dict[str, Any]]:
    config = {"applications": [{"name": APP, "route_prefix": "/", "import_path": "k8s_scale_app:app"}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    apps, http = load_apps(str(path))
    options = CompileOptions(image="shoal:test", **opts)
    return compile_apps([(a.spec, a.entry) for a in apps], options, http_options=http).objects


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def env_of(obj: dict[str, Any]) -> dict[str, Any]:
    container = obj["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).parent))
    return compile_scale_app(tmp_path_factory.mktemp("scale"), keda_namespace="autoscaling", wake_timeout_s=45)


def test_scaler_objects_validate_and_point_at_each_other(objs: list[dict[str, Any]]) -> None:
    validate_objects(objs)
    name = names.scaler_name(APP)
    dep = one(objs, "Deployment", name)
    svc = one(objs, "Service", name)
    pod = dep["spec"]["template"]
    assert dep["spec"]["replicas"] == 1
    assert pod["spec"]["containers"][0]["command"] == ["shoal", "k8s", "scaler"]
    assert restricted_violations(pod["spec"]) == []
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == SCALER_LABEL
    assert svc["spec"]["ports"][0]["port"] == names.SCALER_PORT
    url = f"http://{name}.default.svc.cluster.local:{names.SCALER_PORT}"
    for wl in ("scale-worker", "scale-front", "scale-idle"):
        env = env_of(one(objs, "Deployment", wl))
        assert env[names.ENV_SCALER_URL] == url and env[names.ENV_WAKE_TIMEOUT] == "45"
    so = one(objs, "ScaledObject", "scale-worker")["spec"]
    (trigger,) = so["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {"url": f"{url}/scale/Worker", "valueLocation": "desired", "targetValue": "1",
                                   "activationTargetValue": "0", "authMode": "bearer"}
    # --scaler-auth bearer (the default): KEDA sends the token of the TriggerAuthentication's Secret.
    assert trigger["authenticationRef"] == {"name": name}
    auth = one(objs, "TriggerAuthentication", name)["spec"]
    assert auth == {"secretTargetRef": [{"parameter": "token", "name": names.scaler_token_secret_name(APP),
                                         "key": names.SCALER_TOKEN_KEY}]}
    assert pod["spec"]["containers"][0]["args"] == ["--port", str(names.SCALER_PORT), "--auth", "bearer"]
    token_ref = {"name": names.scaler_token_secret_name(APP), "key": names.SCALER_TOKEN_KEY}
    assert env_of(dep)[names.ENV_SCALER_TOKEN] == {"secretKeyRef": token_ref}  # no token: no scaler
    for wl in ("scale-worker", "scale-front", "scale-idle"):  # demand posts; optional: the app serves without it
        assert env_of(one(objs, "Deployment", wl))[names.ENV_SCALER_TOKEN] == {
            "secretKeyRef": {**token_ref, "optional": True}}
    assert so["minReplicaCount"] == 0 and so["maxReplicaCount"] == 2
    assert so["fallback"] == {"failureThreshold": 3, "replicas": 1}
    behavior = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0 == behavior["scaleUp"]["stabilizationWindowSeconds"]
    scaled = json.dumps([o for o in objs if o["kind"] == "ScaledObject"])
    assert "prometheus" not in scaled and "vector(0)" not in scaled


def test_scaler_network_policies(objs: list[dict[str, Any]]) -> None:
    scaler = one(objs, "NetworkPolicy", names.scaler_name(APP))["spec"]
    assert scaler["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == SCALER_LABEL
    keda, callers = scaler["ingress"]
    assert keda["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "autoscaling"}}}]
    assert keda["ports"] == callers["ports"] == [{"protocol": "TCP", "port": names.SCALER_PORT}]
    assert scaler["egress"][0]["ports"] == [{"protocol": "TCP", "port": names.ADMIN_PORT}]
    pods = one(objs, "NetworkPolicy", names.dns_label(APP, "allow-scaler"))["spec"]
    assert pods["ingress"][0]["ports"] == [{"protocol": "TCP", "port": names.ADMIN_PORT}]
    assert pods["egress"][0]["ports"] == [{"protocol": "TCP", "port": names.SCALER_PORT}]


def test_no_scaler_with_hpa_or_without_autoscaling(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    with pytest.raises(CompileError, match="min_replicas 0"):
        compile_scale_app(tmp_path, autoscaler="hpa")
    with pytest.raises(CompileError, match="--wake-timeout"):
        compile_scale_app(tmp_path, wake_timeout_s=0)
    with pytest.raises(CompileError, match="--keda-namespace"):
        compile_scale_app(tmp_path, keda_namespace="Not_A_Namespace")


def test_custom_policy_warning_only_with_hpa(tmp_path: Path) -> None:
    from shoal.config import AutoscalingConfig
    from shoal.deployment import DeploymentSpec
    from shoal.kubernetes.compiler.autoscaling import autoscaler
    from shoal.kubernetes.compiler.common import AppContext

    sys.path.insert(0, str(Path(__file__).parent))
    apps, _ = load_apps("k8s_scale_app:app")
    spec = apps[0].spec
    worker = spec.deployments["Worker"]
    auto = dict(worker.config.resolved_autoscaling().model_dump(), min_replicas=1,  # type: ignore[union-attr]
                policy={"policy_function": "shoal.serving.autoscaling:default_policy"})
    cfg = worker.config.model_copy(update={"autoscaling_config": AutoscalingConfig(**auto)})
    dep = DeploymentSpec(**{**{f.name: getattr(worker, f.name) for f in dataclasses.fields(worker)}, "config": cfg})
    for kind, warned in (("keda", False), ("hpa", True)):
        ctx = AppContext(spec=spec, opts=CompileOptions(image="x", autoscaler=kind), app=APP, instance=APP,
                         version="v", canary=False, entry={}, warnings=[])
        autoscaler(ctx, dep)
        assert any("custom autoscaling policy" in w for w in ctx.warnings) == warned, kind


# --- the pod simulation ----------------------------------------------------------------------------


@dataclasses.dataclass
class IdleCall:
    status: int = 0
    retry_after: str | None = None
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def _call_idle(host: str, port: int, out: IdleCall) -> None:
    import http.client

    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=WAKE_S + 30)
    try:
        conn.request("GET", "/idle?q=1", headers={"connection": "close"})
        resp = conn.getresponse()
        out.status, out.retry_after = resp.status, resp.getheader("retry-after")
        out.body = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
        out.seconds = time.monotonic() - t0


@pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")
def test_scale_from_zero_to_n_and_back_through_the_scaler(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    # The simulation's KEDA stand-in reads the scaler without a TriggerAuthentication: no token here
    # (test_k8s_scaler_auth.py covers the token on the same paths).
    objs = compile_scale_app(tmp_path, wake_timeout_s=WAKE_S, scaler_auth="none")
    # Nothing will ever scale Idle: its ScaledObject stays out of the simulation.
    objs = [o for o in objs if not (o["kind"] == "ScaledObject" and o["metadata"]["name"] == "scale-idle")]
    worker, scaler = "scale-worker", names.scaler_name(APP)
    with running(objs, replicas={worker: 0, "scale-idle": 0}) as sim:
        sim.keda.start(polling_s=0.25, cooldown_s=0.5)
        host, port = sim.service_address(names.ingress_service_name(APP))
        idle = IdleCall()
        idle_thread = threading.Thread(target=_call_idle, args=(host, port, idle), daemon=True)
        idle_thread.start()
        peak = 0
        # Requests wait in Front while Worker wakes; none may wait longer than the deadline (+ slack).
        t0 = time.monotonic()
        with Traffic(host, port, threads=4, timeout=WAKE_S + 10) as traffic:
            assert wait_for(lambda: traffic.total > 0, WAKE_S + 15, 0.05)
            print(f"first answer after {time.monotonic() - t0:.1f}s (Worker woken from zero)")
            def scaled_up() -> bool:
                nonlocal peak
                peak = max(peak, len(sim.pods_of(worker, ready=True)))
                return peak >= 2
            assert wait_for(scaled_up, 90, 0.1), f"{worker} never reached 2 ready pods\n{sim.describe()}"
            # Worker's record_autoscaling_stats() reaches its pods' /metrics (where the scaler reads it).
            assert wait_for(lambda: any((metric(p, names.METRIC_AUTOSCALING_CUSTOM, app=APP, deployment="Worker",
                                                metric="served") or 0) > 0 for p in sim.pods_of(worker, ready=True)),
                            30, 0.2)
            traffic.wait_requests(40, timeout=60)
        print("under load:", traffic.summary(), "peak pods:", peak)
        assert not traffic.failures, traffic.failures[:5]
        assert traffic.ok >= 40
        assert {b["worker"] for b in traffic.bodies} <= {p.name for p in sim.pods if p.deployment == worker}
        # Idle: held for the deadline, then 503 with Retry-After (its scaler wants it, nothing scales it).
        idle_thread.join(WAKE_S + 40)
        assert idle.status == 503 and idle.retry_after is not None, idle
        assert "wake deadline" in idle.body.get("message", ""), idle.body
        assert idle.seconds >= WAKE_S - 1, idle
        # ... counted where the ShoalWakeTimeouts alert reads it: the caller's wake-deadline counter.
        front = sim.pods_of("scale-front", ready=True)[0]
        assert (metric(front, names.METRIC_WAKE_TIMEOUTS + "_total", app=APP, deployment="Idle") or 0) >= 1
        # Quiet: the scaler's downscale delays run out, the stand-in takes Worker back to zero.
        assert wait_for(lambda: not sim.pods_of(worker), 60, 0.1), sim.describe()
        status, body = get(*sim.service_address(scaler), "/status")
        assert status == 200
        state = json.loads(body)["deployments"]
        assert state["Worker"]["desired"] == 0, state
        # Both were woken by demand posted by Front (not only by scrapes of its held requests).
        assert state["Worker"]["demands"] >= 1 and state["Idle"]["demands"] >= 1, state
        events = sim.keda.states[worker].events
        print("keda stand-in:", [(a, b, why) for _, a, b, why in events])
        assert events[0][1:3] == (0, 1) and events[-1][2] == 0


def test_the_scaler_loads_the_autoscaling_configs_from_the_serve_config(tmp_path: Path) -> None:
    from shoal.exceptions import PodConfigError
    from shoal.kubernetes.scaler.command import _serve, load_autoscaling

    sys.path.insert(0, str(Path(__file__).parent))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": APP, "import_path": "k8s_scale_app:app"}]}))
    app, deployments, configs, app_policy = load_autoscaling(str(path), None)
    assert app == APP and sorted(deployments) == ["Front", "Idle", "Worker"]
    assert sorted(configs) == ["Idle", "Worker"] and configs["Worker"].max_replicas == 2
    assert app_policy is None
    # An application-level policy in the config reaches the scaler.
    path.write_text(yaml.safe_dump({"applications": [{
        "name": APP, "import_path": "k8s_scale_app:app",
        "autoscaling_policy": {"policy_function": "k8s_scale_app:no_such_policy"}}]}))
    assert load_autoscaling(str(path), None)[3] == AutoscalingPolicy(policy_function="k8s_scale_app:no_such_policy")
    # ... and one that cannot be loaded stops the scaler with exit status 2 (its log says why).
    assert asyncio.run(_serve(str(path), None, "127.0.0.1", 0, None, 2.0, 10.0)) == 2
    with pytest.raises(PodConfigError, match="no application 'nope'"):
        load_autoscaling(str(path), "nope")
    # The command's exit status for a bad config (the pod then restarts, its log saying why).
    assert asyncio.run(_serve(str(path), "nope", "127.0.0.1", 0, None, 2.0, 10.0)) == 2
