"""The controller's records: what it knows of each app, deployment, replica, spare and proxy,
its settings and the limits it applies. Plain data, no behaviour beyond bookkeeping."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field

from shoal.config import HTTPOptions, gRPCOptions
from shoal.deployment import AppSpec, DeploymentSpec
from shoal.runtime.gang import RankRecord
from shoal.runtime.processes import Proc
from shoal.runtime.wire import FramedProtocol
from shoal.serving.app_policy import AppPolicy
from shoal.serving.autoscaling import Autoscaler
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState

# Constructor failures in a row (with no replica of that version ever ready) before giving up.
MAX_START_FAILURES = 3
# Failed health checks in a row before a replica is replaced.
MAX_HEALTH_FAILURES = 3
TICK_S = 0.05
# Crashes in a row before the proxy first serves after which serve.run/serve.start stop
# waiting for it (the controller keeps restarting it, see controller/backoff.py).
MAX_PROXY_RESTARTS = 5
# A restarted controller waits this long for a still-running replica to reconnect before
# it gives up on it (and starts a replacement).
ADOPT_WAIT_S = 10.0
# A spare is released when no replica has started for this long (``$SHOAL_SPARE_IDLE_S``).
SPARE_IDLE_S = 30.0
# A released spare that has not exited this long after its Stop is killed.
SPARE_STOP_S = 5.0


def spare_idle_from_env() -> float:
    """``$SHOAL_SPARE_IDLE_S``: seconds without a replica start after which spares are
    released (default 30); ``never`` keeps them for good."""
    text = os.environ.get("SHOAL_SPARE_IDLE_S", "").strip()
    if not text:
        return SPARE_IDLE_S
    if text.lower() == "never":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"SHOAL_SPARE_IDLE_S must be a number of seconds >= 0 or 'never', got {text!r}")
    return value


def fingerprint(spec: AppSpec) -> str:
    """The app's version: its deployments' code versions and options, and its ingress.

    Deploying a spec with the same fingerprint (and route prefix) changes nothing.
    """
    h = hashlib.sha256(spec.ingress.encode())
    for name in sorted(spec.deployments):
        d = spec.deployments[name]
        h.update(f"\0{name}\0{d.code_version}\0{d.config!r}".encode())
    return h.hexdigest()[:12]


@dataclass
class Settings:
    """Runtime settings of one instance, read once at start and passed down."""

    run_dir: str
    http: HTTPOptions = field(default_factory=HTTPOptions)
    start_proxy: bool = True
    # The gRPC ingress, served by the proxy process (None, or no servicer functions: none).
    grpc: gRPCOptions | None = None
    # Replica processes kept booted (imports done) and waiting for a deployment, so that a
    # new replica skips interpreter start-up: cold start, scale-up and recovery get faster.
    spare_replicas: int = 1
    # ... released (stopped) when no replica has started for this long, and started again
    # with the next replica start: an instance that stays the same size gives the memory back.
    spare_idle_s: float = field(default_factory=spare_idle_from_env)
    # GPUs to account for: None finds them with nvidia-smi; a number declares that many.
    num_gpus: int | None = None
    # Refuse to place replicas whose num_cpus exceed the machine's (off: record and warn).
    strict_cpus: bool = False
    die_with_parent: bool = True
    log_level: str = "INFO"
    python: str = sys.executable
    # A detached instance (``shoal start``): desired state and processes are kept in this
    # SQLite file, and a controller started later adopts what still runs. "" = embedded.
    state_path: str = ""


@dataclass
class RequestTotals:
    requests: int = 0
    errors: int = 0
    hist: list[int] = field(default_factory=list)

    def add(self, requests: int, errors: int, hist: tuple[int, ...] | list[int]) -> None:
        self.requests += requests
        self.errors += errors
        if len(self.hist) < len(hist):
            self.hist.extend([0] * (len(hist) - len(self.hist)))
        for i, n in enumerate(hist):
            self.hist[i] += n


@dataclass(eq=False)
class ReplicaRecord:
    replica_id: str
    app: str
    deployment: str
    version: str
    socket_path: str
    proc: Proc
    state: ReplicaState = ReplicaState.STARTING
    conn: FramedProtocol | None = None
    started_at: float = 0.0
    stop_deadline: float = 0.0
    failed_reported: bool = False
    health_failures: int = 0
    next_health: float = 0.0
    health_busy: bool = False
    model_ids: tuple[str, ...] = ()
    serves_http: bool = False
    ongoing: int = 0
    stats_at: float = 0.0
    gpus: tuple[int, ...] = ()
    # Adopted from an earlier controller: not confirmed until it reconnects (by this time).
    adopted: bool = False
    adopt_deadline: float = 0.0
    # Requests it finished since it started (count, failures, latency histogram).
    requests: int = 0
    errors: int = 0
    latency_hist: tuple[int, ...] = ()
    # Gang replicas (rank 0's record): the other ranks, and whether rank 0 itself is ready.
    ranks: list[RankRecord] = field(default_factory=list)
    rank0_ready: bool = False
    # Ray's replica ranks: this replica's rank among its deployment's replicas of its version
    # (-1: none, a gang), and the replica count it was last told (world_size).
    replica_rank: int = -1
    told_world_size: int = 0


@dataclass(eq=False)
class DeploymentRecord:
    spec: DeploymentSpec
    version: str
    target: int
    status: DeploymentStatus = DeploymentStatus.UPDATING
    message: str = ""
    failures: int = 0
    ready_once: bool = False
    published: tuple[object, ...] | None = None
    autoscaler: Autoscaler | None = None
    scaling: str = ""  # "UPSCALING" / "DOWNSCALING" while an autoscaling decision is carried out
    resource_blocked: bool = False  # the last replica start found no room
    # Requests finished by this version's replicas that are gone (live ones are added on read).
    finished: RequestTotals = field(default_factory=RequestTotals)
    # A replica was taken out for a fault (stopped, over its memory): UNHEALTHY until the
    # deployment is HEALTHY again. The last such fault and when (monotonic), kept for status.
    unhealthy: bool = False
    fault: str = ""
    fault_at: float = 0.0
    # While replicas start: "waiting for 1 replica: constructor running for 12 s".
    waiting: str = ""


@dataclass(eq=False)
class AppRecord:
    spec: AppSpec
    deployments: dict[str, DeploymentRecord]
    status: ApplicationStatus = ApplicationStatus.DEPLOYING
    message: str = ""
    deployed_at: float = 0.0
    deleting: bool = False
    # The application-level autoscaling policy (spec.autoscaling_policy, loaded), if any.
    policy: AppPolicy | None = None


@dataclass(eq=False)
class SpareRecord:
    process_id: str
    proc: Proc
    conn: FramedProtocol | None = None
    # Set when it is released: killed if it has not exited by then.
    stop_deadline: float | None = None


@dataclass(eq=False)
class ProxyRecord:
    process_id: str
    proc: Proc
    conn: FramedProtocol | None = None
    ready: bool = False
    # Crashes in a row (the CrashLoopBackOff streak), when this process started, and when the
    # next one is due (None while this one runs).
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
