"""How a compiled application is reached: NetworkPolicies (callers, the Gateway's namespace or CIDRs
on HTTP, the monitoring namespace on metrics, configurable DNS egress), the HTTP Service with its
HTTPRoute (``timeouts`` per --gateway-api-version) or Ingress (the Service selects the holding front
of compiler/front.py when the ingress scales to zero), and the Grafana dashboard.
Autoscaling is compiler/autoscaling.py, the PodMonitor and alerts compiler/monitoring.py."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from shoal.kubernetes import lws, names
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CANARY_OF,
    L_INSTANCE,
    L_NAME,
    L_PART_OF,
    L_VERSION,
    AppContext,
    CompileOptions,
    Obj,
    gateway_api_release,
    instance_name,
    label_value,
    ns_peer,
)
from shoal.kubernetes.compiler.front import front_network_policy, front_selector, uses_front
from shoal.kubernetes.compiler.grpc_ingress import grpc_ports, grpc_route, grpc_service_port

# --- network policies --------------------------------------------------------------------------


def network_policies(ctx: AppContext) -> list[Obj]:
    """Default deny, DNS egress, and per deployment: its callers on RPC, the HTTP port from where the
    route's traffic comes (ingress deployment only), the admin port from the monitoring namespace(s).

    Kubelet probes need no rule: traffic from the pod's own node is always allowed."""
    opts = ctx.opts
    policies: list[Obj] = [{
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(names.dns_label(ctx.instance, "default-deny"), component="network-policy"),
        "spec": {"podSelector": {"matchLabels": ctx.app_selector()}, "policyTypes": ["Ingress", "Egress"]},
    }, {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(names.dns_label(ctx.instance, "allow-dns"), component="network-policy"),
        "spec": {"podSelector": {"matchLabels": ctx.app_selector()}, "policyTypes": ["Egress"],
                 "egress": [dns_rule(opts)]},
    }]
    callers: dict[str, list[str]] = {name: [] for name in ctx.spec.deployments}
    for caller, callee in ctx.spec.edges():
        if caller not in callers[callee]:
            callers[callee].append(caller)
    # An ingress at zero behind the holding front (compiler/front.py): HTTP reaches the front, which
    # calls the ingress pods on RPC; nothing from outside the app reaches their HTTP port.
    front = uses_front(ctx)
    for dep in ctx.spec.deployments.values():
        ingress_rules: list[Obj] = []
        peers = [{"podSelector": {"matchLabels": ctx.selector(c)}} for c in callers[dep.name]]
        if front and dep.ingress:
            peers.append({"podSelector": {"matchLabels": front_selector(ctx)}})
        if peers:
            ingress_rules.append({"from": peers, "ports": [{"protocol": "TCP", "port": names.RPC_PORT}]})
        if dep.ingress and ctx.spec.route_prefix is not None and not front:
            ingress_rules.append({"from": http_peers(ctx),
                                  "ports": [{"protocol": "TCP", "port": names.HTTP_PORT}, *grpc_ports(ctx)]})
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
    if front:
        policies.append(front_network_policy(ctx, http_peers(ctx)))
    return policies


def dns_rule(opts: CompileOptions) -> Obj:
    """The egress rule for name resolution: the DNS pods (kube-dns/CoreDNS by default, or any pods by
    --dns-namespace/--dns-pod-label, e.g. OpenShift's on 5353) and --dns-cidr blocks (NodeLocal
    DNSCache's link-local address is not a pod), on every --dns-port over UDP and TCP."""
    ports: list[Obj] = [{"protocol": proto, "port": port} for port in opts.dns_ports for proto in ("UDP", "TCP")]
    if opts.dns_egress == "any":
        return {"ports": ports}
    to: list[Obj] = [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": opts.dns_namespace}},
        "podSelector": {"matchLabels": dict(opts.dns_pod_labels)},
    }]
    to.extend({"ipBlock": {"cidr": cidr}} for cidr in opts.dns_cidrs)
    return {"to": to, "ports": ports}


def http_peers(ctx: AppContext) -> list[Obj]:
    """Who may reach the ingress deployment's HTTP port: where the route's proxies run, not every pod.

    --http-from-namespace when given ("*": any); else the Gateway's namespace with --gateway (most
    implementations run the Gateway's proxies there); else the app's own namespace when there is no
    route (in-cluster clients of the ClusterIP Service); with --ingress-class, any namespace (the
    controller's namespace is not known here; warned). Plus --http-from-cidr blocks.
    """
    opts = ctx.opts
    namespaces = list(opts.http_from_namespaces)
    if not namespaces:
        if opts.gateway:
            namespaces = [opts.gateway_namespace or opts.namespace]
        elif opts.ingress_class:
            namespaces = ["*"]
            ctx.warn(f"application {ctx.app!r}: with --ingress-class the NetworkPolicy admits HTTP from every "
                     "namespace, so any pod can bypass the Ingress; name the ingress controller's namespace with "
                     "--http-from-namespace (e.g. ingress-nginx)")
        else:
            namespaces = [opts.namespace]
    peers = ns_peer(namespaces)
    peers.extend({"ipBlock": {"cidr": cidr}} for cidr in opts.http_from_cidrs)
    return peers


# --- HTTP --------------------------------------------------------------------------------------


def http_objects(ctx: AppContext) -> list[Obj]:
    opts = ctx.opts
    ingress_dep = ctx.spec.ingress
    prefix = ctx.spec.route_prefix or "/"
    out: list[Obj] = []
    svc_name = names.ingress_service_name(ctx.instance)
    # With an ingress at zero the Service (the route's backend) selects the holding front, which is always there.
    selector = front_selector(ctx) if uses_front(ctx) else ctx.serving_selector(ctx.spec.deployments[ingress_dep])
    out.append(http_service(ctx, svc_name, selector, ingress_dep))
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
        route = _http_route(ctx, backends, prefix)
        out.append(route)
        if (grpc := grpc_route(ctx, route["spec"]["parentRefs"][0], backends)) is not None:
            out.append(grpc)
    elif opts.ingress_class:
        out.append(_ingress(ctx, svc_name, prefix))
        if grpc_service_port(ctx):
            ctx.warn(f"application {ctx.app!r}: an Ingress (--ingress-class) carries no gRPC route; gRPC clients "
                     f"reach the Service {svc_name!r} on its 'grpc' port, or build with --gateway for a GRPCRoute")
    else:
        ctx.warnings.append(
            f"application {ctx.app!r}: no --gateway or --ingress-class, so no route; the ClusterIP Service "
            f"{svc_name!r} serves HTTP inside the cluster (kubectl port-forward svc/{svc_name} {names.HTTP_PORT})"
        )
    return out


# The first Gateway API release whose standard-channel HTTPRoute has rules[].timeouts (GEP-1742).
TIMEOUTS_SINCE = (1, 2)


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
    rule: Obj = {
        "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
        "backendRefs": [{"group": "", "kind": "Service", **b} for b in backends],
    }
    if gateway_api_release(opts.gateway_api_version) >= TIMEOUTS_SINCE:
        # Long generations and token streams: the route must not cut them.
        rule["timeouts"] = {"request": opts.route_timeout}
    else:
        ctx.warn(
            f"--gateway-api-version {opts.gateway_api_version}: HTTPRoute rules have no 'timeouts' in the standard "
            f"channel before Gateway API v1.2, so the route of {ctx.app!r} does not carry --route-timeout "
            f"{opts.route_timeout}; the Gateway's own default applies (Envoy-based gateways cut a request after 15 s), "
            "which ends long generations and streams. Set the timeout with your Gateway implementation's policy, or "
            "install Gateway API v1.2 or later (standard channel) and build with --gateway-api-version 1.2"
        )
    spec["rules"] = [rule]
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
            "ports": [{"name": "http", "port": names.HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                      *grpc_service_port(ctx)],
        },
    }


def duration_seconds(text: str) -> int:
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)(h|ms|m|s)", text):
        total += int(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return max(1, math.ceil(total))


def grafana_dashboard(ctx: AppContext) -> Obj:
    """The dashboard of shoal.observability.grafana, preset to this application, in a ConfigMap labelled for
    Grafana's dashboard sidecar (``grafana_dashboard: "1"``)."""
    from shoal.observability.grafana import dashboard_json

    meta = ctx.meta(names.dns_label(ctx.instance, "grafana"), component="dashboard")
    meta["labels"]["grafana_dashboard"] = "1"
    uid = names.dns_label("shoal", ctx.instance, max_len=40)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {f"shoal-{names.dns_label(ctx.instance)}.json": dashboard_json(ctx.instance, uid)}}


