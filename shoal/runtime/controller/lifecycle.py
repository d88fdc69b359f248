"""A replica's life after it started: ready, failed, stopping, gone (its process exited, or a
rank of its gang died), and what each step means for its deployment's record."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.health import first_check
from shoal.runtime.controller.records import DeploymentRecord, ReplicaRecord
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.gang import RankRecord
from shoal.runtime.state import Store
from shoal.runtime.wire import ReplicaFailed, ReplicaReady
from shoal.serving.resources import Ledger
from shoal.status import ReplicaState

logger = logging.getLogger("shoal.controller")

Publish = Callable[[str, str, DeploymentRecord], None]

# How many replicas that exited while starting are remembered (see Lifecycle._late_failure).
_EXITED_KEPT = 64


def constructor_failed(error: str) -> str:
    """The status message of a deployment whose replica's constructor raised: the error first,
    then the user's traceback (as the replica formatted it)."""
    return f"replica constructor failed: {error.strip()}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Lifecycle:
    """Replica state transitions. ``publish`` re-sends a deployment's membership when it
    changed; ``kick`` wakes the control loop."""

    def __init__(self, registry: Registry, supervisor: Supervisor, ledger: Ledger, store: Store,
                 metrics: ControllerMetrics, clock: Clock, publish: Publish, kick: Callable[[], None]) -> None:
        self.registry = registry
        self.supervisor = supervisor
        self.ledger = ledger
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.publish = publish
        self.kick = kick
        # Replicas seen exiting while they started, without a report: replica id -> (app,
        # deployment, version), so that a report arriving after the exit is still shown.
        self._exited_starting: dict[str, tuple[str, str, str]] = {}

    # -- exits
    def reap(self, now: float) -> bool:
        """Notice exited ranks and replicas (and kill the overdue ones); True if any went."""
        changed = False
        for member in list(self.registry.ranks.values()):
            code = member.proc.poll()
            if code is not None and member.replica_id in self.registry.ranks:
                self.rank_gone(member, f"exited with code {code}")
                changed = True
        for rec in list(self.registry.replicas.values()):
            code = self._exit_code(rec, now)
            if code is not None:
                self.gone(rec, f"exited with code {code}")
                changed = True
        return changed

    def _exit_code(self, rec: ReplicaRecord, now: float) -> int | None:
        code = rec.proc.poll()
        if code is None and rec.adopt_deadline and now > rec.adopt_deadline:
            logger.warning("replica %s (pid %d) did not reconnect after the controller restarted; replacing it",
                           rec.replica_id, rec.proc.pid)
            rec.adopt_deadline = 0.0
            self.supervisor.kill(rec.proc)
            code = rec.proc.returncode
        if code is None and rec.state == ReplicaState.STOPPING and now > rec.stop_deadline:
            logger.warning("replica %s did not stop in time; killing it", rec.replica_id)
            self.supervisor.kill(rec.proc)
            code = rec.proc.returncode
        return code

    def _forget_ranks(self, rec: ReplicaRecord) -> None:
        for member in rec.ranks:
            self.ledger.release(member.replica_id)
            self.supervisor.kill(member.proc)
            self.metrics.process_exited(member.proc.pid)
            self.store.delete_process(member.replica_id)
            _unlink(member.socket_path)

    def gone(self, rec: ReplicaRecord, why: str) -> None:
        """The replica is no more: release what it held, account its requests, note why."""
        if self.registry.remove(rec.replica_id) is None:
            return
        self.ledger.release(rec.replica_id)
        self.metrics.process_exited(rec.proc.pid)
        rec.adopt_deadline = 0.0
        self._forget_ranks(rec)
        self.store.delete_process(rec.replica_id)
        dep = self.registry.deployment(rec.app, rec.deployment)
        if dep is not None and dep.version == rec.version and rec.requests:
            dep.finished.add(rec.requests, rec.errors, rec.latency_hist)  # per version: only the current one
        if rec.proc.poll() is None:
            self.supervisor.kill(rec.proc)
        _unlink(rec.socket_path)
        if rec.state != ReplicaState.STOPPING:
            if not (rec.state == ReplicaState.STARTING and rec.failed_reported):  # (a failed start was logged)
                logger.warning("replica %s of %s/%s %s unexpectedly", rec.replica_id, rec.app, rec.deployment, why)
            if dep is not None and rec.state == ReplicaState.STARTING and not rec.failed_reported and not rec.adopted:
                if rec.version == dep.version:
                    dep.failures += 1
                    dep.message = (f"replica {rec.replica_id} {why} before it was ready (while its constructor "
                                   f"ran); its output: shoal logs {rec.app}/{rec.deployment}")
                    self._exited_starting[rec.replica_id] = (rec.app, rec.deployment, rec.version)
                    while len(self._exited_starting) > _EXITED_KEPT:
                        self._exited_starting.pop(next(iter(self._exited_starting)))
            elif dep is not None and not (rec.state == ReplicaState.STARTING and rec.failed_reported):
                # (A failed start already said why: its constructor's error is kept.)
                dep.message = f"replica {rec.replica_id} {why}; starting a replacement"
        if dep is not None:
            self.publish(rec.app, rec.deployment, dep)

    def rank_gone(self, member: RankRecord, why: str) -> None:
        """A rank of a gang died: the whole gang replica goes (and is replaced)."""
        parent = self.registry.replicas.get(member.parent)
        if parent is None:
            return
        dep = self.registry.deployment(parent.app, parent.deployment)
        if dep is not None and parent.state != ReplicaState.STOPPING:
            dep.message = f"rank {member.rank} of replica {parent.replica_id} {why}; replacing the whole gang"
            if parent.state == ReplicaState.STARTING and parent.version == dep.version:
                parent.failed_reported = True
                dep.failures += 1
        self.supervisor.kill(parent.proc)
        self.gone(parent, f"lost rank {member.rank} ({why})")

    # -- stopping
    def stop(self, rec: ReplicaRecord, reason: str, now: float) -> None:
        """Ask the replica (and its ranks) to stop gracefully; it is killed if it overstays."""
        if rec.state == ReplicaState.STOPPING:
            return
        for member in rec.ranks:
            self.supervisor.stop(member.proc, member.conn)
        dep = self.registry.deployment(rec.app, rec.deployment)
        grace = dep.spec.config.graceful_shutdown_timeout_s if dep else 20.0
        rec.state = ReplicaState.STOPPING
        rec.stop_deadline = now + grace + 5.0
        logger.debug("stopping replica %s: %s", rec.replica_id, reason)
        self.supervisor.stop(rec.proc, rec.conn)

    def evict(self, rec: ReplicaRecord, why: str, now: float) -> None:
        """Take out a replica that cannot serve (stopped, over its memory, not ready in time):
        out of the membership at once, then killed (its connections close, so requests in
        flight there fail at once); reconciling starts a replacement. A replica that was still
        starting counts as a failed start."""
        if rec.state == ReplicaState.STOPPING:
            return
        dep = self.registry.deployment(rec.app, rec.deployment)
        logger.warning("%s (pid %d, %s/%s)", why, rec.proc.pid, rec.app, rec.deployment)
        if dep is not None:
            if rec.state == ReplicaState.STARTING:
                if rec.version == dep.version and not rec.failed_reported and not rec.adopted:
                    dep.failures += 1
                dep.message = why
            else:
                dep.unhealthy = True
                dep.message = f"{why}; replacing it"
            dep.fault, dep.fault_at = why, now
        rec.failed_reported = True
        rec.state = ReplicaState.STOPPING
        rec.stop_deadline = now
        if dep is not None:
            self.publish(rec.app, rec.deployment, dep)
        for member in rec.ranks:
            self.supervisor.kill(member.proc)
        self.supervisor.kill(rec.proc)  # SIGKILL ends a stopped process too
        self.kick()

    # -- reports from the replicas
    def ready(self, msg: ReplicaReady) -> None:
        """A replica (or one rank of a gang) finished its constructor."""
        member = self.registry.ranks.get(msg.replica_id)
        if member is not None:
            member.ready = True
            parent = self.registry.replicas.get(member.parent)
            if parent is not None and parent.rank0_ready:
                self.ready(ReplicaReady(parent.replica_id, parent.proc.pid))
            return
        rec = self.registry.replicas.get(msg.replica_id)
        if rec is None or rec.state == ReplicaState.STOPPING:
            return
        rec.rank0_ready = True
        if not all(m.ready for m in rec.ranks):
            return  # a gang is ready when every rank is
        rec.state = ReplicaState.RUNNING
        rec.adopt_deadline = 0.0
        dep = self.registry.deployment(rec.app, rec.deployment)
        if dep is not None:
            rec.next_health = first_check(rec.replica_id, self.clock.monotonic(),
                                          dep.spec.config.health_check_period_s)
            if rec.version == dep.version:
                dep.ready_once = True
                dep.failures = 0
            self.publish(rec.app, rec.deployment, dep)
        self.kick()

    def failed(self, msg: ReplicaFailed) -> None:
        """A replica's (or a rank's) constructor raised."""
        member = self.registry.ranks.get(msg.replica_id)
        if member is not None:
            parent = self.registry.replicas.get(member.parent)
            dep = self.registry.deployment(parent.app, parent.deployment) if parent is not None else None
            if parent is not None and dep is not None and parent.version == dep.version:
                parent.failed_reported = True
                dep.failures += 1
                dep.message = f"rank {member.rank} constructor failed: {msg.error.strip()}"
            logger.error("rank %d of replica %s failed to start", member.rank, member.parent)
            self.supervisor.stop(member.proc, member.conn)  # it waits for this before it exits
            self.kick()
            return
        rec = self.registry.replicas.get(msg.replica_id)
        if rec is None:
            self._late_failure(msg)
            return
        rec.failed_reported = True
        dep = self.registry.deployment(rec.app, rec.deployment)
        if dep is not None and rec.version == dep.version:
            dep.failures += 1
            dep.message = constructor_failed(msg.error)
        logger.error("replica %s of %s/%s failed to start", rec.replica_id, rec.app, rec.deployment)
        # The replica waits for this Stop before it exits (so its exit never overtakes its report);
        # stopping, it no longer counts as a start in progress ("waiting for 1 replica").
        self.stop(rec, "its constructor failed", self.clock.monotonic())
        self.kick()

    def _late_failure(self, msg: ReplicaFailed) -> None:
        """A failed start reported after its process was seen gone (the replica gave up waiting
        for its Stop): the error replaces the "exited before it was ready" message."""
        known = self._exited_starting.pop(msg.replica_id, None)
        if known is None:
            return
        dep = self.registry.deployment(known[0], known[1])
        if dep is not None and dep.version == known[2]:
            dep.message = constructor_failed(msg.error)
            self.publish(known[0], known[1], dep)
            self.kick()
