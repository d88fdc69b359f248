"""The control-plane messages (controller <-> replicas, proxies, clients, CLI): frozen
dataclasses, each carrying an id for tracing and request/reply matching. :mod:`shoal.runtime.wire`
carries them (and re-exports them: import them from either)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shoal.observability.buckets import LATENCY_BUCKETS_MS as _LATENCY_BUCKETS_MS


class Role(StrEnum):
    """What a process connecting to the controller is (the first field of its ``Hello``)."""

    REPLICA = "replica"  # a replica process, a spare or a rank of a gang
    PROXY = "proxy"
    CLIENT = "client"  # a driver (``serve.run``) or the CLI


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    process_id: str  # replica id, proxy id, or a client name
    pid: int = 0
    # A replica or proxy reconnecting to a restarted controller, already serving (adoption).
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class ReplicaInit:
    app: str
    deployment: str
    replica_id: str
    blob: bytes
    config: Any  # DeploymentConfig
    is_function: bool
    socket_path: str
    serves_http: bool = False  # an ingress replica given the HTTP socket
    # Where the app's code was deployed from (``shoal deploy``): prepended to sys.path / the cwd.
    sys_path: tuple[str, ...] = ()
    cwd: str = ""
    # Gang replicas: this process's rank, the gang's size, and (rank 0 only) the sockets of
    # ranks 1..N-1, to which rank 0 sends every request it gets.
    rank: int = 0
    world_size: int = 1
    peers: tuple[str, ...] = ()
    # Ray's replica ranks (not a gang): the replica's rank in its deployment (-1: none) and the
    # deployment's replica count. Updated later by the "world_size" control call.
    replica_rank: int = -1
    num_replicas: int = 0
    # An ingress replica that serves gRPC itself on the shared gRPC port: (GRPCFrontOptions,
    # FrontOptions: the HTTP port's API keys, limits and TLS); None: it does not.
    grpc: Any = None


@dataclass(frozen=True, slots=True)
class ReplicaReady:
    replica_id: str
    pid: int


@dataclass(frozen=True, slots=True)
class ReplicaFailed:
    replica_id: str
    error: str


@dataclass(frozen=True, slots=True)
class ReplicaModels:
    """A replica's multiplexed models changed (loaded or evicted)."""

    replica_id: str
    model_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Subscribe:
    app: str
    deployment: str


@dataclass(frozen=True, slots=True)
class ReplicaEndpoint:
    replica_id: str
    endpoint: str  # where it listens: a Unix socket path, or host:port in a cluster
    max_ongoing: int
    model_ids: tuple[str, ...] = ()  # multiplexed models the replica holds


@dataclass(frozen=True, slots=True)
class Membership:
    app: str
    deployment: str
    # Grows with every push, across controller restarts too: a router ignores an older epoch.
    epoch: int
    replicas: tuple[ReplicaEndpoint, ...]
    max_queued_requests: int = -1
    # The deployment no longer exists (app deleted or instance shutting down).
    gone: str = ""
    # How often callers report their load for autoscaling (0: the deployment does not autoscale).
    metrics_interval_s: float = 0.0
    # How long a request may wait for a free replica before BackPressureError (0: no bound).
    max_queue_wait_s: float = 0.0
    # A custom request router: its RequestRouterConfig, cloudpickled (b"": shoal's own routing).
    request_router: bytes = b""
    # What each replica's record_routing_stats() last returned, by replica id (custom routers only).
    routing_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandleStats:
    """A caller's load on one deployment: requests waiting for a replica, and in flight."""

    app: str
    deployment: str
    queued: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class Routes:
    # route_prefix -> (app name, ingress deployment name)
    table: dict[str, tuple[str, str]] = field(default_factory=dict)
    # False while every routed app has ingress replicas serving HTTP themselves.
    proxy_accepts: bool = True
    # Canary releases: route_prefix -> (canary app key, its ingress, percent of traffic).
    split: dict[str, tuple[str, str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubscribeRoutes:
    """An ingress replica that serves HTTP itself wants the route table too."""


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """A replica's load (requests running or waiting in it, for autoscaling) and, since it
    started, the requests it finished: count, failures and a latency histogram
    (``LATENCY_BUCKETS_MS``), from which per-version metrics are summed."""

    replica_id: str
    ongoing: int
    requests: int = 0
    errors: int = 0
    latency_hist: tuple[int, ...] = ()
    # What the deployment's record_autoscaling_stats() returned ((name, value), ...), if it has one.
    custom: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicaRoutingStats:
    """What a replica's ``record_routing_stats()`` returned (deployments with a custom request
    router only; sent when it changed). The controller passes it on in the membership."""

    replica_id: str
    stats: dict[str, Any]


# Upper bounds (ms) of the latency histogram replicas report (the same as the Prometheus
# histograms'); the last bucket is open. Re-exported here: replicas import it from this module.
LATENCY_BUCKETS_MS = _LATENCY_BUCKETS_MS


@dataclass(frozen=True, slots=True)
class ProxyReady:
    process_id: str
    port: int


@dataclass(frozen=True, slots=True)
class Call:
    """A request/reply on the control plane (health checks, reconfigure, admin commands)."""

    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Stop:
    """Ask a replica or proxy to drain and exit."""

    reason: str = ""
