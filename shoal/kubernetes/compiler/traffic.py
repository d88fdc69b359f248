"""How a compiled application scales and is reached: autoscalers (KEDA or HPA), NetworkPolicies,
the HTTP Service with its HTTPRoute or Ingress, the PodMonitor and the Grafana dashboard."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from shoal.config import AutoscalingConfig
from shoal.deployment import DeploymentSpec
from shoal.exceptions import CompileError
from shoal.kubernetes import lws, names
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CANARY_OF,
    HPA_EXTERNAL_METRIC,
    L_INSTANCE,
    L_NAME,
    L_PART_OF,
    L_VERSION,
    MAX_STABILIZATION_S,
    AppContext,
    Obj,
    instance_name,
    label_value,
    ns_peer,
    promql_string,
    seconds,
)

# --- autoscaling -------------------------------------------------------------------------------


def behavior(auto: AutoscalingConfig) -> Obj:
    return {
        "scaleUp": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.upscale_delay_s))},
        "scaleDown": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.downscale_delay_s))},
    }


def keda_query(ctx_namespace: str, app: str, deployment: str, namespace_label: str = "namespace") -> str:
    """PromQL: requests in the deployment's replicas plus requests callers hold for it."""
    matchers = []
    if namespace_label:
        matchers.append(f"{namespace_label}={promql_string(ctx_namespace)}")
    matchers += [f"app={promql_string(app)}", f"deployment={promql_string(deployment)}"]
    sel = "{" + ",".join(matchers) + "}"
    # `or vector(0)`: a sum over no series is empty, and empty + x is empty.
    return f"(sum({names.METRIC_ONGOING}{sel}) or vector(0)) + (sum({names.METRIC_CALLER_QUEUED}{sel}) or vector(0))"


def autoscaler(ctx: AppContext, dep: DeploymentSpec) -> list[Obj]:
    auto = dep.config.resolved_autoscaling()
    if auto is None:
        return []
    if auto.policy:
        ctx.warnings.append(
            f"deployment {dep.name!r}: the custom autoscaling policy {auto.policy!r} runs only in local mode; "
            f"on Kubernetes the {ctx.opts.autoscaler} autoscaler scales on target_ongoing_requests"
        )
    min_replicas = auto.min_replicas
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.workload(dep.name)}
    if dep.config.world_size > 1:  # LeaderWorkerSets have the scale subresource: one replica is one group
        target = {"apiVersion": names.LWS_API_VERSION, "kind": lws.LWS_KIND,
                  "name": names.gang_name(ctx.instance, dep.name)}
    if ctx.opts.autoscaler == "hpa":
        return [_hpa(ctx, dep, auto, target)]
    if min_replicas == 0 and dep.ingress and ctx.spec.route_prefix is not None:
        ctx.warnings.append(
            f"deployment {dep.name!r} is the HTTP ingress of {ctx.app!r}: min_replicas 0 raised to 1, since "
            "nothing holds HTTP requests while it has no pod"
        )
        min_replicas = 1
    return [_scaled_object(ctx, dep, auto, target, min_replicas)]


def _hpa(ctx: AppContext, dep: DeploymentSpec, auto: AutoscalingConfig, target: Obj) -> Obj:
    """An ``autoscaling/v2`` HorizontalPodAutoscaler on the external load metric (``--autoscaler hpa``)."""
    min_replicas = auto.min_replicas
    comp = "ingress" if dep.ingress else "deployment"
    threshold = f"{auto.target_ongoing_requests:g}"
    if min_replicas == 0:
        raise CompileError(
            f"deployment {dep.name!r} of application {ctx.app!r} has min_replicas 0, but a "
            "HorizontalPodAutoscaler cannot scale to zero; use --autoscaler keda (the default) or raise "
            "min_replicas to 1"
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": ctx.meta(ctx.workload(dep.name), component=comp, dep=dep.name),
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [{
                "type": "External",
                "external": {
                    "metric": {
                        "name": HPA_EXTERNAL_METRIC,
                        "selector": {"matchLabels": {"app": label_value(ctx.instance),
                                                     "deployment": label_value(dep.name)}},
                    },
                    # AverageValue: desired = ceil(total / target), Ray's rule.
                    "target": {"type": "AverageValue", "averageValue": threshold},
                },
            }],
            "behavior": behavior(auto),
        },
    }


def _scaled_object(ctx: AppContext, dep: DeploymentSpec, auto: AutoscalingConfig, target: Obj,
                   min_replicas: int) -> Obj:
    """A KEDA ScaledObject on the Prometheus load query (the default; it scales to zero)."""
    comp = "ingress" if dep.ingress else "deployment"
    threshold = f"{auto.target_ongoing_requests:g}"
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": ctx.meta(ctx.workload(dep.name), component=comp, dep=dep.name),
        "spec": {
            "scaleTargetRef": target,
            "pollingInterval": seconds(auto.metrics_interval_s),
            # Only governs the last step to zero.
            "cooldownPeriod": round(auto.downscale_to_zero_delay_s if auto.downscale_to_zero_delay_s is not None
                                    else auto.downscale_delay_s),
            "minReplicaCount": min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(auto)}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": ctx.opts.prometheus_url,
                    "query": keda_query(ctx.opts.namespace, ctx.instance, dep.name,
                                        ctx.opts.prometheus_namespace_label),
                    "threshold": threshold,
                    # Wake from zero as soon as any caller holds a request for this deployment.
                    "activationThreshold": "0",
                    "ignoreNullValues": "true",
                },
            }],
        },
    }


# --- network policies --------------------------------------------------------------------------


def network_policies(ctx: AppContext) -> list[Obj]:
    opts = ctx.opts
    policies: list[Obj] = [{
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(names.dns_label(ctx.instance, "default-deny"), component="network-policy"),
        "spec": {"podSelector": {"matchLabels": ctx.app_selector()}, "policyTypes": ["Ingress", "Egress"]},
    }]
    dns_ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    dns_rule: Obj = {"ports": dns_ports}
    if opts.dns_egress == "kube-dns":
        dns_rule = {
            "to": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }],
            "ports": dns_ports,
        }
    policies.append({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(names.dns_label(ctx.instance, "allow-dns"), component="network-policy"),
        "spec": {"podSelector": {"matchLabels": ctx.app_selector()}, "policyTypes": ["Egress"],
                 "egress": [dns_rule]},
    })
    callers: dict[str, list[str]] = {name: [] for name in ctx.spec.deployments}
    for caller, callee in ctx.spec.edges():
        if caller not in callers[callee]:
            callers[callee].append(caller)
    for dep in ctx.spec.deployments.values():
        ingress_rules: list[Obj] = []
        if callers[dep.name]:
            ingress_rules.append({
                "from": [{"podSelector": {"matchLabels": ctx.selector(c)}} for c in callers[dep.name]],
                "ports": [{"protocol": "TCP", "port": names.RPC_PORT}],
            })
        if dep.ingress and ctx.spec.route_prefix is not None:
            ingress_rules.append({"from": ns_peer(opts.http_from_namespaces),
                                  "ports": [{"protocol": "TCP", "port": names.HTTP_PORT}]})
        ingress_rules.append({"from": ns_peer(opts.metrics_from_namespaces),
                              "ports": [{"protocol": "TCP", "port": names.ADMIN_PORT}]})
        spec: Obj = {
            "podSelector": {"matchLabels": ctx.serving_selector(dep)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress_rules,
        }
        if dep.calls:
            spec["egress"] = [{
                "to": [{"podSelector": {"matchLabels": ctx.selector(c)}} for c in dep.calls],
                "ports": [{"protocol": "TCP", "port": names.RPC_PORT}],
            }]
        policies.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": ctx.meta(ctx.workload(dep.name), component="network-policy", dep=dep.name),
            "spec": spec,
        })
        if dep.config.world_size > 1:  # a gang: its ranks among themselves (the policy above is rank 0's)
            policies.append(lws.gang_network_policy(
                ctx.meta(names.gang_name(ctx.instance, dep.name), component="network-policy", dep=dep.name),
                ctx.selector(dep.name), metrics_from=ns_peer(opts.metrics_from_namespaces),
                callees=[ctx.selector(c) for c in dep.calls]))
    return policies


# --- HTTP --------------------------------------------------------------------------------------


def http_objects(ctx: AppContext) -> list[Obj]:
    opts = ctx.opts
    ingress_dep = ctx.spec.ingress
    prefix = ctx.spec.route_prefix or "/"
    out: list[Obj] = []
    svc_name = names.ingress_service_name(ctx.instance)
    out.append(http_service(ctx, svc_name, ctx.serving_selector(ctx.spec.deployments[ingress_dep]), ingress_dep))
    backends: list[Obj] = [{"name": svc_name, "port": names.HTTP_PORT}]
    if ctx.canary and opts.canary_of is not None:
        old_instance = instance_name(ctx.app, opts.canary_of, True)
        old_name = names.ingress_service_name(old_instance)
        # The stable pods of the old version: the plain app instance, pinned to its version label.
        old_selector = {L_PART_OF: label_value(ctx.app), L_INSTANCE: label_value(ctx.app),
                        L_NAME: label_value(ingress_dep), L_VERSION: opts.canary_of}
        if ctx.spec.deployments[ingress_dep].config.world_size > 1:
            old_selector[names.LWS_LABEL_WORKER_INDEX] = "0"
        out.append(http_service(ctx, old_name, old_selector, ingress_dep,
                                 annotations={A_CANARY_OF: opts.canary_of}))
        backends = [
            {"name": old_name, "port": names.HTTP_PORT, "weight": 100 - opts.canary_weight},
            {"name": svc_name, "port": names.HTTP_PORT, "weight": opts.canary_weight},
        ]
    if opts.gateway:
        out.append(_http_route(ctx, backends, prefix))
    elif opts.ingress_class:
        out.append(_ingress(ctx, svc_name, prefix))
    else:
        ctx.warnings.append(
            f"application {ctx.app!r}: no --gateway or --ingress-class, so no route; the ClusterIP Service "
            f"{svc_name!r} serves HTTP inside the cluster (kubectl port-forward svc/{svc_name} {names.HTTP_PORT})"
        )
    return out


def _http_route(ctx: AppContext, backends: list[Obj], prefix: str) -> Obj:
    """The Gateway API HTTPRoute of the app (``--gateway``); weighted backends for a canary."""
    opts = ctx.opts
    assert opts.gateway is not None
    parent: Obj = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": opts.gateway}
    if opts.gateway_namespace:
        parent["namespace"] = opts.gateway_namespace
    if opts.gateway_section:
        parent["sectionName"] = opts.gateway_section
    route_meta = ctx.meta(names.dns_label(ctx.app), component="route")
    # The route belongs to the app, not to one canary instance.
    route_meta["labels"][L_INSTANCE] = label_value(ctx.app)
    route_meta["annotations"][A_APP] = ctx.app
    if ctx.canary and opts.canary_of is not None:
        route_meta["annotations"][A_CANARY_OF] = opts.canary_of
    spec: Obj = {"parentRefs": [parent]}
    if opts.hostnames:
        spec["hostnames"] = list(opts.hostnames)
    spec["rules"] = [{
        "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
        "backendRefs": [{"group": "", "kind": "Service", **b} for b in backends],
        # Long generations and token streams: the route must not cut them.
        "timeouts": {"request": opts.route_timeout},
    }]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": route_meta,
        "spec": spec,
    }


def _ingress(ctx: AppContext, svc_name: str, prefix: str) -> Obj:
    """A classic networking.k8s.io/v1 Ingress (``--ingress-class``)."""
    opts = ctx.opts
    annotations: dict[str, str] = {}
    if opts.ingress_class is not None and "nginx" in opts.ingress_class:
        seconds = str(duration_seconds(opts.route_timeout))
        annotations = {
            "nginx.ingress.kubernetes.io/proxy-read-timeout": seconds,
            "nginx.ingress.kubernetes.io/proxy-send-timeout": seconds,
            # Stream tokens as they come instead of buffering whole responses.
            "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        }
    path = {"path": prefix, "pathType": "Prefix",
            "backend": {"service": {"name": svc_name, "port": {"number": names.HTTP_PORT}}}}
    rules: list[Obj] = [{"host": h, "http": {"paths": [path]}} for h in opts.hostnames] or \
        [{"http": {"paths": [path]}}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": ctx.meta(names.dns_label(ctx.instance), component="route", annotations=annotations),
        "spec": {"ingressClassName": opts.ingress_class, "rules": rules},
    }


def http_service(ctx: AppContext, name: str, selector: Mapping[str, str], dep: str,
                  annotations: Mapping[str, str] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(name, component="ingress", dep=dep, annotations=annotations),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": "http", "port": names.HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def duration_seconds(text: str) -> int:
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)(h|ms|m|s)", text):
        total += int(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return max(1, math.ceil(total))


def pod_monitor(ctx: AppContext) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": ctx.meta(names.dns_label(ctx.instance), component="metrics"),
        "spec": {
            "selector": {"matchLabels": ctx.app_selector()},
            "podMetricsEndpoints": [{"port": "admin", "path": "/metrics", "interval": "15s"}],
        },
    }


def grafana_dashboard(ctx: AppContext) -> Obj:
    """The dashboard of shoal.observability.grafana, preset to this application, in a ConfigMap labelled for
    Grafana's dashboard sidecar (``grafana_dashboard: "1"``)."""
    from shoal.observability.grafana import dashboard_json

    meta = ctx.meta(names.dns_label(ctx.instance, "grafana"), component="dashboard")
    meta["labels"]["grafana_dashboard"] = "1"
    uid = names.dns_label("shoal", ctx.instance, max_len=40)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {f"shoal-{names.dns_label(ctx.instance)}.json": dashboard_json(ctx.instance, uid)}}


