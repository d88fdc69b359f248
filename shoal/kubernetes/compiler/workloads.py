"""The workloads of a compiled application: its identity and config, each deployment's pod
template, Deployment (or LeaderWorkerSet), headless Service and PodDisruptionBudget."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from shoal.config import DeploymentConfig, RayActorOptions
from shoal.deployment import DeploymentSpec
from shoal.exceptions import CompileError
from shoal.kubernetes import lws, names
from shoal.kubernetes.compiler import scheduling
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_CONFIG_HASH,
    A_DEPLOYMENT,
    CACHE_DIR,
    CONTAINER_NAME,
    ENV_NAME_PATTERN,
    RUN_AS_USER,
    SHM_DIR,
    STARTUP_PROBE_PERIOD_S,
    TERMINATION_MARGIN_S,
    TMP_DIR,
    AppContext,
    CompileOptions,
    Obj,
    container_security_context,
    cpu_quantity,
    identity_env,
    memory_quantity,
    process_env,
    seconds,
)
from shoal.kubernetes.compiler.credentials import credential_env, credential_mounts, credential_volumes, serves_http
from shoal.kubernetes.compiler.grpc_ingress import pod_grpc
from shoal.kubernetes.compiler.volumes import model_mounts, model_volumes

# CPU request of a deployment that reserves no CPU (num_cpus=0): a quota'd namespace admits no
# pod without one; and its limit (with cpu_limits), so that "no reservation" is not a tiny cap.
ZERO_CPU_REQUEST = "100m"
ZERO_CPU_LIMIT = "1"

# --- identity, config ----------------------------------------------------------------


def sa_name(ctx: AppContext) -> str:
    # Never plain "<app>": an app named "default" would take over the namespace's default account.
    return names.dns_label(ctx.instance, "replica")


def service_account(ctx: AppContext) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": ctx.meta(sa_name(ctx), component="identity"),
        # Replicas never talk to the Kubernetes API: no token in the pods.
        "automountServiceAccountToken": False,
    }


def config_map(ctx: AppContext, text: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.meta(names.config_map_name(ctx.instance), component="config"),
        "data": {names.CONFIG_FILE_NAME: text},
    }


def deployment_hashes(ctx: AppContext, config_text: str) -> dict[str, str]:
    """Per deployment, a hash of what its pods read from the serve config (``config_text``, the
    ConfigMap's file) plus the image: the app-level entry (import path, args, runtime_env, ...),
    its own deployment entry without ``num_replicas`` and ``autoscaling_config`` (the autoscaler's,
    never read by a pod), the limits of the deployments it calls (its routers enforce them), and
    ``http_options`` for the ingress only. A change anywhere else leaves its pod template as it was."""
    doc = yaml.safe_load(config_text)
    app_entry: Mapping[str, Any] = doc["applications"][0]
    app_level = {k: v for k, v in app_entry.items() if k != "deployments"}
    entries = {d.get("name"): d for d in app_entry.get("deployments") or []}
    out: dict[str, str] = {}
    for name, dep in ctx.spec.deployments.items():
        own = {k: v for k, v in (entries.get(name) or {}).items() if k not in ("num_replicas", "autoscaling_config")}
        callees = {}
        for callee in sorted(set(dep.calls)):
            cfg = ctx.spec.deployments[callee].config
            callees[callee] = {
                "max_ongoing_requests": cfg.max_ongoing_requests,
                "max_queued_requests": cfg.max_queued_requests,
                "max_queue_wait_s": cfg.resolved_max_queue_wait_s(),
                "request_router_config": (entries.get(callee) or {}).get("request_router_config"),
            }
        slice_ = {"image": ctx.opts.image, "app": app_level, "deployment": own, "callees": callees,
                  "http_options": doc.get("http_options") if dep.ingress else None}
        if dep.ingress and doc.get("grpc_options"):
            slice_["grpc_options"] = doc["grpc_options"]
        out[name] = hashlib.sha256(json.dumps(slice_, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


# --- workloads ---------------------------------------------------------------------------------


def container_resources(ctx: AppContext, dep: DeploymentSpec, rao: RayActorOptions | None = None) -> tuple[Obj, bool]:
    """Container resources from ray_actor_options (or one gang rank's), and whether the pod needs a GPU node."""
    rao = rao if rao is not None else dep.config.ray_actor_options
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpus = rao.effective_num_cpus
    requests["cpu"] = cpu_quantity(cpus) if cpus > 0 else ZERO_CPU_REQUEST
    if ctx.opts.cpu_limits:
        limits["cpu"] = cpu_quantity(cpus) if cpus > 0 else ZERO_CPU_LIMIT
    # Memory is not compressible: request = limit, from `memory` or the documented default.
    requests["memory"] = limits["memory"] = memory_quantity(rao.memory) if rao.memory else ctx.opts.default_memory
    requests["ephemeral-storage"] = limits["ephemeral-storage"] = scheduling.ephemeral_storage(ctx.opts, dep.name)
    gpu = False
    if rao.num_gpus:
        gpu = True
        if float(rao.num_gpus).is_integer():
            limits["nvidia.com/gpu"] = str(int(rao.num_gpus))
        else:
            if not ctx.opts.gpu_resource:
                raise CompileError(
                    f"deployment {dep.name!r} of application {ctx.app!r} asks for num_gpus={rao.num_gpus:g}, a "
                    "fraction of a GPU; Kubernetes shares GPUs through MIG or time-slicing, so name the resource "
                    "to request with --gpu-resource (e.g. nvidia.com/mig-1g.10gb or nvidia.com/gpu.shared)"
                )
            limits[ctx.opts.gpu_resource] = "1"
    if rao.resources:
        ctx.warn(
            f"deployment {dep.name!r}: custom resources {sorted(rao.resources)} have no Kubernetes equivalent "
            "and are ignored"
        )
    if rao.accelerator_type and ctx.opts.accelerator_label is None:
        ctx.warn(
            f"deployment {dep.name!r}: accelerator_type {rao.accelerator_type!r} is ignored: name the node label "
            "that holds it with --accelerator-label KEY (or pin nodes with --node-selector)"
        )
    if gpu and not rao.memory:
        ctx.warn(f"deployment {dep.name!r} asks for GPUs but sets no memory: its pods get --default-memory "
                 f"{ctx.opts.default_memory} (request and limit); loading a model usually needs more "
                 "(ray_actor_options memory)")
    return {"requests": requests, "limits": limits}, gpu


def container_env(ctx: AppContext, dep: DeploymentSpec, extra: Sequence[Obj] = (), *, http: bool = False) -> list[Obj]:
    env: list[Obj] = [
        {"name": names.ENV_DEPLOYMENT, "value": dep.name},
        *identity_env(ctx),
        *credential_env(ctx, http=http),
        *process_env(ctx),
        *extra,
    ]
    # runtime_env env_vars (the app's, then the deployment's), then --env: later ones win.
    app_env = ctx.entry.get("runtime_env") or {}
    layers = [
        ("runtime_env.env_vars", app_env.get("env_vars") or {}),
        (f"deployment {dep.name!r} runtime_env.env_vars",
         dep.config.ray_actor_options.runtime_env.get("env_vars") or {}),
        ("--env", ctx.opts.env),
    ]
    for where, values in layers:
        for key, value in values.items():
            if key.startswith("SHOAL_") or not ENV_NAME_PATTERN.match(key):
                raise CompileError(f"{where}: {key!r} cannot be set (SHOAL_* belong to shoal; names must be valid)")
            env = [e for e in env if e["name"] != key]
            env.append({"name": key, "value": str(value)})
    return env


def probes(dep: DeploymentSpec, opts: CompileOptions) -> Obj:
    cfg = dep.config
    return {
        # Model loading: the constructor may take minutes; liveness waits for this to pass.
        "startupProbe": {
            "httpGet": {"path": "/-/healthz", "port": "admin"},
            "periodSeconds": STARTUP_PROBE_PERIOD_S,
            "timeoutSeconds": 2,
            "failureThreshold": math.ceil(opts.startup_timeout_s / STARTUP_PROBE_PERIOD_S),
        },
        # Constructor done and check_health passing.
        "readinessProbe": {
            "httpGet": {"path": "/-/ready", "port": "admin"},
            "periodSeconds": seconds(cfg.health_check_period_s),
            "timeoutSeconds": seconds(cfg.health_check_timeout_s),
            "failureThreshold": 3,
        },
        # The process answers, its loop turns, and check_health has not failed 3 times in a row
        # (Ray then replaces the replica: shoal.kubernetes.pod.replica.HealthTracker).
        "livenessProbe": {
            "httpGet": {"path": "/-/healthz", "port": "admin"},
            "periodSeconds": seconds(cfg.health_check_period_s),
            "timeoutSeconds": seconds(cfg.health_check_timeout_s),
            "failureThreshold": 3,
        },
    }


def pod_template(ctx: AppContext, dep: DeploymentSpec, config_hash: str, *, rank: int | None = None) -> Obj:
    """The pod template of a deployment's replicas; for a gang, of its leader (``rank=0``) or of
    its workers (``rank=1``: every rank from 1 to N-1). ``config_hash`` is the deployment's own
    (:func:`deployment_hashes`): the template changes, and the pods roll, only when it does."""
    component = "ingress" if dep.ingress else "deployment"
    gang = names.gang_name(ctx.instance, dep.name) if rank is not None else ""
    resources, gpu = container_resources(ctx, dep, None if rank is None else rank_options(ctx, dep, rank))
    container = _container(ctx, dep, rank, gang, resources)
    pod_annotations = {
        A_APP: ctx.instance,
        A_DEPLOYMENT: dep.name,
        A_CONFIG_HASH: config_hash,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(names.ADMIN_PORT),
        "prometheus.io/path": "/metrics",
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    return {
        "metadata": {"labels": ctx.labels(dep=dep.name, component=component), "annotations": pod_annotations},
        "spec": _pod_spec(ctx, dep, gang, container, gpu, http=serves_http(ctx, dep.ingress, rank)),
    }


def _container(ctx: AppContext, dep: DeploymentSpec, rank: int | None, gang: str, resources: Obj) -> Obj:
    """The replica container of a pod template (see :func:`pod_template`)."""
    opts = ctx.opts
    ports: list[Obj] = [
        {"name": "rpc", "containerPort": names.RPC_PORT, "protocol": "TCP"},
        {"name": "admin", "containerPort": names.ADMIN_PORT, "protocol": "TCP"},
    ]
    http = serves_http(ctx, dep.ingress, rank)
    if http:
        ports.append({"name": "http", "containerPort": names.HTTP_PORT, "protocol": "TCP"})
    if rank == 0:
        ports.append({"name": "rendezvous", "containerPort": names.RENDEZVOUS_PORT, "protocol": "TCP"})
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["shoal", "replica"],
        "args": ["--deployment", dep.name] + (["--rank-from-env"] if gang else []),
        "env": container_env(ctx, dep, lws.gang_env(gang) if gang else (), http=http),
        "ports": ports,
        **probes(dep, opts),
        # Let endpoints and callers' DNS catch up before SIGTERM; the replica then drains its
        # in-flight requests for up to graceful_shutdown_timeout_s.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(opts.prestop_sleep_s)]}}}
        if opts.prestop_sleep_s else {},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": SHM_DIR},
            *credential_mounts(ctx, http=http),
            *model_mounts(opts, dep.name),
        ],
    }
    if not container["lifecycle"]:
        del container["lifecycle"]
    if http:
        pod_grpc(ctx, container)
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(ctx: AppContext, dep: DeploymentSpec, gang: str, container: Obj, gpu: bool, *, http: bool) -> Obj:
    """The pod spec around the replica container: identity, security, spreading, volumes."""
    opts = ctx.opts
    cfg: DeploymentConfig = dep.config
    selector = ctx.selector(dep.name)
    revision = names.LWS_LABEL_REVISION if gang else "pod-template-hash"
    # Replicas across nodes; a gang's pods carry LWS's revision label instead of pod-template-hash.
    spread: list[Obj] = [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": dict(selector)},
        "matchLabelKeys": [revision],
    }]
    if (when := scheduling.zone_spread(opts, dep.name)) is not None:
        # Across zones: for a gang its leaders (one per group), so a group is not split for it.
        spread.append({"maxSkew": 1, "topologyKey": scheduling.ZONE_KEY, "whenUnsatisfiable": when,
                       "labelSelector": {"matchLabels": ctx.serving_selector(dep)}, "matchLabelKeys": [revision]})
    affinity: Obj | None = None
    if gang:
        affinity, within_group = lws.placement_affinity(cfg.placement_group_strategy, selector)
        spread.extend(within_group)
    pod_spec: Obj = {
        "serviceAccountName": sa_name(ctx),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": opts.prestop_sleep_s + seconds(cfg.graceful_shutdown_timeout_s, 0)
        + TERMINATION_MARGIN_S,
        "topologySpreadConstraints": spread,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map_name(ctx.instance)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": opts.tmp_size}},
            {"name": "cache", "emptyDir": {"sizeLimit": scheduling.cache_size(opts, dep.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
            *credential_volumes(ctx, http=http),
            *model_volumes(opts, dep.name),
        ],
    }
    if affinity is not None:
        pod_spec["affinity"] = affinity
    _scheduling(ctx, dep, pod_spec, gpu)
    if opts.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in opts.image_pull_secrets]
    return pod_spec


def _scheduling(ctx: AppContext, dep: DeploymentSpec, pod_spec: Obj, gpu: bool) -> None:
    """Node selector (with Ray's accelerator_type), tolerations, runtime and priority class."""
    opts = ctx.opts
    selector = scheduling.accelerator_selector(opts, dep.name, dep.config.ray_actor_options.accelerator_type)
    selector.update(scheduling.node_selector(opts, dep.name))
    if selector:
        pod_spec["nodeSelector"] = selector
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpu else []
    tolerations.extend(t for t in scheduling.tolerations(opts, dep.name) if t not in tolerations)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if (runtime := scheduling.pod_class(opts, dep.name, "runtime")) is not None:
        pod_spec["runtimeClassName"] = runtime
    if (priority := scheduling.pod_class(opts, dep.name, "priority")) is not None:
        pod_spec["priorityClassName"] = priority


def needs_gpu(dep: DeploymentSpec) -> bool:
    """Whether any pod of the deployment asks for a GPU (any rank of a gang)."""
    cfg = dep.config
    if cfg.world_size > 1:
        return any(float(cfg.rank_resources(r).get("num_gpus") or 0) > 0 for r in range(cfg.world_size))
    return bool(cfg.ray_actor_options.num_gpus)


def replica_count(cfg: DeploymentConfig) -> int | None:
    """The replica count to write, or None when an autoscaler owns it (re-applying then never
    fights the autoscaler; the workload starts with 1)."""
    if cfg.resolved_autoscaling() is None:
        return cfg.num_replicas if isinstance(cfg.num_replicas, int) else 1
    return None


def workload(ctx: AppContext, dep: DeploymentSpec, config_hash: str) -> Obj:
    """A Deployment, or for a gang deployment a LeaderWorkerSet."""
    if dep.config.world_size > 1:
        return leader_worker_set(ctx, dep, config_hash)
    return deployment_object(ctx, dep, config_hash)


def deployment_object(ctx: AppContext, dep: DeploymentSpec, config_hash: str) -> Obj:
    opts = ctx.opts
    component = "ingress" if dep.ingress else "deployment"
    spec: Obj = {}
    replicas = replica_count(dep.config)
    if replicas is not None:
        spec["replicas"] = replicas
    spec.update({
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": max(900, opts.startup_timeout_s + 300),
        "selector": {"matchLabels": ctx.selector(dep.name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": dict(zip(
            ("maxSurge", "maxUnavailable"), scheduling.rollout(opts, dep.name, needs_gpu(dep)), strict=True))},
        "template": pod_template(ctx, dep, config_hash),
    })
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.meta(ctx.workload(dep.name), component=component, dep=dep.name),
        "spec": spec,
    }


def rank_options(ctx: AppContext, dep: DeploymentSpec, rank: int) -> RayActorOptions:
    """Resources of a gang's leader (rank 0) or of its workers: one template serves ranks 1..N-1,
    so bundles that differ between them are merged, each resource at its largest."""
    cfg = dep.config
    ranks = [0] if rank == 0 else list(range(1, cfg.world_size))
    bundles = [cfg.rank_resources(r) for r in ranks]
    merged = dict(bundles[0])
    for other in bundles[1:]:
        if other != bundles[0]:
            ctx.warn(f"deployment {dep.name!r}: ranks 1..{cfg.world_size - 1} share one pod template (the "
                     "LeaderWorkerSet's workerTemplate), so each asks for the largest of their bundles")
        for key in ("num_cpus", "num_gpus", "memory"):
            if key in other:
                merged[key] = max(float(merged.get(key) or 0.0), float(other[key]))
        if other.get("resources"):
            extra = dict(merged.get("resources") or {})
            for name, amount in other["resources"].items():
                extra[name] = max(extra.get(name, 0.0), amount)
            merged["resources"] = extra
    return RayActorOptions(**merged)


def leader_worker_set(ctx: AppContext, dep: DeploymentSpec, config_hash: str) -> Obj:
    component = "ingress" if dep.ingress else "deployment"
    meta = ctx.meta(names.gang_name(ctx.instance, dep.name), component=component, dep=dep.name,
                    annotations=lws.placement_annotations(dep.config.placement_group_strategy))
    max_surge, max_unavailable = scheduling.rollout(ctx.opts, dep.name, needs_gpu(dep), surge=1)
    return lws.leader_worker_set(
        meta,
        replicas=replica_count(dep.config),
        max_surge=max_surge,
        max_unavailable=max_unavailable,
        size=dep.config.world_size,
        leader_template=pod_template(ctx, dep, config_hash, rank=0),
        worker_template=pod_template(ctx, dep, config_hash, rank=1),
    )


def headless_service(ctx: AppContext, dep: DeploymentSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(names.headless_service_name(ctx.instance, dep.name),
                             component="ingress" if dep.ingress else "deployment", dep=dep.name),
        "spec": {
            # Headless: DNS returns the ready pods' IPs; the caller's router balances itself.
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            # A gang is called through its leaders only (rank 0 runs each request on every rank).
            "selector": ctx.serving_selector(dep),
            "ports": [{"name": "rpc", "port": names.RPC_PORT, "targetPort": "rpc", "protocol": "TCP"}],
        },
    }


def pdb(ctx: AppContext, dep: DeploymentSpec) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": ctx.meta(ctx.workload(dep.name), component="ingress" if dep.ingress else "deployment",
                             dep=dep.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": ctx.selector(dep.name)},
            # A pod that never got ready must not block node drains.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


