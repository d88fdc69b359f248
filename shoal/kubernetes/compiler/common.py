"""What every part of the Kubernetes compiler shares: the options, names, labels, small helpers
and the per-application context."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shoal.deployment import AppSpec, DeploymentSpec
from shoal.exceptions import CompileError
from shoal.kubernetes import names

if TYPE_CHECKING:
    from shoal.kubernetes.secretstore import AppSecrets

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
TERMINATION_MARGIN_S = 5
# The longest stabilization window the HPA API accepts.
MAX_STABILIZATION_S = 3600

# What makes a namespace enforce (and warn and audit on) the Pod Security Standards' restricted
# profile (--create-namespace); every pod shoal generates meets it (validate.check_restricted).
PSA_LABELS = {
    f"pod-security.kubernetes.io/{mode}{suffix}": value
    for mode in ("enforce", "warn", "audit")
    for suffix, value in (("", "restricted"), ("-version", "latest"))
}

# Every container shoal writes: non-root, no privilege escalation, no capabilities, the runtime's
# default seccomp profile and a read-only root (the Pod Security Standards' "restricted" profile).
def container_security_context() -> dict[str, object]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def field_ref(path: str) -> dict[str, object]:
    """An env var's ``valueFrom`` reading a field of the pod (downward API)."""
    return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def identity_env(ctx: AppContext) -> list[dict[str, object]]:
    """What every shoal pod of an app is told about itself: the app, its config, where it runs."""
    return [
        {"name": names.ENV_APP, "value": ctx.instance},
        {"name": names.ENV_CONFIG, "value": f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}"},
        {"name": names.ENV_NAMESPACE, **field_ref("metadata.namespace")},
        {"name": names.ENV_POD_NAME, **field_ref("metadata.name")},
        {"name": names.ENV_POD_IP, **field_ref("status.podIP")},
    ]


def process_env(ctx: AppContext) -> list[dict[str, object]]:
    """The cluster domain, and HOME and caches on the writable cache volume (the root is read-only)."""
    return [
        {"name": names.ENV_CLUSTER_DOMAIN, "value": ctx.opts.cluster_domain},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


# Recommended labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
L_NAME = "app.kubernetes.io/name"
# The application instance (the app, or app-version for a canary): shoal's own label, used in every
# selector and by prune. Not the recommended app.kubernetes.io/instance, which Argo CD before 3.0
# writes for its own tracking (it would take over, or prune, objects carrying another value).
L_INSTANCE = "shoal.dev/instance"
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
ENV_NAME_PATTERN = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_GW_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``shoal k8s build`` can be told. Field names follow the CLI options."""

    namespace: str = "default"
    # Also emit the Namespace, labelled to enforce the Pod Security Standards' restricted profile.
    create_namespace: bool = False
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
    # TLS between pods: "secret" (pods mount <app>-rpc-tls, which --create-secret generates or the
    # operator creates), "cert-manager" (emit the cert-manager objects that write it) or "off"
    # (development only: plain TCP, loudly warned).
    tls: Literal["secret", "cert-manager", "off"] = "secret"
    # --create-secret: the stored material per application name (shoal.kubernetes.secretstore),
    # so that builds are reproducible; an application missing here gets fresh random material.
    secret_material: Mapping[str, AppSecrets] = field(default_factory=dict)
    # Canary: this build is version `version` beside the running OLD version, `canary_weight` % of traffic.
    canary_of: str | None = None
    canary_weight: int = 10
    # KEDA's Prometheus trigger.
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    # The label Prometheus attaches with the pod's namespace ("" leaves the namespace out of queries).
    prometheus_namespace_label: str = "namespace"
    # The shoal scaler (--autoscaler keda): the namespace KEDA's operator runs in (its NetworkPolicy
    # peer), and how long callers hold a request for a deployment with no pod before a 503.
    keda_namespace: str = "keda"
    wake_timeout_s: float = 120.0
    # How KEDA (and the app's callers) authenticate to the scaler: "bearer" (a token from the Secret
    # <app>-scaler-token, through a KEDA TriggerAuthentication) or "none" (the NetworkPolicy only).
    scaler_auth: Literal["bearer", "none"] = "bearer"
    # An HTTP ingress deployment with min_replicas 0 (KEDA): "front" keeps it at zero behind the app's
    # holding front (compiler/front.py); "keep-one" raises its min_replicas to 1 (warned).
    ingress_at_zero: Literal["front", "keep-one"] = "front"
    # NetworkPolicy peers (traffic.network_policies). HTTP port: these namespaces; empty: the Gateway's
    # namespace (--gateway), the app's own (no route) or any (--ingress-class, warned); "*": any.
    http_from_namespaces: tuple[str, ...] = ()
    # HTTP port from IP blocks too (Gateways that send from load-balancer addresses).
    http_from_cidrs: tuple[str, ...] = ()
    # Admin (metrics) port: the monitoring namespace(s); "*": any.
    metrics_from_namespaces: tuple[str, ...] = ("monitoring",)
    # DNS egress: "kube-dns" (pods labelled dns_pod_labels in dns_namespace, plus dns_cidrs) or "any"
    # (dns_ports anywhere).
    dns_egress: Literal["kube-dns", "any"] = "kube-dns"
    dns_namespace: str = "kube-system"
    dns_pod_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    dns_ports: tuple[int, ...] = (53,)
    # e.g. NodeLocal DNSCache's 169.254.20.10/32 (an address on the node, not a pod).
    dns_cidrs: tuple[str, ...] = ()
    # Gateway API release whose standard-channel CRDs the cluster has (HTTPRoute timeouts need 1.2).
    gateway_api_version: str = "1.2"
    startup_timeout_s: int = 600
    prestop_sleep_s: int = 5
    # CPU limits equal to the requests (--no-cpu-limits drops them): a ResourceQuota on limits.cpu
    # admits nothing without one, and a LimitRange's default limit may sit below the request.
    cpu_limits: bool = True
    shm_size: str = "1Gi"
    cluster_domain: str = "cluster.local"
    # Prometheus Operator: a PodMonitor per app (scraping every pod's /metrics), and with it a
    # PrometheusRule of alerts (compiler/monitoring.py); monitor_labels go on both, e.g. the
    # release=<name> label kube-prometheus-stack's Prometheus selects them by.
    pod_monitor: bool = True
    monitor_labels: Mapping[str, str] = field(default_factory=dict)
    alerts: bool = True
    alert_5xx_percent: float = 5.0  # share of HTTP answers that are 5xx, over 10 minutes
    alert_p99_seconds: float = 10.0  # p99 of HTTP latency (to the response's end), over 10 minutes
    # A ConfigMap holding the Grafana dashboard (shoal.observability.grafana), for Grafana's dashboard sidecar.
    grafana: bool = False
    # --- Per-pod resources and scheduling (compiler/scheduling.py). Entries of the tuples are
    # "[DEPLOYMENT:]VALUE": without a prefix for every deployment, with one for that deployment.
    # Memory request and limit of a deployment whose ray_actor_options set no `memory`.
    default_memory: str = "2Gi"
    # sizeLimit of the /tmp emptyDir, and of the cache emptyDir (HOME, model downloads).
    tmp_size: str = "1Gi"
    cache_size: tuple[str, ...] = ()
    # Rolling update "MAX_SURGE/MAX_UNAVAILABLE" (default: 0/1 when the pods ask for GPUs, else 25%/0).
    rollout: tuple[str, ...] = ()
    node_selectors: tuple[str, ...] = ()  # [DEP:]KEY=VALUE
    tolerations: tuple[str, ...] = ()  # [DEP:]KEY[=VALUE][:EFFECT]
    runtime_class: tuple[str, ...] = ()  # [DEP:]NAME
    priority_class: tuple[str, ...] = ()  # [DEP:]NAME
    zone_spread: tuple[str, ...] = ()  # [DEP:]ScheduleAnyway|DoNotSchedule (or [DEP] alone: ScheduleAnyway)
    # Node label whose value is Ray's accelerator_type (None: accelerator_type ignored, warned).
    accelerator_label: str | None = None
    # Read-only model volumes: "DEPLOYMENT=pvc:CLAIM[:/path]" or "DEPLOYMENT=image:REFERENCE[:/path]"
    # (compiler/volumes.py), mounted at /models unless a path is given.
    model_volumes: tuple[str, ...] = ()


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


def seconds(value: float, minimum: int = 1) -> int:
    return max(minimum, math.ceil(value))


def promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ns_peer(namespaces: Sequence[str]) -> list[Obj]:
    """NetworkPolicy ``from`` peers for pods in ``namespaces`` (every namespace when empty or "*")."""
    if not namespaces or "*" in namespaces:
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
    if opts.tls not in ("secret", "cert-manager", "off"):
        raise CompileError(f"--tls must be 'secret', 'cert-manager' or 'off', got {opts.tls!r}")
    _check_routing_options(opts)
    for key, value in opts.labels.items():
        _check_label(key, value)
    for key in opts.env:
        if not ENV_NAME_PATTERN.match(key):
            raise CompileError(f"--env {key!r} is not a valid environment variable name")
    if opts.version is not None and (not opts.version or not _LABEL_VALUE.match(opts.version)
                                     or len(opts.version) > 63):
        raise CompileError(
            f"--version {opts.version!r} must be a valid label value (letters, digits, '-', '_', '.'; at most 63)"
        )
    _check_canary_options(opts)
    if opts.gpu_resource is not None and not _qualified_name(opts.gpu_resource):
        raise CompileError(f"--gpu-resource {opts.gpu_resource!r} is not a resource name like nvidia.com/mig-1g.10gb")
    if opts.startup_timeout_s < STARTUP_PROBE_PERIOD_S:
        raise CompileError(f"--startup-timeout must be at least {STARTUP_PROBE_PERIOD_S} seconds")
    if opts.prestop_sleep_s < 0:
        raise CompileError("--prestop-sleep must not be negative")
    if not _QUANTITY.match(opts.shm_size):
        raise CompileError(f"--shm-size {opts.shm_size!r} is not a quantity like 1Gi")
    _check_network_options(opts)
    _check_monitoring_options(opts)
    if opts.prometheus_namespace_label and not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", opts.prometheus_namespace_label):
        raise CompileError(f"--prometheus-namespace-label {opts.prometheus_namespace_label!r} is not a label name")
    for secret in opts.image_pull_secrets:
        if not _DNS1123_SUBDOMAIN.match(secret):
            raise CompileError(f"--image-pull-secret {secret!r} is not a valid Secret name")


def _check_monitoring_options(opts: CompileOptions) -> None:
    """The PodMonitor's and PrometheusRule's labels and alert thresholds, and the scaler's auth."""
    if opts.scaler_auth not in ("bearer", "none"):
        raise CompileError(f"--scaler-auth must be 'bearer' or 'none', got {opts.scaler_auth!r}")
    for key, value in opts.monitor_labels.items():
        _check_label(key, value, "--monitor-label")
    if not 0 < opts.alert_5xx_percent <= 100:
        raise CompileError(f"--alert-5xx-percent must be more than 0 and at most 100, got {opts.alert_5xx_percent:g}")
    if not 0 < opts.alert_p99_seconds <= 86400:
        raise CompileError(f"--alert-p99-seconds must be more than 0 (and at most a day), "
                           f"got {opts.alert_p99_seconds:g}")


def _check_routing_options(opts: CompileOptions) -> None:
    """The routing options: Gateway or Ingress, hostnames, the route timeout."""
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


def gateway_api_release(version: str) -> tuple[int, int]:
    """``1.2``, ``v1.2`` or ``v1.2.0`` as (1, 2); raises CompileError naming --gateway-api-version."""
    m = re.match(r"^v?([0-9]+)\.([0-9]+)(\.[0-9]+)?$", version)
    if m is None or int(m.group(1)) != 1:
        raise CompileError(f"--gateway-api-version {version!r} must be a Gateway API release like 1.2 (v1.0 or later: "
                           "HTTPRoute gateway.networking.k8s.io/v1)")
    return int(m.group(1)), int(m.group(2))


def _check_network_options(opts: CompileOptions) -> None:
    """NetworkPolicy peers and DNS egress, and the Gateway API release."""
    import ipaddress

    for opt, values in (("--http-from-namespace", opts.http_from_namespaces),
                        ("--metrics-namespace", opts.metrics_from_namespaces),
                        ("--dns-namespace", (opts.dns_namespace,))):
        for ns in values:
            any_ok = ns == "*" and opt != "--dns-namespace"
            if not any_ok and (not _DNS1123_LABEL.match(ns) or len(ns) > 63):
                raise CompileError(f"{opt} {ns!r} is not a valid namespace name (or '*' for any)")
    for opt, cidrs in (("--http-from-cidr", opts.http_from_cidrs), ("--dns-cidr", opts.dns_cidrs)):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise CompileError(f"{opt} {cidr!r} is not a CIDR like 169.254.20.10/32") from None
            if "/" not in cidr:
                raise CompileError(f"{opt} {cidr!r} needs a prefix length, e.g. {cidr}/32")
    if not opts.dns_ports:
        raise CompileError("--dns-port: give at least one port")
    for port in opts.dns_ports:
        if not 1 <= port <= 65535:
            raise CompileError(f"--dns-port {port} is not a port number (1-65535)")
    for key, value in opts.dns_pod_labels.items():
        if not _qualified_name(key) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise CompileError(f"--dns-pod-label {key}={value!r} is not a valid label")
    gateway_api_release(opts.gateway_api_version)


def _check_canary_options(opts: CompileOptions) -> None:
    """A canary build: its version, the old one, the Gateway that splits traffic, the weight."""
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


def _qualified_name(name: str) -> bool:
    prefix, _, rest = name.rpartition("/")
    if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
        return False
    return bool(rest) and len(rest) <= 63 and bool(_LABEL_NAME.match(rest))


def _check_label(key: str, value: str, option: str = "--label") -> None:
    if key in RESERVED_LABELS:
        raise CompileError(f"{option} {key}: shoal sets this label itself")
    if not _qualified_name(key):
        raise CompileError(f"{option} {key!r}: not a valid label key (prefix/name, e.g. team or example.com/team)")
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise CompileError(f"{option} {key}={value!r}: not a valid label value (at most 63 letters, digits, '-_.')")


# --------------------------------------------------------------------------------------------
# The compiler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPCPlan:
    """The build's gRPC (compiler.grpc_ingress): the config's ``grpc_options`` (JSON form), the Service
    port, whether the HTTP port (so the gRPC one) has TLS, and whether this app's GRPCRoute takes
    the calls that name no application."""

    options: Mapping[str, Any]
    port: int
    tls: bool
    default_route: bool = True

    def config(self) -> dict[str, Any]:
        """``grpc_options`` as the pods read them (the ConfigMap's): on the pods' gRPC port."""
        return {**self.options, "port": names.GRPC_PORT}


@dataclass
class AppContext:
    """What every builder below needs about one application."""

    spec: AppSpec
    opts: CompileOptions
    app: str  # the application's name as users know it (part-of)
    instance: str  # the name the pods run under (app, or app-version for a canary)
    version: str
    canary: bool
    entry: Mapping[str, Any]
    warnings: list[str]
    # Inline http_options.api_keys: kept out of the ConfigMap, in the API-keys Secret.
    api_keys: tuple[str, ...] = ()
    # Each deployment's own version label when --version is not given (compiler.workloads.deployment_hashes):
    # a change to one deployment relabels (and rolls) only its own objects.
    dep_versions: dict[str, str] = field(default_factory=dict)
    # The build's grpc_options when they start gRPC (compiler.grpc_ingress); None: no gRPC.
    grpc: GRPCPlan | None = None

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
            L_VERSION: self.dep_versions.get(dep, self.version) if dep is not None else self.version,
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



def check_reserved(ctx: AppContext, label: str, name: str, what: str) -> None:
    """No deployment of the app may take the pod label or the object name of a per-app pod that
    the compiler adds (``what``: "the application's scaler", ...)."""
    for dep in ctx.spec.deployments:
        if label_value(dep) == label:
            raise CompileError(f"application {ctx.app!r}: deployment {dep!r} takes the label of {what}'s pods "
                               f"({label!r}); rename the deployment")
        if ctx.workload(dep) == name:
            raise CompileError(f"application {ctx.app!r}: deployment {dep!r} maps to {name!r}, the name of "
                               f"{what}; rename the deployment")
