"""How a compiled application autoscales: the shoal scaler and KEDA ScaledObjects (the default),
or autoscaling/v2 HPAs (``--autoscaler hpa``).

With KEDA, each application that has autoscaling deployments gets one scaler pod
(:mod:`shoal.kubernetes.scaler`: shoal's own autoscaler, fed by the pods' ``/metrics``) behind a
ClusterIP Service, and each autoscaling deployment a ScaledObject whose ``metrics-api`` trigger
reads the scaler's desired replica count: ``targetValue: "1"`` with ``metricType: AverageValue``
makes the HPA's desired count ``ceil(desired / 1)``, the scaler's answer itself, and
``activationTargetValue: "0"`` wakes a scaled-to-zero deployment as soon as the scaler wants one
replica. The scaler applies the delays, so the HPA behaviour is permissive. No Prometheus needed.
"""

from __future__ import annotations

import hashlib
import math
import re
import urllib.parse
from collections.abc import Iterable

from shoal.config import AutoscalingConfig
from shoal.deployment import DeploymentSpec
from shoal.exceptions import CompileError
from shoal.kubernetes import lws, names
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CONFIG_HASH,
    CACHE_DIR,
    CONTAINER_NAME,
    HPA_EXTERNAL_METRIC,
    L_NAME,
    MAX_STABILIZATION_S,
    RUN_AS_USER,
    STARTUP_PROBE_PERIOD_S,
    TMP_DIR,
    AppContext,
    CompileOptions,
    Obj,
    check_reserved,
    container_security_context,
    identity_env,
    label_value,
    process_env,
    promql_string,
    seconds,
)
from shoal.kubernetes.compiler.front import uses_front

__all__ = ["SCALER_LABEL", "add_scaler_env", "autoscaler", "behavior", "check_autoscaling_options", "keda_query",
           "scaler_bearer", "scaler_env", "scaler_network_policies", "scaler_objects", "scaler_url"]

# The scaler pod's app.kubernetes.io/name (no deployment may take it: their selectors use that label).
SCALER_LABEL = "shoal-scaler"
# KEDA: consecutive failures to read the scaler before fallback.replicas apply.
FALLBACK_FAILURES = 3
MAX_POLLING_S = 5
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# The scaler pod's resources (see _scaler_resources); its emptyDirs are /tmp 256Mi and cache 1Gi.
SCALER_CPU = "100m"
SCALER_CPU_LIMIT = "1"
SCALER_MEMORY = "1Gi"
SCALER_STORAGE = "1280Mi"


def check_autoscaling_options(opts: CompileOptions) -> None:
    """Raise :class:`CompileError` naming a bad ``--keda-namespace``, ``--wake-timeout`` or ``--ingress-at-zero``."""
    if not _DNS1123_LABEL.match(opts.keda_namespace) or len(opts.keda_namespace) > 63:
        raise CompileError(f"--keda-namespace {opts.keda_namespace!r} is not a valid namespace name")
    if not (isinstance(opts.wake_timeout_s, int | float) and 0 < opts.wake_timeout_s <= 3600):
        raise CompileError(f"--wake-timeout must be in (0, 3600] seconds, got {opts.wake_timeout_s!r}")
    if opts.ingress_at_zero not in ("front", "keep-one"):
        raise CompileError(f"--ingress-at-zero must be 'front' or 'keep-one', got {opts.ingress_at_zero!r}")


def uses_scaler(ctx: AppContext) -> bool:
    """Whether the application gets a scaler: KEDA, and some deployment autoscales."""
    return ctx.opts.autoscaler == "keda" and any(
        d.config.resolved_autoscaling() is not None for d in ctx.spec.deployments.values())


def scaler_bearer(ctx: AppContext) -> bool:
    """Whether the scaler requires a bearer token (``--scaler-auth bearer``, and there is a scaler)."""
    return uses_scaler(ctx) and ctx.opts.scaler_auth == "bearer"


def _token_env(ctx: AppContext, *, optional: bool) -> Obj:
    """``SHOAL_SCALER_TOKEN`` from the Secret KEDA's TriggerAuthentication reads too."""
    ref: Obj = {"name": names.scaler_token_secret_name(ctx.app), "key": names.SCALER_TOKEN_KEY}
    if optional:
        ref["optional"] = True
    return {"name": names.ENV_SCALER_TOKEN, "valueFrom": {"secretKeyRef": ref}}


def trigger_authentication(ctx: AppContext) -> Obj:
    """KEDA's TriggerAuthentication handing the scaler's token to the metrics-api trigger as its
    ``token`` parameter (``authMode: bearer``: ``Authorization: Bearer <token>``)."""
    meta = ctx.meta(names.scaler_name(ctx.instance), component="autoscaler")
    meta["labels"][L_NAME] = SCALER_LABEL
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication", "metadata": meta,
            "spec": {"secretTargetRef": [{"parameter": "token", "name": names.scaler_token_secret_name(ctx.app),
                                          "key": names.SCALER_TOKEN_KEY}]}}


def scaler_url(ctx: AppContext) -> str:
    """The scaler's base URL, through its Service's cluster DNS name."""
    o = ctx.opts
    return f"http://{names.scaler_name(ctx.instance)}.{o.namespace}.svc.{o.cluster_domain}:{names.SCALER_PORT}"


def scaler_selector(ctx: AppContext) -> dict[str, str]:
    """The scaler's pods: selected like a deployment's, under a name no deployment may take."""
    return ctx.selector(SCALER_LABEL)


# --- per deployment ------------------------------------------------------------------------------


def behavior(auto: AutoscalingConfig) -> Obj:
    """HPA stabilization from the upscale/downscale delays (``--autoscaler hpa``: no scaler there)."""
    return {
        "scaleUp": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.upscale_delay_s))},
        "scaleDown": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.downscale_delay_s))},
    }


def permissive_behavior(auto: AutoscalingConfig) -> Obj:
    """HPA behaviour that follows the scaler's answer at once: the scaler already waited out
    the delays, and the HPA's defaults (a 300 s scale-down window, +100 %/+4 pods per 15 s)
    would add their own."""
    return {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": max(1, auto.max_replicas), "periodSeconds": 1},
                                 {"type": "Percent", "value": 1000, "periodSeconds": 1}]},
        "scaleDown": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]},
    }


def keda_query(ctx_namespace: str, app: str, deployment: str, namespace_label: str = "namespace") -> str:
    """PromQL of a deployment's load: requests in its replicas plus requests callers hold for it
    (what a metrics adapter must serve as ``HPA_EXTERNAL_METRIC`` for ``--autoscaler hpa``)."""
    matchers = []
    if namespace_label:
        matchers.append(f"{namespace_label}={promql_string(ctx_namespace)}")
    matchers += [f"app={promql_string(app)}", f"deployment={promql_string(deployment)}"]
    sel = "{" + ",".join(matchers) + "}"
    # `or vector(0)`: a sum over no series is empty, and empty + x is empty.
    return f"(sum({names.METRIC_ONGOING}{sel}) or vector(0)) + (sum({names.METRIC_CALLER_QUEUED}{sel}) or vector(0))"


def autoscaler(ctx: AppContext, dep: DeploymentSpec) -> list[Obj]:
    """The ScaledObject (KEDA) or HPA of one deployment; nothing when it does not autoscale."""
    auto = dep.config.resolved_autoscaling()
    if auto is None:
        return []
    if auto.policy and ctx.opts.autoscaler == "hpa":
        ctx.warnings.append(
            f"deployment {dep.name!r}: the custom autoscaling policy {auto.policy!r} does not run with "
            "--autoscaler hpa (the HPA scales on target_ongoing_requests); the default --autoscaler keda runs "
            "it in the application's scaler pod"
        )
    min_replicas = auto.min_replicas
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.workload(dep.name)}
    if dep.config.world_size > 1:  # LeaderWorkerSets have the scale subresource: one replica is one group
        target = {"apiVersion": names.LWS_API_VERSION, "kind": lws.LWS_KIND,
                  "name": names.gang_name(ctx.instance, dep.name)}
    if ctx.opts.autoscaler == "hpa":
        return [_hpa(ctx, dep, auto, target)]
    if min_replicas == 0 and dep.ingress and ctx.spec.route_prefix is not None and not uses_front(ctx):
        ctx.warnings.append(
            f"deployment {dep.name!r} is the HTTP ingress of {ctx.app!r}: min_replicas 0 raised to 1 "
            "(--ingress-at-zero keep-one); the default --ingress-at-zero front keeps it at zero behind a holding "
            "front that holds HTTP requests while it has no pod"
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
    """A KEDA ScaledObject reading the scaler's desired replica count (metrics-api trigger)."""
    comp = "ingress" if dep.ingress else "deployment"
    polling = min(MAX_POLLING_S, seconds(auto.metrics_interval_s))
    trigger: Obj = {
        "type": "metrics-api",
        # AverageValue with target 1: the HPA's desired = ceil(desired / 1), the scaler's answer.
        "metricType": "AverageValue",
        "metadata": {
            "url": f"{scaler_url(ctx)}/scale/{urllib.parse.quote(dep.name, safe='')}",
            "valueLocation": "desired",
            "targetValue": "1",
            "activationTargetValue": "0",
        },
    }
    if scaler_bearer(ctx):
        # `authMode` (every KEDA 2.x metrics-api scaler reads it; `authModes` only from 2.18) and the
        # TriggerAuthentication's `token` parameter.
        trigger["metadata"]["authMode"] = "bearer"
        trigger["authenticationRef"] = {"name": names.scaler_name(ctx.instance)}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": ctx.meta(ctx.workload(dep.name), component=comp, dep=dep.name),
        "spec": {
            "scaleTargetRef": target,
            # How often KEDA reads the scaler; also how soon a scaled-to-zero deployment wakes.
            "pollingInterval": polling,
            # Governs only the last step to zero, which the scaler already delayed: one poll.
            "cooldownPeriod": polling,
            "minReplicaCount": min_replicas,
            "maxReplicaCount": auto.max_replicas,
            # The scaler unreachable FALLBACK_FAILURES polls in a row: keep serving.
            "fallback": {"failureThreshold": FALLBACK_FAILURES, "replicas": max(min_replicas, 1)},
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": permissive_behavior(auto)}},
            "triggers": [trigger],
        },
    }


# --- per application: the scaler -----------------------------------------------------------------


def scaler_objects(ctx: AppContext, config_text: str) -> list[Obj]:
    """The scaler's Deployment and Service (none when the app does not autoscale or with HPAs);
    ``config_text``: the serve config it reads (a change restarts it)."""
    if not uses_scaler(ctx):
        return []
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    check_reserved(ctx, SCALER_LABEL, names.scaler_name(ctx.instance), "the application's scaler")
    name = names.scaler_name(ctx.instance)
    meta = ctx.meta(name, component="autoscaler")
    meta["labels"][L_NAME] = SCALER_LABEL
    service_meta = ctx.meta(name, component="autoscaler")
    service_meta["labels"][L_NAME] = SCALER_LABEL
    auth = [trigger_authentication(ctx)] if scaler_bearer(ctx) else []
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": scaler_selector(ctx)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": _scaler_pod(ctx, config_hash),
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": service_meta, "spec": {
            "type": "ClusterIP",
            "selector": scaler_selector(ctx),
            "ports": [{"name": "http", "port": names.SCALER_PORT, "targetPort": "http", "protocol": "TCP"}],
        }},
        *auth,
    ]


def _scaler_env(ctx: AppContext) -> list[Obj]:
    env: list[Obj] = [*identity_env(ctx), *process_env(ctx)]
    if scaler_bearer(ctx):
        env.append(_token_env(ctx, optional=False))  # fails closed: no token, no scaler
    # The app is imported here too (custom policies, module-level settings): its environment, then --env.
    extra = dict((ctx.entry.get("runtime_env") or {}).get("env_vars") or {})
    extra.update(ctx.opts.env)
    for key, value in extra.items():
        if not key.startswith("SHOAL_"):
            env = [e for e in env if e["name"] != key] + [{"name": key, "value": str(value)}]
    return env


def _scaler_pod(ctx: AppContext, config_hash: str) -> Obj:
    opts = ctx.opts
    from shoal.kubernetes.compiler.workloads import sa_name

    labels = ctx.labels(component="autoscaler")
    labels[L_NAME] = SCALER_LABEL
    probe = {"httpGet": {"path": "/-/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2,
             "failureThreshold": 3}
    container: Obj = {
        "name": "scaler",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["shoal", "k8s", "scaler"],
        "args": ["--port", str(names.SCALER_PORT), *(["--auth", "bearer"] if scaler_bearer(ctx) else []),
                 *(["--ingress-at-zero", "front"] if uses_front(ctx) else [])],
        "env": _scaler_env(ctx),
        "ports": [{"name": "http", "containerPort": names.SCALER_PORT, "protocol": "TCP"}],
        # Importing the application may take a while (the scaler builds it, never runs it).
        "startupProbe": {**probe, "periodSeconds": STARTUP_PROBE_PERIOD_S,
                         "failureThreshold": math.ceil(opts.startup_timeout_s / STARTUP_PROBE_PERIOD_S)},
        "readinessProbe": {**probe, "httpGet": {"path": "/-/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": probe,
        "resources": _scaler_resources(opts),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
        ],
    }
    spec: Obj = {
        "serviceAccountName": sa_name(ctx),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 10,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map_name(ctx.instance)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
            {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if opts.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in opts.image_pull_secrets]
    return {"metadata": {"labels": labels, "annotations": {A_APP: ctx.instance, A_CONFIG_HASH: config_hash,
                                                          "kubectl.kubernetes.io/default-container": "scaler"}},
            "spec": spec}


def scaler_env(ctx: AppContext) -> list[Obj]:
    """What a caller of the app's deployments is told: the wake deadline and, with a scaler, where
    it is (and its token with ``--scaler-auth bearer``)."""
    env: list[Obj] = [{"name": names.ENV_WAKE_TIMEOUT, "value": f"{ctx.opts.wake_timeout_s:g}"}]
    if uses_scaler(ctx):
        env.append({"name": names.ENV_SCALER_URL, "value": scaler_url(ctx)})
    if scaler_bearer(ctx):
        # Optional here: without the Secret the app still serves (its demand posts are refused, the
        # scaler still sees held requests in /metrics); the scaler itself does not start.
        env.append(_token_env(ctx, optional=True))
    return env


def add_scaler_env(ctx: AppContext, workload: Obj) -> Obj:
    """Add :func:`scaler_env` to a workload's replica containers."""
    env = scaler_env(ctx)
    for container in _replica_containers(workload):
        container.setdefault("env", []).extend(env)
    return workload


def _replica_containers(obj: object) -> Iterable[Obj]:
    if isinstance(obj, dict):
        containers = obj.get("containers")
        for c in containers if isinstance(containers, list) else ():
            if isinstance(c, dict) and c.get("name") == CONTAINER_NAME:
                yield c
        for key, value in obj.items():
            if key != "containers":
                yield from _replica_containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _replica_containers(value)


def scaler_network_policies(ctx: AppContext) -> list[Obj]:
    """The scaler's paths: KEDA (its namespace) and the app's pods (demand) to the scaler's port,
    the scaler to every pod's admin port (/metrics). DNS egress is the app's allow-dns policy,
    which selects the scaler pod too."""
    if not uses_scaler(ctx):
        return []
    port = [{"protocol": "TCP", "port": names.SCALER_PORT}]
    admin = [{"protocol": "TCP", "port": names.ADMIN_PORT}]
    app_pods = {"podSelector": {"matchLabels": ctx.app_selector()}}
    scaler_pods = {"podSelector": {"matchLabels": scaler_selector(ctx)}}
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ctx.opts.keda_namespace}}}
    return [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": ctx.meta(names.scaler_name(ctx.instance), component="network-policy"),
         "spec": {"podSelector": {"matchLabels": scaler_selector(ctx)}, "policyTypes": ["Ingress", "Egress"],
                  "ingress": [{"from": [keda], "ports": port}, {"from": [app_pods], "ports": port}],
                  "egress": [{"to": [app_pods], "ports": admin}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": ctx.meta(names.dns_label(ctx.instance, "allow-scaler"), component="network-policy"),
         "spec": {"podSelector": {"matchLabels": ctx.app_selector()}, "policyTypes": ["Ingress", "Egress"],
                  "ingress": [{"from": [scaler_pods], "ports": admin}],
                  "egress": [{"to": [scaler_pods], "ports": port}]}},
    ]


def _scaler_resources(opts: CompileOptions) -> Obj:
    """Requests and limits a quota'd namespace admits: the scaler imports the application (which
    may import an ML library) but never runs it; its scratch space is its two emptyDirs."""
    limits: Obj = {"memory": SCALER_MEMORY, "ephemeral-storage": SCALER_STORAGE}
    if opts.cpu_limits:
        limits["cpu"] = SCALER_CPU_LIMIT
    return {"requests": {"cpu": SCALER_CPU, "memory": SCALER_MEMORY, "ephemeral-storage": SCALER_STORAGE},
            "limits": limits}
