"""The pure heart of the controller: desired replicas + observed replicas -> actions.

No I/O, no clocks: the controller feeds in what it sees and executes what comes out, and
the unit tests compare action lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.status import ReplicaState


@dataclass(frozen=True)
class ReplicaView:
    tag: str
    version: str
    state: ReplicaState


@dataclass(frozen=True)
class StartReplica:
    version: str


@dataclass(frozen=True)
class StopReplica:
    tag: str
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
        extra = sorted(current, key=lambda r: (r.state != ReplicaState.STARTING, r.tag))
        actions.extend(StopReplica(r.tag, "scaling down") for r in extra[: len(current) - target])

    old_starting = [r for r in old if r.state == ReplicaState.STARTING]
    old_running = [r for r in old if r.state == ReplicaState.RUNNING]
    actions.extend(StopReplica(r.tag, "replaced by a new version") for r in old_starting)
    running_new = sum(1 for r in current if r.state == ReplicaState.RUNNING)
    # Keep at least `target` replicas serving while the new version comes up.
    if target == 0:
        removable = len(old_running)
    elif not can_start and running_new == 0:
        removable = 0  # the new version cannot start: keep the old one serving
    else:
        removable = max(0, running_new + len(old_running) - target)
    retire = sorted(old_running, key=lambda r: r.tag)[:removable]
    actions.extend(StopReplica(r.tag, "replaced by a new version") for r in retire)
    return actions
