"""Compile a shoal application into plain Kubernetes objects.

:func:`compile_app` is a pure function: from an :class:`~shoal.deployment.AppSpec` (the
built graph), the serve-config entry that describes the application (what every pod reads
back from its ConfigMap) and :class:`CompileOptions`, it returns Kubernetes object dicts
ready to be written as YAML or applied with server-side apply. Nothing here talks to a
cluster or reads the clock; the only randomness is the optional generated Secret.

Per shoal deployment it emits a ``Deployment`` running ``shoal replica --deployment NAME`` (for a
gang deployment a ``LeaderWorkerSet``, one group of pods per replica: :mod:`shoal.kubernetes.lws`), a
headless ``Service`` on the RPC port (callers discover pod IPs through its DNS records), a
``PodDisruptionBudget``, a ``NetworkPolicy`` admitting exactly its callers, and a KEDA
``ScaledObject`` or ``autoscaling/v2`` HPA when it autoscales. Per application: a
``ServiceAccount`` without a token, the ``ConfigMap`` holding the serve config, a default-deny
``NetworkPolicy`` plus DNS egress, and for the ingress deployment a ClusterIP ``Service`` with
a Gateway API ``HTTPRoute`` (or a classic ``Ingress``). Names, ports and environment
variables come from :mod:`shoal.kubernetes.names`, the contract with the pod runtime.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from shoal.config import AutoscalingConfig, DeploymentConfig, RayActorOptions
from shoal.deployment import AppSpec, DeploymentSpec
from shoal.kubernetes import lws, names

__all__ = [
    "CACHE_DIR",
    "HPA_EXTERNAL_METRIC",
    "CompileError",
    "CompileOptions",
    "CompileResult",
    "check_collisions",
    "compile_app",
    "compile_apps",
    "default_version",
    "instance_name",
    "label_value",
    "prune_selector",
    "to_yaml",
    "to_yaml_stream",
]

Obj = dict[str, Any]

MANAGED_BY = "shoal"
CONTAINER_NAME = "replica"
RUN_AS_USER = 10001
# Writable directories of the otherwise read-only root filesystem.
TMP_DIR = "/tmp"
CACHE_DIR = "/var/cache/shoal"  # HOME and XDG_CACHE_HOME (so HF_HOME defaults below it)
SHM_DIR = "/dev/shm"
# The external metric an HPA reads (--autoscaler hpa). A metrics adapter must serve it as the
# sum of names.METRIC_ONGOING and names.METRIC_CALLER_QUEUED per app and deployment.
HPA_EXTERNAL_METRIC = "shoal_deployment_requests"
STARTUP_PROBE_PERIOD_S = 5
LIVENESS_PERIOD_S = 10
TERMINATION_MARGIN_S = 5
# The longest stabilization window the HPA API accepts.
MAX_STABILIZATION_S = 3600

# Recommended labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_VERSION = "app.kubernetes.io/version"
L_COMPONENT = "app.kubernetes.io/component"
L_PART_OF = "app.kubernetes.io/part-of"
L_MANAGED_BY = "app.kubernetes.io/managed-by"
RESERVED_LABELS = (L_NAME, L_INSTANCE, L_VERSION, L_COMPONENT, L_PART_OF, L_MANAGED_BY)
# Annotations keep the exact (unsanitised) shoal names.
A_APP = "shoal.dev/app"
A_DEPLOYMENT = "shoal.dev/deployment"
A_CONFIG_HASH = "shoal.dev/config-hash"
A_CANARY_OF = "shoal.dev/canary-of"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_GW_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class CompileError(ValueError):
    """The app or the options cannot be compiled; the message names the option or field."""


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``shoal k8s build`` can be told. Field names follow the CLI options."""

    namespace: str = "default"
    image: str = ""
    # Version label of every object; default: a hash of the image and the app's config.
    version: str | None = None
    autoscaler: Literal["keda", "hpa"] = "keda"
    # Gateway API: the Gateway the HTTPRoute attaches to (parentRefs).
    gateway: str | None = None
    gateway_namespace: str | None = None
    gateway_section: str | None = None
    hostnames: tuple[str, ...] = ()
    # Classic networking.k8s.io/v1 Ingress instead of an HTTPRoute.
    ingress_class: str | None = None
    # How long the route lets one request (or stream) run.
    route_timeout: str = "1h"
    # Extended resource for fractional num_gpus, e.g. nvidia.com/mig-1g.10gb or nvidia.com/gpu.shared.
    gpu_resource: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    create_secret: bool = False
    # Canary: this build is version `version` beside the running OLD version, `canary_weight` % of traffic.
    canary_of: str | None = None
    canary_weight: int = 10
    # KEDA's Prometheus trigger.
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    # The label Prometheus attaches with the pod's namespace ("" leaves the namespace out of queries).
    prometheus_namespace_label: str = "namespace"
    # NetworkPolicy peers: namespaces allowed to reach the HTTP port / scrape the admin port (empty: any).
    http_from_namespaces: tuple[str, ...] = ()
    metrics_from_namespaces: tuple[str, ...] = ()
    # DNS egress: "kube-dns" (pods labelled k8s-app=kube-dns in kube-system) or "any" (port 53 anywhere,
    # needed with NodeLocal DNSCache, whose address is not a pod).
    dns_egress: Literal["kube-dns", "any"] = "kube-dns"
    startup_timeout_s: int = 600
    prestop_sleep_s: int = 5
    cpu_limits: bool = False
    shm_size: str = "1Gi"
    cluster_domain: str = "cluster.local"
    pod_monitor: bool = False
    # A ConfigMap holding the Grafana dashboard (shoal.observability.grafana), for Grafana's dashboard sidecar.
    grafana: bool = False


@dataclass
class CompileResult:
    objects: list[Obj]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def label_value(value: str) -> str:
    """``value`` itself when it is a valid label value, else a DNS-label rendering of it."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return names.dns_label(value)


def instance_name(app: str, version: str | None, canary: bool) -> str:
    """The application name the pods run under: the app itself, or ``<app>-<version>`` for a canary."""
    if canary and version:
        return f"{app}-{version}"
    return app


def default_version(image: str, entry: Mapping[str, Any]) -> str:
    """A version label that changes when the image reference or the app's config does."""
    h = hashlib.sha256(image.encode())
    h.update(json.dumps(entry, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


def prune_selector(app: str, instance: str | None = None) -> str:
    """Label selector of the objects ``shoal k8s apply`` owns for ``app`` (one canary ``instance``)."""
    parts = [f"{L_PART_OF}={label_value(app)}", f"{L_MANAGED_BY}={MANAGED_BY}"]
    if instance is not None:
        parts.append(f"{L_INSTANCE}={label_value(instance)}")
    return ",".join(parts)


def cpu_quantity(cpus: float) -> str:
    if float(cpus).is_integer():
        return str(int(cpus))
    return f"{round(cpus * 1000)}m"


def memory_quantity(num_bytes: float) -> str:
    n = round(num_bytes)
    for suffix, unit in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _seconds(value: float, minimum: int = 1) -> int:
    return max(minimum, math.ceil(value))


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ns_peer(namespaces: Sequence[str]) -> list[Obj]:
    """NetworkPolicy ``from`` peers for pods in ``namespaces`` (every namespace when empty)."""
    if not namespaces:
        return [{"namespaceSelector": {}}]
    return [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}} for ns in namespaces]


# --------------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------------


def check_options(opts: CompileOptions) -> None:
    """Raise :class:`CompileError` naming the first bad option."""
    if not _DNS1123_LABEL.match(opts.namespace) or len(opts.namespace) > 63:
        raise CompileError(f"--namespace {opts.namespace!r} is not a valid namespace name (a DNS-1123 label)")
    if not opts.image or any(c.isspace() for c in opts.image):
        raise CompileError("--image is required: the container image that holds shoal and the app's code")
    if opts.autoscaler not in ("keda", "hpa"):
        raise CompileError(f"--autoscaler must be 'keda' or 'hpa', got {opts.autoscaler!r}")
    if opts.gateway and opts.ingress_class:
        raise CompileError("--gateway and --ingress-class exclude each other: route with an HTTPRoute or an Ingress")
    if opts.gateway_namespace and not opts.gateway:
        raise CompileError("--gateway-namespace needs --gateway")
    for opt, value in (("--gateway", opts.gateway), ("--gateway-namespace", opts.gateway_namespace),
                       ("--ingress-class", opts.ingress_class)):
        if value is not None and not _DNS1123_SUBDOMAIN.match(value):
            raise CompileError(f"{opt} {value!r} is not a valid Kubernetes name")
    for host in opts.hostnames:
        if not _HOSTNAME.match(host):
            raise CompileError(f"--hostname {host!r} is not a valid DNS name")
    if not _GW_DURATION.match(opts.route_timeout):
        raise CompileError(f"--route-timeout {opts.route_timeout!r} must be a duration like 1h, 30m or 90s")
    for key, value in opts.labels.items():
        _check_label(key, value)
    for key in opts.env:
        if not _ENV_NAME.match(key):
            raise CompileError(f"--env {key!r} is not a valid environment variable name")
    if opts.version is not None and (not opts.version or not _LABEL_VALUE.match(opts.version)
                                     or len(opts.version) > 63):
        raise CompileError(
            f"--version {opts.version!r} must be a valid label value (letters, digits, '-', '_', '.'; at most 63)"
        )
    if opts.canary_of is not None:
        if not _LABEL_VALUE.match(opts.canary_of) or not opts.canary_of:
            raise CompileError(f"--canary-of {opts.canary_of!r} must be the old version's label value")
        if not opts.version:
            raise CompileError("--canary-of needs --version: the canary's own version names its objects")
        if opts.version == opts.canary_of:
            raise CompileError(f"--canary-of {opts.canary_of!r} is the same as --version; give the new version")
        if not opts.gateway:
            raise CompileError(
                "--canary-of needs --gateway: weighted traffic splitting uses a Gateway API HTTPRoute "
                "(a classic Ingress has no portable weights)"
            )
    if not 0 <= opts.canary_weight <= 100:
        raise CompileError(f"--weight must be between 0 and 100, got {opts.canary_weight}")
    if opts.gpu_resource is not None and not _qualified_name(opts.gpu_resource):
        raise CompileError(f"--gpu-resource {opts.gpu_resource!r} is not a resource name like nvidia.com/mig-1g.10gb")
    if opts.startup_timeout_s < STARTUP_PROBE_PERIOD_S:
        raise CompileError(f"--startup-timeout must be at least {STARTUP_PROBE_PERIOD_S} seconds")
    if opts.prestop_sleep_s < 0:
        raise CompileError("--prestop-sleep must not be negative")
    if not _QUANTITY.match(opts.shm_size):
        raise CompileError(f"--shm-size {opts.shm_size!r} is not a quantity like 1Gi")
    for opt, values in (("--http-from-namespace", opts.http_from_namespaces),
                        ("--metrics-from-namespace", opts.metrics_from_namespaces)):
        for ns in values:
            if not _DNS1123_LABEL.match(ns):
                raise CompileError(f"{opt} {ns!r} is not a valid namespace name")
    if opts.prometheus_namespace_label and not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", opts.prometheus_namespace_label):
        raise CompileError(f"--prometheus-namespace-label {opts.prometheus_namespace_label!r} is not a label name")
    for secret in opts.image_pull_secrets:
        if not _DNS1123_SUBDOMAIN.match(secret):
            raise CompileError(f"--image-pull-secret {secret!r} is not a valid Secret name")


def _qualified_name(name: str) -> bool:
    prefix, _, rest = name.rpartition("/")
    if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
        return False
    return bool(rest) and len(rest) <= 63 and bool(_LABEL_NAME.match(rest))


def _check_label(key: str, value: str) -> None:
    if key in RESERVED_LABELS:
        raise CompileError(f"--label {key}: shoal sets this label itself")
    if not _qualified_name(key):
        raise CompileError(f"--label {key!r}: not a valid label key (prefix/name, e.g. team or example.com/team)")
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise CompileError(f"--label {key}={value!r}: not a valid label value (at most 63 letters, digits, '-_.')")


# --------------------------------------------------------------------------------------------
# The compiler
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """What every builder below needs about one application."""

    spec: AppSpec
    opts: CompileOptions
    app: str  # the application's name as users know it (part-of)
    instance: str  # the name the pods run under (app, or app-version for a canary)
    version: str
    canary: bool
    entry: Mapping[str, Any]
    warnings: list[str]

    def meta(self, name: str, *, component: str | None = None, dep: str | None = None,
             annotations: Mapping[str, str] | None = None) -> Obj:
        labels = self.labels(dep=dep, component=component)
        meta: Obj = {"name": name, "namespace": self.opts.namespace, "labels": labels}
        ann = {A_APP: self.instance}
        if dep is not None:
            ann[A_DEPLOYMENT] = dep
        if annotations:
            ann.update(annotations)
        meta["annotations"] = ann
        return meta

    def labels(self, *, dep: str | None = None, component: str | None = None) -> dict[str, str]:
        out = {
            L_NAME: label_value(dep if dep is not None else self.app),
            L_INSTANCE: label_value(self.instance),
            L_VERSION: self.version,
            L_COMPONENT: component or "app",
            L_PART_OF: label_value(self.app),
            L_MANAGED_BY: MANAGED_BY,
        }
        out.update(self.opts.labels)
        return out

    def selector(self, dep: str) -> dict[str, str]:
        """Pod selector of one deployment (immutable on a Deployment: no version in it)."""
        return {
            L_PART_OF: label_value(self.app),
            L_INSTANCE: label_value(self.instance),
            L_NAME: label_value(dep),
        }

    def app_selector(self) -> dict[str, str]:
        """Every pod of this application instance."""
        return {L_PART_OF: label_value(self.app), L_INSTANCE: label_value(self.instance), L_MANAGED_BY: MANAGED_BY}

    def workload(self, dep: str) -> str:
        return names.workload_name(self.instance, dep)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def serving_selector(self, dep: DeploymentSpec) -> dict[str, str]:
        """The pods that serve a deployment's callers: all of them, or a gang's leaders (rank 0)."""
        selector = self.selector(dep.name)
        if dep.config.world_size > 1:
            selector[names.LWS_LABEL_WORKER_INDEX] = "0"
        return selector


def compile_app(spec: AppSpec, entry: Mapping[str, Any], opts: CompileOptions, *,
                http_options: Mapping[str, Any] | None = None) -> CompileResult:
    """The Kubernetes objects of one application.

    ``entry`` is the application's serve-config entry (``name``, ``route_prefix``,
    ``import_path``, ``args``, ``deployments``) in JSON-friendly form; it is written into the
    ConfigMap the pods read, with ``name`` replaced by the canary instance name when compiling
    a canary. ``http_options`` (optional) are copied into that file too, with the host and
    port the pods listen on.
    """
    check_options(opts)
    canary = opts.canary_of is not None
    version = opts.version or default_version(opts.image, entry)
    ctx = _Ctx(spec=spec, opts=opts, app=spec.name, instance=instance_name(spec.name, version, canary),
               version=version, canary=canary, entry=entry, warnings=[])
    _check_names(ctx)

    config_text = _serve_config_text(ctx, entry, http_options or {})
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()[:16]

    objects: list[Obj] = [_service_account(ctx)]
    if opts.create_secret:
        objects.append(generated_secret(ctx.app, opts, ctx.labels(component="rpc-secret")))
    objects.append(_config_map(ctx, config_text))
    objects.extend(_network_policies(ctx))
    for dep in spec.deployments.values():
        objects.append(_headless_service(ctx, dep))
        objects.append(_workload(ctx, dep, config_hash))
        objects.append(_pdb(ctx, dep))
        objects.extend(_autoscaler(ctx, dep))
    if spec.route_prefix is not None:
        objects.extend(_http_objects(ctx))
    if opts.pod_monitor:
        objects.append(_pod_monitor(ctx))
    if opts.grafana:
        objects.append(_grafana_dashboard(ctx))
    check_collisions(objects)
    return CompileResult(objects=objects, warnings=ctx.warnings)


def compile_apps(apps: Sequence[tuple[AppSpec, Mapping[str, Any]]], opts: CompileOptions, *,
                 http_options: Mapping[str, Any] | None = None) -> CompileResult:
    """:func:`compile_app` for several applications; refuses two objects of one kind and name."""
    out = CompileResult(objects=[])
    for spec, entry in apps:
        res = compile_app(spec, entry, opts, http_options=http_options)
        out.objects.extend(res.objects)
        out.warnings.extend(res.warnings)
    check_collisions(out.objects)
    return out


def check_collisions(objects: Sequence[Obj]) -> None:
    """Refuse two objects of one kind and name (they would overwrite each other)."""
    seen: dict[tuple[str, str], str] = {}
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        ann = obj["metadata"].get("annotations", {})
        owner = ann.get(A_DEPLOYMENT) or ann.get(A_APP, "")
        if key in seen:
            raise CompileError(
                f"name collision: two {key[0]} objects named {key[1]!r} (from {seen[key]!r} and {owner!r}); "
                "rename an application or deployment"
            )
        seen[key] = owner


def _check_names(ctx: _Ctx) -> None:
    by_name: dict[str, str] = {}
    reserved = {names.ingress_service_name(ctx.instance): "the app's HTTP Service"}
    for dep in ctx.spec.deployments:
        wl = ctx.workload(dep)
        if wl in by_name:
            raise CompileError(
                f"application {ctx.app!r}: deployments {by_name[wl]!r} and {dep!r} both map to the Kubernetes "
                f"name {wl!r}; rename one with .options(name=...)"
            )
        if wl in reserved and ctx.spec.route_prefix is not None:
            raise CompileError(
                f"application {ctx.app!r}: deployment {dep!r} maps to {wl!r}, the name of {reserved[wl]}; "
                "rename the deployment"
            )
        by_name[wl] = dep
        lv = label_value(dep)
        for other in ctx.spec.deployments:
            if other != dep and label_value(other) == lv:
                raise CompileError(
                    f"application {ctx.app!r}: deployments {dep!r} and {other!r} get the same label value {lv!r}; "
                    "rename one with .options(name=...)"
                )
    # A LeaderWorkerSet makes a headless Service of its own name: it must not meet another Service.
    services = {**by_name, **{k: v for k, v in reserved.items() if ctx.spec.route_prefix is not None}}
    for dep, spec in ctx.spec.deployments.items():
        if spec.config.world_size > 1:
            gang = names.gang_name(ctx.instance, dep)
            if gang in services:
                raise CompileError(
                    f"application {ctx.app!r}: the LeaderWorkerSet of gang deployment {dep!r} is named {gang!r}, "
                    f"which is also the Service of {services[gang]!r}; rename a deployment"
                )
            services[gang] = dep


def _serve_config_text(ctx: _Ctx, entry: Mapping[str, Any], http_options: Mapping[str, Any]) -> str:
    app_entry = dict(entry)
    app_entry["name"] = ctx.instance
    app_entry.setdefault("route_prefix", ctx.spec.route_prefix)
    http = {k: v for k, v in http_options.items() if k not in ("host", "port", "location")}
    doc = {
        "http_options": {"host": "0.0.0.0", "port": names.HTTP_PORT, **http},
        "applications": [app_entry],
    }
    header = (
        f"# Written by `shoal k8s build` for application {ctx.app!r}; every pod of it reads this file\n"
        f"# ({names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}) and serves the deployment named in "
        f"${names.ENV_DEPLOYMENT}.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


# --- identity, config, secret ----------------------------------------------------------------


def _sa_name(ctx: _Ctx) -> str:
    # Never plain "<app>": an app named "default" would take over the namespace's default account.
    return names.dns_label(ctx.instance, "replica")


def _service_account(ctx: _Ctx) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": ctx.meta(_sa_name(ctx), component="identity"),
        # Replicas never talk to the Kubernetes API: no token in the pods.
        "automountServiceAccountToken": False,
    }


def _config_map(ctx: _Ctx, text: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.meta(names.config_map_name(ctx.instance), component="config"),
        "data": {names.CONFIG_FILE_NAME: text},
    }


def generated_secret(app: str, opts: CompileOptions, labels: Mapping[str, str]) -> Obj:
    """A Secret with a fresh random RPC secret (``--create-secret``); apply never overwrites one."""
    value = base64.b64encode(secrets.token_hex(32).encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names.secret_name(app),
            "namespace": opts.namespace,
            "labels": dict(labels),
            "annotations": {A_APP: app},
        },
        "type": "Opaque",
        "data": {names.SECRET_KEY: value},
    }


# --- workloads ---------------------------------------------------------------------------------


def _resources(ctx: _Ctx, dep: DeploymentSpec, rao: RayActorOptions | None = None) -> tuple[Obj, bool]:
    """Container resources from ray_actor_options (or one gang rank's), and whether the pod needs a GPU node."""
    rao = rao if rao is not None else dep.config.ray_actor_options
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpus = rao.effective_num_cpus
    if cpus > 0:
        requests["cpu"] = cpu_quantity(cpus)
        if ctx.opts.cpu_limits:
            limits["cpu"] = cpu_quantity(cpus)
    if rao.memory:
        requests["memory"] = limits["memory"] = memory_quantity(rao.memory)
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
    if rao.accelerator_type:
        ctx.warn(
            f"deployment {dep.name!r}: accelerator_type {rao.accelerator_type!r} is not mapped to a node selector; "
            "add one with your own patch"
        )
    out: Obj = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out, gpu


def _env(ctx: _Ctx, dep: DeploymentSpec, extra: Sequence[Obj] = ()) -> list[Obj]:
    def field_ref(path: str) -> Obj:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    env: list[Obj] = [
        {"name": names.ENV_DEPLOYMENT, "value": dep.name},
        {"name": names.ENV_APP, "value": ctx.instance},
        {"name": names.ENV_CONFIG, "value": f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}"},
        {"name": names.ENV_NAMESPACE, **field_ref("metadata.namespace")},
        {"name": names.ENV_POD_NAME, **field_ref("metadata.name")},
        {"name": names.ENV_POD_IP, **field_ref("status.podIP")},
        {
            "name": names.ENV_SECRET,
            "valueFrom": {"secretKeyRef": {"name": names.secret_name(ctx.app), "key": names.SECRET_KEY}},
        },
        {"name": names.ENV_CLUSTER_DOMAIN, "value": ctx.opts.cluster_domain},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
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
            if key.startswith("SHOAL_") or not _ENV_NAME.match(key):
                raise CompileError(f"{where}: {key!r} cannot be set (SHOAL_* belong to shoal; names must be valid)")
            env = [e for e in env if e["name"] != key]
            env.append({"name": key, "value": str(value)})
    return env


def _probes(dep: DeploymentSpec, opts: CompileOptions) -> Obj:
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
            "periodSeconds": _seconds(cfg.health_check_period_s),
            "timeoutSeconds": _seconds(cfg.health_check_timeout_s),
            "failureThreshold": 3,
        },
        # The process answers at all.
        "livenessProbe": {
            "httpGet": {"path": "/-/healthz", "port": "admin"},
            "periodSeconds": LIVENESS_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
    }


def _pod_template(ctx: _Ctx, dep: DeploymentSpec, config_hash: str, *, rank: int | None = None) -> Obj:
    """The pod template of a deployment's replicas; for a gang, of its leader (``rank=0``) or of
    its workers (``rank=1``: every rank from 1 to N-1)."""
    opts = ctx.opts
    cfg: DeploymentConfig = dep.config
    component = "ingress" if dep.ingress else "deployment"
    gang = names.gang_name(ctx.instance, dep.name) if rank is not None else ""
    resources, gpu = _resources(ctx, dep, None if rank is None else _rank_options(ctx, dep, rank))
    ports: list[Obj] = [
        {"name": "rpc", "containerPort": names.RPC_PORT, "protocol": "TCP"},
        {"name": "admin", "containerPort": names.ADMIN_PORT, "protocol": "TCP"},
    ]
    if dep.ingress and ctx.spec.route_prefix is not None and not rank:
        ports.append({"name": "http", "containerPort": names.HTTP_PORT, "protocol": "TCP"})
    if rank == 0:
        ports.append({"name": "rendezvous", "containerPort": names.RENDEZVOUS_PORT, "protocol": "TCP"})
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["shoal", "replica"],
        "args": ["--deployment", dep.name] + (["--rank-from-env"] if gang else []),
        "env": _env(ctx, dep, lws.gang_env(gang) if gang else ()),
        "ports": ports,
        **_probes(dep, opts),
        # Let endpoints and callers' DNS catch up before SIGTERM; the replica then drains its
        # in-flight requests for up to graceful_shutdown_timeout_s.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(opts.prestop_sleep_s)]}}}
        if opts.prestop_sleep_s else {},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": SHM_DIR},
        ],
    }
    if not container["lifecycle"]:
        del container["lifecycle"]
    if resources:
        container["resources"] = resources
    selector = ctx.selector(dep.name)
    # Replicas across nodes; a gang's pods carry LWS's revision label instead of pod-template-hash.
    spread: list[Obj] = [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": dict(selector)},
        "matchLabelKeys": [names.LWS_LABEL_REVISION if gang else "pod-template-hash"],
    }]
    affinity: Obj | None = None
    if gang:
        affinity, within_group = lws.placement_affinity(cfg.placement_group_strategy)
        spread.extend(within_group)
    pod_spec: Obj = {
        "serviceAccountName": _sa_name(ctx),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": opts.prestop_sleep_s + _seconds(cfg.graceful_shutdown_timeout_s, 0)
        + TERMINATION_MARGIN_S,
        "topologySpreadConstraints": spread,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map_name(ctx.instance)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
        ],
    }
    if affinity is not None:
        pod_spec["affinity"] = affinity
    if gpu:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if opts.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in opts.image_pull_secrets]
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
        "spec": pod_spec,
    }


def _replicas(cfg: DeploymentConfig) -> int | None:
    """The replica count to write, or None when an autoscaler owns it (re-applying then never
    fights the autoscaler; the workload starts with 1)."""
    if cfg.resolved_autoscaling() is None:
        return cfg.num_replicas if isinstance(cfg.num_replicas, int) else 1
    return None


def _workload(ctx: _Ctx, dep: DeploymentSpec, config_hash: str) -> Obj:
    """A Deployment, or for a gang deployment a LeaderWorkerSet."""
    if dep.config.world_size > 1:
        return _leader_worker_set(ctx, dep, config_hash)
    return _deployment(ctx, dep, config_hash)


def _deployment(ctx: _Ctx, dep: DeploymentSpec, config_hash: str) -> Obj:
    opts = ctx.opts
    component = "ingress" if dep.ingress else "deployment"
    spec: Obj = {}
    replicas = _replicas(dep.config)
    if replicas is not None:
        spec["replicas"] = replicas
    spec.update({
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": max(900, opts.startup_timeout_s + 300),
        "selector": {"matchLabels": ctx.selector(dep.name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
        "template": _pod_template(ctx, dep, config_hash),
    })
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.meta(ctx.workload(dep.name), component=component, dep=dep.name),
        "spec": spec,
    }


def _rank_options(ctx: _Ctx, dep: DeploymentSpec, rank: int) -> RayActorOptions:
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


def _leader_worker_set(ctx: _Ctx, dep: DeploymentSpec, config_hash: str) -> Obj:
    component = "ingress" if dep.ingress else "deployment"
    return lws.leader_worker_set(
        ctx.meta(names.gang_name(ctx.instance, dep.name), component=component, dep=dep.name),
        replicas=_replicas(dep.config),
        size=dep.config.world_size,
        leader_template=_pod_template(ctx, dep, config_hash, rank=0),
        worker_template=_pod_template(ctx, dep, config_hash, rank=1),
    )


def _headless_service(ctx: _Ctx, dep: DeploymentSpec) -> Obj:
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


def _pdb(ctx: _Ctx, dep: DeploymentSpec) -> Obj:
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


# --- autoscaling -------------------------------------------------------------------------------


def _behavior(auto: AutoscalingConfig) -> Obj:
    return {
        "scaleUp": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.upscale_delay_s))},
        "scaleDown": {"stabilizationWindowSeconds": min(MAX_STABILIZATION_S, round(auto.downscale_delay_s))},
    }


def keda_query(ctx_namespace: str, app: str, deployment: str, namespace_label: str = "namespace") -> str:
    """PromQL: requests in the deployment's replicas plus requests callers hold for it."""
    matchers = []
    if namespace_label:
        matchers.append(f"{namespace_label}={_promql_string(ctx_namespace)}")
    matchers += [f"app={_promql_string(app)}", f"deployment={_promql_string(deployment)}"]
    sel = "{" + ",".join(matchers) + "}"
    # `or vector(0)`: a sum over no series is empty, and empty + x is empty.
    return f"(sum({names.METRIC_ONGOING}{sel}) or vector(0)) + (sum({names.METRIC_CALLER_QUEUED}{sel}) or vector(0))"


def _autoscaler(ctx: _Ctx, dep: DeploymentSpec) -> list[Obj]:
    auto = dep.config.resolved_autoscaling()
    if auto is None:
        return []
    if auto.policy:
        ctx.warnings.append(
            f"deployment {dep.name!r}: the custom autoscaling policy {auto.policy!r} runs only in local mode; "
            f"on Kubernetes the {ctx.opts.autoscaler} autoscaler scales on target_ongoing_requests"
        )
    min_replicas = auto.min_replicas
    comp = "ingress" if dep.ingress else "deployment"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.workload(dep.name)}
    if dep.config.world_size > 1:  # LeaderWorkerSets have the scale subresource: one replica is one group
        target = {"apiVersion": names.LWS_API_VERSION, "kind": lws.LWS_KIND,
                  "name": names.gang_name(ctx.instance, dep.name)}
    threshold = f"{auto.target_ongoing_requests:g}"
    if ctx.opts.autoscaler == "hpa":
        if min_replicas == 0:
            raise CompileError(
                f"deployment {dep.name!r} of application {ctx.app!r} has min_replicas 0, but a "
                "HorizontalPodAutoscaler cannot scale to zero; use --autoscaler keda (the default) or raise "
                "min_replicas to 1"
            )
        return [{
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
                "behavior": _behavior(auto),
            },
        }]
    if min_replicas == 0 and dep.ingress and ctx.spec.route_prefix is not None:
        ctx.warnings.append(
            f"deployment {dep.name!r} is the HTTP ingress of {ctx.app!r}: min_replicas 0 raised to 1, since "
            "nothing holds HTTP requests while it has no pod"
        )
        min_replicas = 1
    return [{
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": ctx.meta(ctx.workload(dep.name), component=comp, dep=dep.name),
        "spec": {
            "scaleTargetRef": target,
            "pollingInterval": _seconds(auto.metrics_interval_s),
            # Only governs the last step to zero.
            "cooldownPeriod": round(auto.downscale_to_zero_delay_s if auto.downscale_to_zero_delay_s is not None
                                    else auto.downscale_delay_s),
            "minReplicaCount": min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(auto)}},
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
    }]


# --- network policies --------------------------------------------------------------------------


def _network_policies(ctx: _Ctx) -> list[Obj]:
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
            ingress_rules.append({"from": _ns_peer(opts.http_from_namespaces),
                                  "ports": [{"protocol": "TCP", "port": names.HTTP_PORT}]})
        ingress_rules.append({"from": _ns_peer(opts.metrics_from_namespaces),
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
                ctx.selector(dep.name), metrics_from=_ns_peer(opts.metrics_from_namespaces),
                callees=[ctx.selector(c) for c in dep.calls]))
    return policies


# --- HTTP --------------------------------------------------------------------------------------


def _http_objects(ctx: _Ctx) -> list[Obj]:
    opts = ctx.opts
    ingress_dep = ctx.spec.ingress
    prefix = ctx.spec.route_prefix or "/"
    out: list[Obj] = []
    svc_name = names.ingress_service_name(ctx.instance)
    out.append(_http_service(ctx, svc_name, ctx.serving_selector(ctx.spec.deployments[ingress_dep]), ingress_dep))
    backends: list[Obj] = [{"name": svc_name, "port": names.HTTP_PORT}]
    if ctx.canary and opts.canary_of is not None:
        old_instance = instance_name(ctx.app, opts.canary_of, True)
        old_name = names.ingress_service_name(old_instance)
        # The stable pods of the old version: the plain app instance, pinned to its version label.
        old_selector = {L_PART_OF: label_value(ctx.app), L_INSTANCE: label_value(ctx.app),
                        L_NAME: label_value(ingress_dep), L_VERSION: opts.canary_of}
        if ctx.spec.deployments[ingress_dep].config.world_size > 1:
            old_selector[names.LWS_LABEL_WORKER_INDEX] = "0"
        out.append(_http_service(ctx, old_name, old_selector, ingress_dep,
                                 annotations={A_CANARY_OF: opts.canary_of}))
        backends = [
            {"name": old_name, "port": names.HTTP_PORT, "weight": 100 - opts.canary_weight},
            {"name": svc_name, "port": names.HTTP_PORT, "weight": opts.canary_weight},
        ]
    if opts.gateway:
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
        out.append({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": route_meta,
            "spec": spec,
        })
    elif opts.ingress_class:
        annotations: dict[str, str] = {}
        if "nginx" in opts.ingress_class:
            seconds = str(_duration_seconds(opts.route_timeout))
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
        out.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": ctx.meta(names.dns_label(ctx.instance), component="route", annotations=annotations),
            "spec": {"ingressClassName": opts.ingress_class, "rules": rules},
        })
    else:
        ctx.warnings.append(
            f"application {ctx.app!r}: no --gateway or --ingress-class, so no route; the ClusterIP Service "
            f"{svc_name!r} serves HTTP inside the cluster (kubectl port-forward svc/{svc_name} {names.HTTP_PORT})"
        )
    return out


def _http_service(ctx: _Ctx, name: str, selector: Mapping[str, str], dep: str,
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


def _duration_seconds(text: str) -> int:
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)(h|ms|m|s)", text):
        total += int(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return max(1, math.ceil(total))


def _pod_monitor(ctx: _Ctx) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": ctx.meta(names.dns_label(ctx.instance), component="metrics"),
        "spec": {
            "selector": {"matchLabels": ctx.app_selector()},
            "podMetricsEndpoints": [{"port": "admin", "path": "/metrics", "interval": "15s"}],
        },
    }


def _grafana_dashboard(ctx: _Ctx) -> Obj:
    """The dashboard of shoal.observability.grafana, preset to this application, in a ConfigMap labelled for
    Grafana's dashboard sidecar (``grafana_dashboard: "1"``)."""
    from shoal.observability.grafana import dashboard_json

    meta = ctx.meta(names.dns_label(ctx.instance, "grafana"), component="dashboard")
    meta["labels"]["grafana_dashboard"] = "1"
    uid = names.dns_label("shoal", ctx.instance, max_len=40)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {f"shoal-{names.dns_label(ctx.instance)}.json": dashboard_json(ctx.instance, uid)}}


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing multi-line strings (the ConfigMap's serve.yaml) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: Obj) -> str:
    """One object as YAML, keys in the order the compiler wrote them."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=1000)


def to_yaml_stream(objects: Sequence[Obj], header: str = "") -> str:
    """Every object as one multi-document YAML stream."""
    docs = [to_yaml(o) for o in objects]
    return header + "".join("---\n" + d for d in docs)
