"""One step of the controller's tick: replicas that cannot serve are taken out and replaced.

* a process stopped (SIGSTOP) for :data:`~shoal.runtime.controller.watchdog.STOPPED_AFTER_S`;
* a process whose resident memory exceeds its ``ray_actor_options["memory"]``;
* a replica whose constructor did not finish within its start timeout.

The watchdog decides (pure, with injected readers); :meth:`Lifecycle.evict` acts.
"""

from __future__ import annotations

from shoal.runtime.controller.lifecycle import Lifecycle
from shoal.runtime.controller.records import ReplicaRecord
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.watchdog import (
    Watchdog,
    Watched,
    memory_limit,
    start_deadline_message,
    start_overdue,
    start_timeout,
)
from shoal.status import ReplicaState

_LIVE = (ReplicaState.STARTING, ReplicaState.RUNNING)


class ReplicaGuard:
    """Runs the watchdog over the live replicas and evicts the ones it (or a start deadline) names."""

    def __init__(self, registry: Registry, lifecycle: Lifecycle, watchdog: Watchdog | None = None) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.watchdog = watchdog or Watchdog()

    def tick(self, now: float) -> bool:
        """Evict what must go; True if any replica was evicted."""
        evicted = False
        live = [r for r in self.registry.replicas.values()
                if r.state in _LIVE and r.proc.poll() is None and not r.adopt_deadline]
        for rec in live:
            why = self._start_overdue(rec, now)
            if why:
                self.lifecycle.evict(rec, why, now)
                evicted = True
        limits: dict[tuple[str, str], int] = {}  # per deployment, once a tick
        watched = [Watched(r.replica_id, r.proc.pid, self._limit(r, limits)) for r in live if r.state in _LIVE]
        for finding in self.watchdog.scan(watched, now):
            found = self.registry.replicas.get(finding.replica_id)
            if found is not None:
                self.lifecycle.evict(found, finding.message, now)
                evicted = True
        return evicted

    def _limit(self, rec: ReplicaRecord, limits: dict[tuple[str, str], int]) -> int:
        if rec.ranks:
            return 0
        key = (rec.app, rec.deployment)
        limit = limits.get(key)
        if limit is None:
            dep = self.registry.deployment(rec.app, rec.deployment)
            limit = limits[key] = memory_limit(dep.spec.config) if dep is not None else 0
        return limit

    def _start_overdue(self, rec: ReplicaRecord, now: float) -> str:
        if rec.state != ReplicaState.STARTING or rec.adopted:
            return ""
        dep = self.registry.deployment(rec.app, rec.deployment)
        if dep is None:
            return ""
        timeout = start_timeout(dep.spec.config)
        return start_deadline_message(timeout) if start_overdue(rec.started_at, now, timeout) else ""
