"""The pure heart of the controller: desired replicas + observed replicas -> actions.

No I/O, no clocks: the controller feeds in what it sees and executes what comes out, and
the unit tests compare action lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    version: str
    state: ReplicaState
    rank: int = -1  # Ray's replica rank (-1: none); scaling down stops the highest first


@dataclass(frozen=True)
class StartReplica:
    version: str


@dataclass(frozen=True)
class StopReplica:
    replica_id: str
    reason: str


Action = StartReplica | StopReplica

_LIVE = (ReplicaState.STARTING, ReplicaState.RUNNING)


def reconcile(target: int, version: str, replicas: list[ReplicaView], can_start: bool = True) -> list[Action]:
    """Plan the steps that move one deployment toward ``target`` replicas of ``version``.

    Rolling: replicas of an older version keep serving until enough replicas of the new
    version are RUNNING, then retire one for each new one that is ready.
    """
    actions: list[Action] = []
    current = [r for r in replicas if r.version == version and r.state in _LIVE]
    old = [r for r in replicas if r.version != version and r.state in _LIVE]

    if len(current) < target and can_start:
        actions.extend(StartReplica(version) for _ in range(target - len(current)))
    elif len(current) > target:
        # Retire replicas that are still starting first: they serve nobody yet.
        # Then the highest ranks, so that the ranks left stay 0..target-1.
        extra = sorted(current, key=lambda r: (r.state != ReplicaState.STARTING, -r.rank, r.replica_id))
        actions.extend(StopReplica(r.replica_id, "scaling down") for r in extra[: len(current) - target])

    old_starting = [r for r in old if r.state == ReplicaState.STARTING]
    old_running = [r for r in old if r.state == ReplicaState.RUNNING]
    actions.extend(StopReplica(r.replica_id, "replaced by a new version") for r in old_starting)
    running_new = sum(1 for r in current if r.state == ReplicaState.RUNNING)
    # Keep at least `target` replicas serving while the new version comes up.
    if target == 0:
        removable = len(old_running)
    elif not can_start and running_new == 0:
        removable = 0  # the new version cannot start: keep the old one serving
    else:
        removable = max(0, running_new + len(old_running) - target)
    retire = sorted(old_running, key=lambda r: r.replica_id)[:removable]
    actions.extend(StopReplica(r.replica_id, "replaced by a new version") for r in retire)
    return actions


@dataclass(frozen=True)
class DeploymentFacts:
    """What the status of one deployment is decided from (counts of its replicas)."""

    target: int
    ready_once: bool
    failures: int
    scaling: str  # "UPSCALING" / "DOWNSCALING" while an autoscaling decision is carried out, else ""
    running: int  # of the current version, RUNNING
    current: int  # of the current version, not STOPPING
    others: int  # of other versions, any state


def deployment_status(f: DeploymentFacts, max_start_failures: int) -> DeploymentStatus:
    """HEALTHY once exactly ``target`` current replicas run and no old one is left."""
    if not f.ready_once and f.failures >= max_start_failures:
        return DeploymentStatus.DEPLOY_FAILED
    if f.running == f.target == f.current and f.others == 0:
        return DeploymentStatus.HEALTHY
    if f.scaling and f.ready_once:
        return DeploymentStatus.UPSCALING if f.scaling == "UPSCALING" else DeploymentStatus.DOWNSCALING
    if f.ready_once and f.running == 0 and f.target > 0 and f.others == 0:
        return DeploymentStatus.UNHEALTHY
    return DeploymentStatus.UPDATING


def application_status(current: ApplicationStatus, deployments: set[DeploymentStatus]) -> ApplicationStatus:
    """An app's status from its deployments'. Autoscaling, or replacing a crashed replica,
    keeps a running app RUNNING; a (re)deploy that is rolling out shows DEPLOYING."""
    if DeploymentStatus.DEPLOY_FAILED in deployments:
        return ApplicationStatus.DEPLOY_FAILED
    if DeploymentStatus.UNHEALTHY in deployments:
        return ApplicationStatus.UNHEALTHY
    if DeploymentStatus.UPDATING in deployments and current != ApplicationStatus.RUNNING:
        return ApplicationStatus.DEPLOYING
    return ApplicationStatus.RUNNING


def make_room(version: str, replicas: list[ReplicaView]) -> str | None:
    """The old-version replica to retire when a new version has no room to start while the
    old one holds the resources (e.g. every GPU): one at a time (none while one is already
    stopping), a replica that is still starting before one that serves."""
    old = [r for r in replicas if r.version != version]
    if not old or any(r.state == ReplicaState.STOPPING for r in old):
        return None
    return min(old, key=lambda r: (r.state == ReplicaState.RUNNING, r.replica_id)).replica_id
