"""gRPC on Kubernetes: what the compiler adds when the serve config has ``grpc_options``.

The pods that serve an application's HTTP ingress (its ingress deployment's, rank 0 of a gang, or
the holding front of an ingress at zero) serve gRPC too (:mod:`shoal.kubernetes.pod.grpc_ingress`)
on the container port ``grpc`` (:data:`~shoal.kubernetes.names.GRPC_PORT`; the ConfigMap's
``grpc_options.port`` says so). The app's HTTP Service gets a port ``grpc`` numbered
``grpc_options.port`` (Ray's 9000 by default), ``appProtocol: grpc``; the NetworkPolicies that let
traffic reach the HTTP port let it reach the gRPC port; the pods' startupProbe is the kubelet's
``grpc:`` probe of the standard health service (it passes once the pod is ready for gRPC calls),
except when the HTTP port has TLS (``http_options.ssl_certfile``: the kubelet's gRPC probe speaks
plaintext only), where the HTTP one stays. With ``--gateway``, a Gateway API ``GRPCRoute`` per
app on the HTTPRoute's parent: a rule matching the ``application`` header (exact) to the app's
Service, and in the first app of the build (with a route prefix) a rule without a match, for calls
that name no application.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CANARY_OF,
    L_INSTANCE,
    AppContext,
    GRPCPlan,
    Obj,
    gateway_api_release,
    label_value,
)

__all__ = ["GRPCROUTE_SINCE", "GRPCPlan", "grpc_plan", "grpc_ports", "grpc_route", "grpc_service_port", "pod_grpc",
           "serves_grpc"]

# The first Gateway API release whose standard channel has GRPCRoute gateway.networking.k8s.io/v1.
GRPCROUTE_SINCE = (1, 1)
FIELD = "grpc_options"


def grpc_plan(grpc_options: Mapping[str, Any] | None, http_options: Mapping[str, Any] | None,
              default_route: bool = True) -> GRPCPlan | None:
    """The build's :class:`GRPCPlan`, or None when ``grpc_options`` starts no gRPC server (no
    servicer function). CompileError naming the field when they cannot be served on Kubernetes."""
    from shoal.config import gRPCOptions

    if not grpc_options:
        return None
    try:
        parsed = gRPCOptions.model_validate(dict(grpc_options))
    except ValueError as e:
        raise CompileError(f"{FIELD}: {e}") from None
    if not parsed.enabled:
        return None
    if parsed.port == 0:
        raise CompileError(f"{FIELD}.port: 0 (any free port) has no meaning for the app's Service; give the port "
                           f"clients call (e.g. {names.RPC_PORT}, Ray's default)")
    if parsed.port == names.HTTP_PORT:
        raise CompileError(f"{FIELD}.port: {parsed.port} is the HTTP port of the app's Service; choose another")
    try:
        parsed.servicer_functions(f"{FIELD}.grpc_servicer_functions")
    except ValueError as e:
        raise CompileError(str(e)) from None
    options = parsed.model_dump(mode="json", exclude_unset=True)
    options["grpc_servicer_functions"] = list(parsed.grpc_servicer_functions)
    tls = bool((http_options or {}).get("ssl_certfile"))
    return GRPCPlan(options=options, port=parsed.port, tls=tls, default_route=default_route)


def serves_grpc(ctx: AppContext) -> bool:
    """Whether the app's ingress pods (and front) serve gRPC: gRPC configured and an HTTP route."""
    return ctx.grpc is not None and ctx.spec.route_prefix is not None


def pod_grpc(ctx: AppContext, container: Obj) -> Obj:
    """Make ``container`` (that of a pod serving the app's HTTP ingress) serve gRPC: its port,
    ``$SHOAL_GRPC_APP`` and, without TLS, the ``grpc:`` startupProbe. Returns it."""
    if not serves_grpc(ctx):
        return container
    assert ctx.grpc is not None
    container["ports"].append({"name": "grpc", "containerPort": names.GRPC_PORT, "protocol": "TCP"})
    container["env"].append({"name": names.ENV_GRPC_APP, "value": ctx.app})
    startup = container.get("startupProbe")
    if startup is not None and not ctx.grpc.tls:
        # The kubelet's own gRPC client (Kubernetes 1.27+), Check of the health service's "" (the server
        # as a whole): SERVING once the pod is ready, so the probe passes only with the gRPC port up.
        handler = {k: v for k, v in startup.items() if k not in ("httpGet", "tcpSocket", "exec", "grpc")}
        container["startupProbe"] = {"grpc": {"port": names.GRPC_PORT}, **handler}
    return container


def grpc_service_port(ctx: AppContext) -> list[Obj]:
    """The ``grpc`` port of the app's HTTP Service (none without gRPC)."""
    if not serves_grpc(ctx):
        return []
    assert ctx.grpc is not None
    return [{"name": "grpc", "port": ctx.grpc.port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]


def grpc_ports(ctx: AppContext) -> list[Obj]:
    """The gRPC port in a NetworkPolicy rule that admits the HTTP port (none without gRPC)."""
    return [{"protocol": "TCP", "port": names.GRPC_PORT}] if serves_grpc(ctx) else []


def grpc_route(ctx: AppContext, parent: Obj, backends: list[Obj]) -> Obj | None:
    """The app's ``GRPCRoute`` on the Gateway ``parent`` (None without gRPC, or warned when the
    Gateway API release has none); ``backends`` are the HTTPRoute's Services, on their gRPC port."""
    if not serves_grpc(ctx):
        return None
    assert ctx.grpc is not None
    opts = ctx.opts
    if gateway_api_release(opts.gateway_api_version) < GRPCROUTE_SINCE:
        ctx.warn(f"--gateway-api-version {opts.gateway_api_version}: GRPCRoute is in the standard channel from "
                 f"Gateway API v1.1 on, so application {ctx.app!r} gets no gRPC route; call its Service "
                 f"{names.ingress_service_name(ctx.instance)!r} on port {ctx.grpc.port}, or build for v1.1 or later")
        return None
    refs = [{"group": "", "kind": "Service", **{k: v for k, v in b.items() if k != "port"}, "port": ctx.grpc.port}
            for b in backends]
    rules: list[Obj] = [{
        "matches": [{"headers": [{"type": "Exact", "name": "application", "value": ctx.app}]}],
        "backendRefs": refs,
    }]
    if ctx.grpc.default_route:
        rules.append({"backendRefs": [dict(r) for r in refs]})  # calls that name no application
    meta = ctx.meta(names.dns_label(ctx.app, "grpc"), component="route")
    meta["labels"][L_INSTANCE] = label_value(ctx.app)  # the route belongs to the app, not to one canary
    meta["annotations"][A_APP] = ctx.app
    if ctx.canary and opts.canary_of is not None:
        meta["annotations"][A_CANARY_OF] = opts.canary_of
    spec: Obj = {"parentRefs": [dict(parent)]}
    if opts.hostnames:
        spec["hostnames"] = list(opts.hostnames)
    spec["rules"] = rules
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute", "metadata": meta, "spec": spec}
