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

# Environment of a replica container.
ENV_DEPLOYMENT = "SHOAL_DEPLOYMENT"  # the deployment this pod serves
ENV_APP = "SHOAL_APP"  # the application name
ENV_CONFIG = "SHOAL_CONFIG"  # path of the serve config file (mounted from the app's ConfigMap)
ENV_NAMESPACE = "SHOAL_NAMESPACE"  # from the downward API (metadata.namespace)
ENV_POD_NAME = "SHOAL_POD_NAME"  # metadata.name
ENV_POD_IP = "SHOAL_POD_IP"  # status.podIP; the address the pod listens on
ENV_SECRET = "SHOAL_RPC_SECRET"  # the internal RPC secret, from a Secret via secretKeyRef
ENV_CLUSTER_DOMAIN = "SHOAL_CLUSTER_DOMAIN"  # default "cluster.local"
# Test hook for the pod simulation: a JSON file {"dns name": ["ip", ...]} consulted instead of
# getaddrinfo, rewritten by the simulator as pods come and go (what cluster DNS does for
# headless Services). Never set by the compiler.
ENV_RESOLVER_FILE = "SHOAL_RESOLVER_FILE"

CONFIG_MOUNT_DIR = "/etc/shoal"
CONFIG_FILE_NAME = "serve.yaml"
SECRET_KEY = "rpc-secret"

# Metrics the KEDA / HPA autoscalers read (exposed on ADMIN_PORT /metrics).
# Ongoing requests in a replica (running + queued in it), labels: app, deployment.
METRIC_ONGOING = "shoal_replica_ongoing_requests"
# Requests a caller holds for a deployment it cannot reach yet (e.g. scaled to zero),
# labels: app, deployment (the callee).
METRIC_CALLER_QUEUED = "shoal_handle_queued_requests"

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


def headless_service_name(app: str, deployment: str) -> str:
    return workload_name(app, deployment)


def ingress_service_name(app: str) -> str:
    """ClusterIP Service in front of the ingress deployment's HTTP port."""
    return dns_label(app, "http")


def secret_name(app: str) -> str:
    return dns_label(app, "rpc")


def config_map_name(app: str) -> str:
    return dns_label(app, "config")


def service_dns(app: str, deployment: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The DNS name a caller resolves to find a deployment's pods (A records of the headless Service)."""
    return f"{headless_service_name(app, deployment)}.{namespace}.svc.{cluster_domain}"
