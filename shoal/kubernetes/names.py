"""The contract between the Kubernetes compiler and the pod runtime.

The compiler writes objects using these names, ports and environment variables; ``shoal
replica`` (the container's command) reads them. Change both sides together.
"""

from __future__ import annotations

import hashlib
import re

# Ports every shoal pod uses (container ports; Services map the same numbers).
RPC_PORT = 9000  # framed RPC between deployments (shoal.runtime.wire over TCP)
HTTP_PORT = 8000  # HTTP on the ingress deployment's pods only
ADMIN_PORT = 8001  # /-/healthz (liveness), /-/ready (readiness), /metrics on every pod
# gRPC (grpc_options) on the pods that serve the app's HTTP ingress (and its holding front); not
# grpc_options.port, which is the port of the app's Service (Ray's default 9000 is RPC_PORT here).
GRPC_PORT = 9001
# Gang replicas: rank 0 (the LeaderWorkerSet's leader) listens here for torch.distributed's
# env:// rendezvous (MASTER_PORT); every pod has its own network namespace, so one fixed port.
RENDEZVOUS_PORT = 29500

# Environment of a replica container.
ENV_DEPLOYMENT = "SHOAL_DEPLOYMENT"  # the deployment this pod serves
ENV_APP = "SHOAL_APP"  # the application name
ENV_CONFIG = "SHOAL_CONFIG"  # path of the serve config file (mounted from the app's ConfigMap)
ENV_NAMESPACE = "SHOAL_NAMESPACE"  # from the downward API (metadata.namespace)
ENV_POD_NAME = "SHOAL_POD_NAME"  # metadata.name
ENV_POD_IP = "SHOAL_POD_IP"  # status.podIP; the address the pod listens on
ENV_SECRET = "SHOAL_RPC_SECRET"  # the internal RPC secret, from a Secret via secretKeyRef
# During a rotation, the previous RPC secret, still accepted (secretKeyRef, optional).
ENV_SECRET_PREVIOUS = "SHOAL_RPC_SECRET_PREVIOUS"
# The directory holding tls.crt, tls.key and ca.crt (the app's kubernetes.io/tls Secret, mounted).
ENV_TLS_DIR = "SHOAL_TLS_DIR"
# The name of that Secret, for error messages only.
ENV_TLS_SECRET = "SHOAL_TLS_SECRET"
# Development only: plain TCP between pods (`shoal k8s build --tls off`).
ENV_INSECURE_NO_TLS = "SHOAL_INSECURE_NO_TLS"
# Ingress pods only: the file of HTTP API keys (the app's API-keys Secret, mounted).
ENV_API_KEYS_FILE = "SHOAL_API_KEYS_FILE"
# Pods serving gRPC: the application's name as gRPC clients give it in the `application` metadata
# (the app's own name; the pods of a canary run under another one).
ENV_GRPC_APP = "SHOAL_GRPC_APP"
ENV_CLUSTER_DOMAIN = "SHOAL_CLUSTER_DOMAIN"  # default "cluster.local"
# Gang replicas: the LeaderWorkerSet's name. LWS names rank i's pod "<leader pod name>-<i>"
# and gives it that hostname under a headless Service named after the LWS (the DNS name
# "<pod>.<gang>.<namespace>.svc.<domain>"), which is how rank 0 finds ranks 1..N-1.
ENV_GANG = "SHOAL_GANG"
# Test hook for the pod simulation: a JSON file {"dns name": ["ip", ...]} consulted instead of
# getaddrinfo, rewritten by the simulator as pods come and go (what cluster DNS does for
# headless Services). Never set by the compiler.
ENV_RESOLVER_FILE = "SHOAL_RESOLVER_FILE"
# Test hook for the pod simulation: the address other pods reach this pod at (what its DNS records
# say) where the simulation holds it and the container listens on another (sim.firewall); in a
# cluster both are status.podIP. Never set by the compiler.
ENV_POD_ADDRESS = "SHOAL_POD_ADDRESS"

# What the LeaderWorkerSet controller gives every pod of a group (leaderworkerset.x-k8s.io/v1):
# environment variables, prepended to each container's own (so "$(LWS_WORKER_INDEX)" expands in
# them), and labels.
ENV_LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"  # "<leader pod>.<lws>.<namespace>"
ENV_LWS_GROUP_SIZE = "LWS_GROUP_SIZE"  # pods per group (= world_size)
ENV_LWS_WORKER_INDEX = "LWS_WORKER_INDEX"  # 0 for the leader, 1..N-1 for the workers
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_LABEL_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_LABEL_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
LWS_LABEL_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_LABEL_GROUP_KEY = "leaderworkerset.sigs.k8s.io/group-key"
LWS_LABEL_REVISION = "leaderworkerset.sigs.k8s.io/template-revision-hash"

CONFIG_MOUNT_DIR = "/etc/shoal"
CONFIG_FILE_NAME = "serve.yaml"
SECRET_KEY = "rpc-secret"
SECRET_KEY_PREVIOUS = "rpc-secret-previous"
# Not under CONFIG_MOUNT_DIR: a mount point inside a read-only ConfigMap volume cannot be created.
TLS_MOUNT_DIR = "/etc/shoal-tls"
TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE = "tls.crt", "tls.key", "ca.crt"
API_KEYS_MOUNT_DIR = "/etc/shoal-api-keys"
API_KEYS_KEY = "api-keys"

# Metrics the KEDA / HPA autoscalers read (exposed on ADMIN_PORT /metrics).
# Ongoing requests in a replica (running + queued in it), labels: app, deployment.
METRIC_ONGOING = "shoal_replica_ongoing_requests"
# Requests a caller holds for a deployment it cannot reach yet (e.g. scaled to zero),
# labels: app, deployment (the callee).
METRIC_CALLER_QUEUED = "shoal_handle_queued_requests"
# Custom autoscaling metrics a replica reports (record_autoscaling_stats), labels: app,
# deployment, metric; read by the shoal scaler when present.
METRIC_AUTOSCALING_CUSTOM = "shoal_replica_autoscaling_metric"

# The per-application shoal scaler (shoal.kubernetes.scaler): its HTTP port (KEDA's metrics-api
# trigger reads /scale/<deployment>; callers POST /demand/<deployment>), and the environment
# telling replica pods where it is and how long to hold requests for a deployment with no pod.
SCALER_PORT = 8002
ENV_SCALER_URL = "SHOAL_SCALER_URL"  # http://<scaler Service>.<namespace>.svc.<domain>:SCALER_PORT
ENV_WAKE_TIMEOUT = "SHOAL_WAKE_TIMEOUT_S"  # seconds; default DEFAULT_WAKE_TIMEOUT_S
DEFAULT_WAKE_TIMEOUT_S = 120.0
# --scaler-auth bearer: the token the scaler requires (Authorization: Bearer) on /scale, /demand and
# /status, in the scaler pod and the replica pods (which post demand), from the Secret
# scaler_token_secret_name(app), key SCALER_TOKEN_KEY (KEDA reads the same key).
ENV_SCALER_TOKEN = "SHOAL_SCALER_TOKEN"
SCALER_TOKEN_KEY = "token"
# Requests a caller failed because no pod of the callee became ready within the wake deadline
# (a counter, exposed with _total), labels: app, deployment (the callee).
METRIC_WAKE_TIMEOUTS = "shoal_handle_wake_timeouts"


def scaler_name(app: str) -> str:
    """Name of the scaler's Deployment and ClusterIP Service of application ``app``."""
    return dns_label(app, "shoal-scaler")


def front_name(app: str) -> str:
    """Name of the holding front's Deployment and headless Service of application ``app`` (built
    when its HTTP ingress scales to zero: ``shoal front``); the scaler scrapes it by this name."""
    return dns_label(app, "shoal-front")

_DNS1035 = re.compile(r"[^a-z0-9-]+")


def dns_label(*parts: str, max_len: int = 63) -> str:
    """A DNS-1035 label built from ``parts`` (lowercase, dashes; hashed suffix when too long).

    Two deployments whose names differ only in case or punctuation map to the same label;
    the compiler refuses such apps with an error naming both.
    """
    raw = "-".join(p for p in parts if p)
    name = _DNS1035.sub("-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = "s-" + name
    if len(name) > max_len:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:6]
        name = name[: max_len - 7].rstrip("-") + "-" + digest
    return name


def workload_name(app: str, deployment: str) -> str:
    """Name of the Deployment (and its headless Service) for one shoal deployment."""
    return dns_label(app, deployment)


def gang_name(app: str, deployment: str) -> str:
    """Name of the LeaderWorkerSet of a gang deployment (and of the headless Service LWS makes
    for it). Not the workload name: that one stays the deployment's own headless Service, which
    lists ready leaders only, while LWS's lists every rank, ready or not, for the rendezvous.
    Short enough for LWS's derived names: pods "<gang>-<group>-<rank>", StatefulSets and their
    revision labels."""
    return dns_label(app, deployment, "gang", max_len=40)


def headless_service_name(app: str, deployment: str) -> str:
    return workload_name(app, deployment)


def ingress_service_name(app: str) -> str:
    """ClusterIP Service in front of the ingress deployment's HTTP port."""
    return dns_label(app, "http")


def secret_name(app: str) -> str:
    return dns_label(app, "rpc")


def tls_secret_name(app: str) -> str:
    """The ``kubernetes.io/tls`` Secret every pod of ``app`` mounts (pod certificate and CA bundle)."""
    return dns_label(app, "rpc-tls")


def scaler_token_secret_name(app: str) -> str:
    """The Secret holding the bearer token of the application's scaler (``--scaler-auth bearer``)."""
    return dns_label(app, "scaler-token")


def api_keys_secret_name(app: str) -> str:
    """The Secret holding the HTTP API keys, mounted into the ingress pods only."""
    return dns_label(app, "api-keys")


def config_map_name(app: str) -> str:
    return dns_label(app, "config")


def rank_dns(leader_pod: str, rank: int, gang: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The DNS name of one rank's pod of a gang (rank 0 is the leader pod itself)."""
    host = leader_pod if rank == 0 else f"{leader_pod}-{rank}"
    return f"{host}.{gang}.{namespace}.svc.{cluster_domain}"


def service_dns(app: str, deployment: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The DNS name a caller resolves to find a deployment's pods (A records of the headless Service)."""
    return f"{headless_service_name(app, deployment)}.{namespace}.svc.{cluster_domain}"
