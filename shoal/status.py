"""Status objects returned by ``serve.status()``, with Ray Serve's names and values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "ProxyStatus",
    "ReplicaState",
    "ServeStatus",
    "summarize_requests",
]


class ApplicationStatus(StrEnum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(StrEnum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(StrEnum):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    PENDING_MIGRATION = "PENDING_MIGRATION"


class ProxyStatus(StrEnum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"


@dataclass
class DeploymentStatusOverview:
    status: DeploymentStatus
    replica_states: dict[str, int] = field(default_factory=dict)
    message: str = ""
    status_trigger: str = ""
    # shoal: the code version running, the replica count aimed at, and the requests this
    # version's replicas finished (count, errors, latency percentiles).
    version: str = ""
    target_replicas: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)
    route_prefix: str | None = None
    ingress: str = ""
    # shoal: the app's version (a hash of its code and options), requests its ingress finished
    # (count, errors, latency percentiles), and a canary release in progress, if any.
    version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] | None = None


@dataclass
class ServeStatus:
    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    # shoal: why a proxy is not HEALTHY, e.g. "restarting in 4 s (crashed 3 times)".
    proxy_messages: dict[str, str] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    target_capacity: float | None = None
    http_address: str = ""
    # shoal: where the gRPC ingress listens (host:port); "" when it serves no gRPC.
    grpc_address: str = ""
    # shoal: the machine's resources and what replicas hold (CPUs oversubscribed, GPUs shared).
    resources: str = ""

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Enum):
                return v.value
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(asdict(self))  # type: ignore[no-any-return]


def summarize_requests(requests: int, errors: int, hist: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Count, errors, error rate and latency percentiles (bucket upper bounds, in ms) from the
    histogram replicas report (``shoal.runtime.wire.LATENCY_BUCKETS_MS``)."""
    from shoal.runtime.wire import LATENCY_BUCKETS_MS

    out: dict[str, Any] = {"requests": requests, "errors": errors,
                           "error_rate": round(errors / requests, 4) if requests else 0.0}
    total = sum(hist)
    for q in (50, 95, 99):
        value: float | None = None
        if total:
            need = total * q / 100.0
            seen = 0
            for i, n in enumerate(hist):
                seen += n
                if seen >= need:
                    value = float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else float("inf")
                    break
        out[f"p{q}_ms"] = value
    return out
