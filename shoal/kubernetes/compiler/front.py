"""The holding front of an application whose HTTP ingress scales to zero (``--ingress-at-zero front``).

When the ingress deployment autoscales with ``min_replicas: 0`` under KEDA, nothing would be
listening on the app's HTTP Service while it has no pod, and the Gateway would answer 503 at
once (or time out). So the app gets one more, small pod running ``shoal front``
(:mod:`shoal.kubernetes.pod.front`): the HTTP Service ``<app>-http`` (the HTTPRoute's or
Ingress's backend) selects it instead of the ingress pods, and it forwards every request over
the internal RPC to the ingress pods, holding it while there are none: it posts demand to the
app's scaler (which KEDA reads) and answers 503 with ``Retry-After`` after the wake deadline,
exactly as a pod calling a scaled-to-zero deployment does.

Objects: the Deployment ``<app>-shoal-front`` (one replica), a headless Service of the same
name on the admin port (the scaler scrapes the requests it holds), and a NetworkPolicy: HTTP
from where the route's traffic comes, the admin port from the monitoring namespaces, egress to
the ingress pods' RPC port. The ingress deployment's own policy then admits the front on RPC
and no longer admits HTTP from outside the app; the scaler's policies already cover demand
posts and scrapes (every pod of the app).
"""

from __future__ import annotations

import hashlib
import json
import math

import yaml

from shoal.kubernetes import names
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CONFIG_HASH,
    CACHE_DIR,
    L_NAME,
    L_VERSION,
    RUN_AS_USER,
    STARTUP_PROBE_PERIOD_S,
    TERMINATION_MARGIN_S,
    TMP_DIR,
    AppContext,
    Obj,
    check_reserved,
    container_security_context,
    identity_env,
    ns_peer,
    process_env,
)
from shoal.kubernetes.compiler.credentials import credential_env, credential_mounts, credential_volumes
from shoal.kubernetes.compiler.grpc_ingress import grpc_ports, pod_grpc

__all__ = ["FRONT_LABEL", "front_network_policy", "front_objects", "front_selector", "uses_front"]

# The front's pods' app.kubernetes.io/name (no deployment may take it: their selectors use that label).
FRONT_LABEL = "shoal-front"
CONTAINER = "front"
# Its resources: it runs shoal's HTTP front and routers, never the application's code (about 50 MB),
# plus the request bodies it holds, which http_options.request_body_budget_bytes bounds (512 MiB by default).
FRONT_CPU = "100m"
FRONT_CPU_LIMIT = "1"
FRONT_MEMORY = "1Gi"
FRONT_TMP = "64Mi"
FRONT_CACHE = "64Mi"
FRONT_STORAGE = "256Mi"  # the two emptyDirs and the container's logs
# A stopping front lets its requests finish for at least this long (and at least the wake deadline,
# so that requests it holds get their answer).
MIN_DRAIN_S = 30
STARTUP_S = 120


def uses_front(ctx: AppContext) -> bool:
    """Whether the application gets a holding front: KEDA, ``--ingress-at-zero front``, an HTTP
    route, and an ingress deployment that autoscales from ``min_replicas: 0``."""
    spec, opts = ctx.spec, ctx.opts
    if opts.autoscaler != "keda" or opts.ingress_at_zero != "front" or spec.route_prefix is None:
        return False
    auto = spec.deployments[spec.ingress].config.resolved_autoscaling()
    return auto is not None and auto.min_replicas == 0


def front_selector(ctx: AppContext) -> dict[str, str]:
    """The front's pods: selected like a deployment's, under a name no deployment may take."""
    return ctx.selector(FRONT_LABEL)


def drain_seconds(ctx: AppContext) -> int:
    return max(MIN_DRAIN_S, math.ceil(ctx.opts.wake_timeout_s))


def _config_hash(ctx: AppContext, config_text: str) -> str:
    """What the front's pods read: the image, ``http_options`` and the app's name and route."""
    doc = yaml.safe_load(config_text)
    app_entry = doc["applications"][0]
    slice_ = {"image": ctx.opts.image, "http_options": doc.get("http_options"),
              "app": {k: app_entry.get(k) for k in ("name", "route_prefix")}}
    if doc.get("grpc_options"):
        slice_["grpc_options"] = doc["grpc_options"]
    return hashlib.sha256(json.dumps(slice_, sort_keys=True, default=str).encode()).hexdigest()[:16]


def front_objects(ctx: AppContext, config_text: str, caller_env: list[Obj]) -> list[Obj]:
    """The front's Deployment and headless Service (none when the app does not need one);
    ``config_text``: the serve config it reads; ``caller_env``: what a caller of the app's deployments
    is told (the wake deadline, the scaler and its token: compiler.autoscaling.scaler_env)."""
    if not uses_front(ctx):
        return []
    check_reserved(ctx, FRONT_LABEL, names.front_name(ctx.instance), "the application's holding front")
    name = names.front_name(ctx.instance)
    config_hash = _config_hash(ctx, config_text)
    version = config_hash[:10] if ctx.opts.version is None else ctx.version
    meta = _meta(ctx, name, version)
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": front_selector(ctx)},
            # The new front is ready before the old one drains: no moment without one.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": _pod(ctx, config_hash, version, caller_env),
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(ctx, name, version), "spec": {
            # Headless: the scaler resolves the front's pods and reads their /metrics (requests held).
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": front_selector(ctx),
            "ports": [{"name": "admin", "port": names.ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"}],
        }},
    ]


def _meta(ctx: AppContext, name: str, version: str) -> Obj:
    meta = ctx.meta(name, component="front")
    meta["labels"][L_NAME] = FRONT_LABEL
    meta["labels"][L_VERSION] = version
    return meta


def _env(ctx: AppContext, caller_env: list[Obj]) -> list[Obj]:
    env: list[Obj] = [*identity_env(ctx), *credential_env(ctx, http=True), *process_env(ctx), *caller_env]
    # An http_options.auth hook is imported here: the app's environment, then --env.
    extra = dict((ctx.entry.get("runtime_env") or {}).get("env_vars") or {})
    extra.update(ctx.opts.env)
    for key, value in extra.items():
        if not key.startswith("SHOAL_"):
            env = [e for e in env if e["name"] != key] + [{"name": key, "value": str(value)}]
    return env


def _args(ctx: AppContext) -> list[str]:
    """The ingress deployment's name and the limits the front's router enforces."""
    cfg = ctx.spec.deployments[ctx.spec.ingress].config
    return [f"--ingress={ctx.spec.ingress}", "--max-ongoing-requests", str(cfg.max_ongoing_requests),
            "--max-queued-requests", str(cfg.max_queued_requests),
            "--max-queue-wait", f"{cfg.resolved_max_queue_wait_s():g}", "--drain-timeout", str(drain_seconds(ctx))]


def _pod(ctx: AppContext, config_hash: str, version: str, caller_env: list[Obj]) -> Obj:
    from shoal.kubernetes.compiler.workloads import sa_name

    opts = ctx.opts
    labels = ctx.labels(component="front")
    labels[L_NAME] = FRONT_LABEL
    labels[L_VERSION] = version
    health = {"httpGet": {"path": "/-/healthz", "port": "admin"}, "timeoutSeconds": 2}
    limits: Obj = {"memory": FRONT_MEMORY, "ephemeral-storage": FRONT_STORAGE}
    if opts.cpu_limits:
        limits["cpu"] = FRONT_CPU_LIMIT
    container: Obj = {
        "name": CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["shoal", "front"],
        "args": _args(ctx),
        "env": _env(ctx, caller_env),
        "ports": [{"name": "http", "containerPort": names.HTTP_PORT, "protocol": "TCP"},
                  {"name": "admin", "containerPort": names.ADMIN_PORT, "protocol": "TCP"}],
        # It imports shoal (and an http_options.auth hook), never a model: two minutes is plenty.
        "startupProbe": {**health, "periodSeconds": STARTUP_PROBE_PERIOD_S,
                         "failureThreshold": math.ceil(STARTUP_S / STARTUP_PROBE_PERIOD_S)},
        "readinessProbe": {**health, "httpGet": {"path": "/-/ready", "port": "admin"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": FRONT_CPU, "memory": FRONT_MEMORY, "ephemeral-storage": FRONT_STORAGE},
                      "limits": limits},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            *credential_mounts(ctx, http=True),
        ],
    }
    pod_grpc(ctx, container)
    if opts.prestop_sleep_s:
        # Let the Service's endpoints drop the pod before SIGTERM stops its accepting.
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(opts.prestop_sleep_s)]}}}
    spec: Obj = {
        "serviceAccountName": sa_name(ctx),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": opts.prestop_sleep_s + drain_seconds(ctx) + TERMINATION_MARGIN_S,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map_name(ctx.instance)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": FRONT_TMP}},
            {"name": "cache", "emptyDir": {"sizeLimit": FRONT_CACHE}},
            *credential_volumes(ctx, http=True),
        ],
    }
    if opts.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in opts.image_pull_secrets]
    annotations = {
        A_APP: ctx.instance,
        A_CONFIG_HASH: config_hash,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(names.ADMIN_PORT),
        "prometheus.io/path": "/metrics",
        "kubectl.kubernetes.io/default-container": CONTAINER,
    }
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def front_network_policy(ctx: AppContext, http_from: list[Obj]) -> Obj:
    """The front's paths: HTTP (and gRPC) from ``http_from`` (where the route's traffic comes), the admin port
    from the monitoring namespaces, and out to the ingress pods' RPC port. (Demand posts to the
    scaler, its scrapes and DNS are the app-wide policies, which select the front's pods too.)"""
    ingress = ctx.spec.deployments[ctx.spec.ingress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(names.front_name(ctx.instance), component="network-policy"),
        "spec": {
            "podSelector": {"matchLabels": front_selector(ctx)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": http_from, "ports": [{"protocol": "TCP", "port": names.HTTP_PORT}, *grpc_ports(ctx)]},
                {"from": ns_peer(ctx.opts.metrics_from_namespaces),
                 "ports": [{"protocol": "TCP", "port": names.ADMIN_PORT}]},
            ],
            "egress": [{"to": [{"podSelector": {"matchLabels": ctx.serving_selector(ingress)}}],
                        "ports": [{"protocol": "TCP", "port": names.RPC_PORT}]}],
        },
    }
