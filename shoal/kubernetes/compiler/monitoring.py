"""Monitoring of a compiled application with the Prometheus Operator: a ``PodMonitor`` that scrapes
every pod's admin port ``/metrics``, and a ``PrometheusRule`` of alerts on what shoal exports.

Both are emitted by default (``--no-pod-monitor`` drops both, ``--no-alerts`` the rule) and carry
``--monitor-label`` labels, e.g. ``release=kube-prometheus-stack``: kube-prometheus-stack's
Prometheus selects PodMonitors and PrometheusRules by its release label unless told otherwise.

The alerts, per application instance (``app`` is the label every pod's series carry):

* ``ShoalHTTP5xxRatio``: more than ``--alert-5xx-percent`` of the HTTP answers were 5xx over
  10 minutes (``ray_serve_num_http_requests_total``; apps with a route only);
* ``ShoalHTTPLatencyP99``: the p99 of ``ray_serve_http_request_latency_ms`` (request to the
  response's end) over ``--alert-p99-seconds`` for 10 minutes (apps with a route only);
* ``ShoalReplicasUnavailable``: a Deployment of the app (the scaler's included) had unavailable
  replicas for 15 minutes (kube-state-metrics' ``kube_deployment_status_replicas_unavailable``;
  LeaderWorkerSets have no kube-state-metrics series and are left out);
* ``ShoalWakeTimeouts``: callers failed requests because no pod of a callee became ready within
  the wake deadline (``shoal_handle_wake_timeouts_total``: the 503s with ``Retry-After`` of a
  scale from zero that did not happen in time).
"""

from __future__ import annotations

from shoal.kubernetes import names
from shoal.kubernetes.compiler.autoscaling import uses_scaler
from shoal.kubernetes.compiler.common import AppContext, Obj, promql_string
from shoal.observability import metric_defs

__all__ = ["ALERTS", "RULE_KIND", "pod_monitor", "prometheus_rule"]

RULE_KIND = "PrometheusRule"
# Every alert the rule may hold (docs/kubernetes.md lists them).
ALERTS = ("ShoalHTTP5xxRatio", "ShoalHTTPLatencyP99", "ShoalReplicasUnavailable", "ShoalWakeTimeouts")
# kube-state-metrics' series of a Deployment (its own `namespace` and `deployment` labels).
KSM_UNAVAILABLE = "kube_deployment_status_replicas_unavailable"
WINDOW = "5m"


def _meta(ctx: AppContext, name: str, component: str) -> Obj:
    meta = ctx.meta(name, component=component)
    meta["labels"].update(ctx.opts.monitor_labels)
    return meta


def pod_monitor(ctx: AppContext) -> Obj:
    """Scrape the admin port of every pod of the application instance (the scaler has none)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(ctx, names.dns_label(ctx.instance), "metrics"),
        "spec": {
            "selector": {"matchLabels": ctx.app_selector()},
            "podMetricsEndpoints": [{"port": "admin", "path": "/metrics", "interval": "15s"}],
        },
    }


def _selector(ctx: AppContext, *extra: str) -> str:
    """Label matchers of the instance's own series: its namespace (--prometheus-namespace-label,
    the label Prometheus puts the pod's namespace in; "" leaves it out) and ``app``."""
    matchers = []
    if ctx.opts.prometheus_namespace_label:
        matchers.append(f"{ctx.opts.prometheus_namespace_label}={promql_string(ctx.opts.namespace)}")
    matchers.append(f"app={promql_string(ctx.instance)}")
    matchers.extend(extra)
    return "{" + ",".join(matchers) + "}"


def _alert(name: str, expr: str, summary: str, description: str, ctx: AppContext, for_: str | None) -> Obj:
    rule: Obj = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": "warning", "shoal_app": ctx.instance}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _rules(ctx: AppContext) -> list[Obj]:
    opts = ctx.opts
    app = ctx.instance
    rules: list[Obj] = []
    if ctx.spec.route_prefix is not None:
        http = metric_defs.BY_NAME[metric_defs.HTTP_REQUESTS].exposed
        ratio = f"{opts.alert_5xx_percent / 100:g}"
        errors = _selector(ctx, 'status_code=~"5.."')
        rules.append(_alert(
            "ShoalHTTP5xxRatio",
            f"(sum(rate({http}{errors}[{WINDOW}])) / "
            f"sum(rate({http}{_selector(ctx)}[{WINDOW}]))) > {ratio}",
            f"shoal app {app}: more than {opts.alert_5xx_percent:g}% of HTTP answers are 5xx",
            f"{{{{ $value | humanizePercentage }}}} of the HTTP answers of {opts.namespace}/{app} were 5xx over "
            f"{WINDOW} (threshold --alert-5xx-percent {opts.alert_5xx_percent:g}); see the replicas' logs and the "
            "error_code label of ray_serve_num_http_error_requests_total",
            ctx, "10m"))
        latency = metric_defs.HTTP_LATENCY
        threshold_ms = f"{opts.alert_p99_seconds * 1000:g}"
        rules.append(_alert(
            "ShoalHTTPLatencyP99",
            f"histogram_quantile(0.99, sum by (le) (rate({latency}_bucket{_selector(ctx)}[{WINDOW}]))) "
            f"> {threshold_ms}",
            f"shoal app {app}: HTTP p99 latency over {opts.alert_p99_seconds:g}s",
            f"The p99 of the HTTP requests of {opts.namespace}/{app}, to the response's end, is "
            f"{{{{ $value | humanize }}}} ms (threshold --alert-p99-seconds {opts.alert_p99_seconds:g})",
            ctx, "10m"))
    deployments = [ctx.workload(d.name) for d in ctx.spec.deployments.values() if d.config.world_size <= 1]
    if uses_scaler(ctx):
        deployments.append(names.scaler_name(ctx.instance))
    if deployments:
        names_re = promql_string("|".join(sorted(deployments)))
        rules.append(_alert(
            "ShoalReplicasUnavailable",
            f"max by (deployment) ({KSM_UNAVAILABLE}{{namespace={promql_string(opts.namespace)},"
            f"deployment=~{names_re}}}) > 0",
            f"shoal app {app}: Deployment {{{{ $labels.deployment }}}} has unavailable replicas",
            f"{{{{ $value }}}} replica(s) of Deployment {opts.namespace}/{{{{ $labels.deployment }}}} have been "
            f"unavailable for 15 minutes: kubectl -n {opts.namespace} describe deployment "
            "{{ $labels.deployment }} (Pending pods, image pulls, failing probes)",
            ctx, "15m"))
    rules.append(_alert(
        "ShoalWakeTimeouts",
        f"sum by (deployment) (increase({names.METRIC_WAKE_TIMEOUTS}_total{_selector(ctx)}[10m])) > 0",
        f"shoal app {app}: requests failed waiting for {{{{ $labels.deployment }}}} to wake",
        f"Callers in {opts.namespace}/{app} failed {{{{ $value | humanize }}}} request(s) for deployment "
        "{{ $labels.deployment }} in 10 minutes (HTTP: 503 with Retry-After): no pod became ready within the wake "
        f"deadline (--wake-timeout {opts.wake_timeout_s:g}s). Look for Pending pods, slow image pulls or model "
        "loads, or a scaler KEDA cannot read",
        ctx, None))
    return rules


def prometheus_rule(ctx: AppContext) -> Obj:
    """The application instance's alerts (see the module docstring)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": RULE_KIND,
        "metadata": _meta(ctx, names.dns_label(ctx.instance), "alerts"),
        "spec": {"groups": [{"name": f"shoal.{ctx.opts.namespace}.{ctx.instance}", "rules": _rules(ctx)}]},
    }
