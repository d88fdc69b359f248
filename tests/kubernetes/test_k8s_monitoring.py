"""Monitoring by default: the PodMonitor and the PrometheusRule of alerts (their labels, queries on the
metrics shoal really exports, schema), the flags that drop them, and what ``doctor`` and ``apply``
say when the cluster has no Prometheus Operator CRDs."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import pytest
from click.testing import CliRunner

from shoal.exceptions import CompileError, ObjectInvalid
from shoal.kubernetes import cli as k8s_cli
from shoal.kubernetes import names
from shoal.kubernetes.apply import ApplyRejected, Scope, execute, plan_apply
from shoal.kubernetes.compiler import CompileOptions, compile_apps, prune_selector
from shoal.kubernetes.compiler.monitoring import ALERTS
from shoal.kubernetes.doctor import diagnose
from shoal.kubernetes.pod.metrics import METRIC_IN_FLIGHT
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import validate_object, validate_objects
from shoal.observability import metric_defs
from tests.kubernetes.k8s_fake_api import FakeCluster, platform

Obj = dict[str, Any]
OPTS = CompileOptions(namespace="ml", image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/gpu.shared", gateway="web")
DEMO = "tests.kubernetes.k8s_demo_app:app"


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    return load_apps(DEMO)[0][0]


@pytest.fixture(scope="module")
def gang() -> LoadedApp:
    return load_apps("tests.kubernetes.k8s_gang_app:pipeline")[0][0]


def build(app: LoadedApp, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, **changes)).objects


def kinds(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def rules(objs: list[Obj]) -> dict[str, Obj]:
    (rule,) = kinds(objs, "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_pod_monitor_and_rule_by_default_with_monitor_labels(demo: LoadedApp) -> None:
    objs = build(demo, monitor_labels={"release": "kube-prometheus-stack"})
    validate_objects(objs)
    (pm,) = kinds(objs, "PodMonitor")
    (rule,) = kinds(objs, "PrometheusRule")
    for obj in (pm, rule):
        assert obj["metadata"]["name"] == "default" and obj["metadata"]["namespace"] == "ml"
        labels = obj["metadata"]["labels"]
        assert labels["release"] == "kube-prometheus-stack"
        assert labels["app.kubernetes.io/part-of"] == "default" and labels["app.kubernetes.io/managed-by"] == "shoal"
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s"}]
    # The monitor labels stay on the monitoring objects: no pod or Deployment gets them.
    assert all("release" not in o["metadata"]["labels"] for o in objs if o["kind"] not in ("PodMonitor",
                                                                                          "PrometheusRule"))
    assert sorted(rules(objs)) == sorted(ALERTS)


def test_flags_that_drop_them(demo: LoadedApp) -> None:
    assert kinds(build(demo, alerts=False), "PodMonitor") and not kinds(build(demo, alerts=False), "PrometheusRule")
    objs = build(demo, pod_monitor=False)
    assert not kinds(objs, "PodMonitor") and not kinds(objs, "PrometheusRule")


def test_alert_queries_use_the_metrics_shoal_exports(demo: LoadedApp) -> None:
    found = rules(build(demo, alert_5xx_percent=2.5, alert_p99_seconds=0.75, wake_timeout_s=30))
    exported = {m.exposed for m in metric_defs.METRICS} | {names.METRIC_WAKE_TIMEOUTS + "_total", METRIC_IN_FLIGHT}
    ksm = {"kube_deployment_status_replicas_unavailable"}
    for alert, rule in found.items():
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        used = set(re.findall(r"([a-z_:]+)(?:_bucket)?\{", expr))
        used = {u.removesuffix("_bucket") for u in used}
        assert used and used <= exported | ksm, (alert, used)
        assert rule["labels"] == {"severity": "warning", "shoal_app": "default"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    http = found["ShoalHTTP5xxRatio"]["expr"]
    assert 'ray_serve_num_http_requests_total{namespace="ml",app="default",status_code=~"5.."}' in http
    assert http.endswith("> 0.025") and found["ShoalHTTP5xxRatio"]["for"] == "10m"
    latency = found["ShoalHTTPLatencyP99"]["expr"]
    assert latency.startswith("histogram_quantile(0.99, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket{")
    assert latency.endswith("> 750")  # milliseconds, the histogram's unit
    unavailable = found["ShoalReplicasUnavailable"]["expr"]
    assert ('deployment=~"default-api|default-model|default-shoal-scaler|default-tokenizer"' in unavailable
            and found["ShoalReplicasUnavailable"]["for"] == "15m")
    wake = found["ShoalWakeTimeouts"]
    assert "shoal_handle_wake_timeouts_total{" in wake["expr"] and "for" not in wake
    assert "--wake-timeout 30s" in wake["annotations"]["description"]


def test_alerts_follow_the_app(demo: LoadedApp, gang: LoadedApp) -> None:
    # Another Prometheus namespace label, or none.
    custom = rules(build(demo, prometheus_namespace_label="kubernetes_namespace"))
    assert 'kubernetes_namespace="ml",app="default"' in custom["ShoalWakeTimeouts"]["expr"]
    bare = rules(build(demo, prometheus_namespace_label=""))
    assert '{app="default"}' in bare["ShoalWakeTimeouts"]["expr"]
    # No route: no HTTP alerts.
    apps, _ = load_apps(DEMO, route_prefix="none")
    headless = compile_apps([(apps[0].spec, apps[0].entry)], OPTS).objects
    assert sorted(rules(headless)) == ["ShoalReplicasUnavailable", "ShoalWakeTimeouts"]
    # A gang's LeaderWorkerSet has no kube-state-metrics series: only its plain Deployments are watched.
    gang_rules = rules(build(gang))
    expr = gang_rules["ShoalReplicasUnavailable"]["expr"]
    assert "default-api" in expr and "tplinear" not in expr  # the LeaderWorkerSet default-tplinear-gang
    validate_objects(build(gang))


def test_option_errors(demo: LoadedApp) -> None:
    for changes, message in (
        ({"monitor_labels": {"app.kubernetes.io/part-of": "x"}}, "--monitor-label app.kubernetes.io/part-of: shoal"),
        ({"monitor_labels": {"release": "not valid!"}}, "--monitor-label release='not valid!'"),
        ({"alert_5xx_percent": 0}, "--alert-5xx-percent must be more than 0"),
        ({"alert_5xx_percent": 101}, "--alert-5xx-percent must be more than 0 and at most 100"),
        ({"alert_p99_seconds": -1}, "--alert-p99-seconds must be more than 0"),
    ):
        with pytest.raises(CompileError, match=re.escape(message)):
            build(demo, **changes)


def test_rule_schema_is_strict(demo: LoadedApp) -> None:
    (rule,) = kinds(build(demo), "PrometheusRule")
    assert validate_object(rule) == "crd"
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["record"] = "shoal:x"  # alert and record: exactly one
    with pytest.raises(ObjectInvalid, match="PrometheusRule/default"):
        validate_object(broken)
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(ObjectInvalid, match=r"spec\.groups\.0\.rules\.0\.for"):
        validate_object(broken)
    broken = copy.deepcopy(rule)
    del broken["spec"]["groups"][0]["name"]
    with pytest.raises(ObjectInvalid, match="'name' is a required property"):
        validate_object(broken)
    (auth,) = kinds(build(demo), "TriggerAuthentication")
    assert validate_object(auth) == "crd"
    broken = copy.deepcopy(auth)
    del broken["spec"]["secretTargetRef"][0]["key"]
    with pytest.raises(ObjectInvalid, match="TriggerAuthentication"):
        validate_object(broken)
    (so, *_) = kinds(build(demo), "ScaledObject")
    broken = copy.deepcopy(so)
    broken["spec"]["triggers"][0]["authenticationRef"] = {"kind": "TriggerAuthentication"}
    with pytest.raises(ObjectInvalid, match="'name' is a required property"):
        validate_object(broken)


def test_doctor_checks_the_rule_and_trigger_authentication_crds(demo: LoadedApp) -> None:
    objs = build(demo)
    assert [f for f in diagnose(platform(FakeCluster()), objs, OPTS) if f.status != "ok"] == []
    cluster = platform(FakeCluster(), without=("prometheusrules.monitoring.coreos.com",
                                               "triggerauthentications.keda.sh"))
    problems = [f"{f.what}: {f.detail} -> {f.fix}" for f in diagnose(cluster, objs, OPTS) if f.status != "ok"]
    assert len(problems) == 2, problems
    assert any("PrometheusRule (monitoring.coreos.com/v1)" in p and "prometheusrules.monitoring.coreos.com" in p
               and "--no-alerts" in p for p in problems)
    assert any("TriggerAuthentication (keda.sh/v1alpha1)" in p and "--scaler-auth none" in p for p in problems)
    # Without the rule, doctor does not look for its CRD.
    assert [f for f in diagnose(cluster, build(demo, alerts=False, scaler_auth="none"), OPTS)
            if f.status != "ok"] == []


def test_apply_refuses_before_changing_anything_when_a_crd_is_missing(demo: LoadedApp) -> None:
    cluster = FakeCluster(unserved=("PrometheusRule", "PodMonitor"))
    plan = plan_apply(build(demo), cluster, [Scope("ml", prune_selector("default"))])
    assert plan.unserved == [("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")]
    assert any("apply will refuse to start" in w for w in plan.warnings)
    with pytest.raises(ApplyRejected) as info:
        execute(plan, cluster)
    message = str(info.value)
    assert "no CRD podmonitors.monitoring.coreos.com" in message and "--no-pod-monitor" in message
    assert "no CRD prometheusrules.monitoring.coreos.com" in message and "--no-alerts" in message
    assert message.endswith("nothing was applied")
    assert cluster.objects == {} and not [c for c in cluster.calls if c[0] == "apply"]
    # The flags it names are enough.
    plan = plan_apply(build(demo, pod_monitor=False), cluster, [Scope("ml", prune_selector("default"))])
    assert plan.unserved == [] and execute(plan, cluster)["created"] > 0


def test_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    base = ["build", DEMO, "-n", "ml", "--image", "registry.example.com/demo:1", "--gpu-resource",
            "nvidia.com/gpu.shared"]
    res = CliRunner().invoke(k8s_cli.k8s, [*base, "--monitor-label", "release=kps", "--alert-p99-seconds", "2"])
    assert res.exit_code == 0, res.output
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    (rule,) = kinds(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert kinds(objs, "PodMonitor")[0]["metadata"]["labels"]["release"] == "kps"
    res = CliRunner().invoke(k8s_cli.k8s, [*base, "--no-pod-monitor"])
    assert res.exit_code == 0 and "PodMonitor" not in res.stdout and "PrometheusRule" not in res.stdout
    res = CliRunner().invoke(k8s_cli.k8s, [*base, "--no-alerts"])
    assert res.exit_code == 0 and "kind: PodMonitor" in res.stdout and "PrometheusRule" not in res.stdout
    res = CliRunner().invoke(k8s_cli.k8s, [*base, "--monitor-label", "release"])
    assert res.exit_code == 2 and "--monitor-label 'release': expected KEY=VALUE" in res.output
