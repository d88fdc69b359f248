"""Health checks: which replicas are due, and what a check's result means. Pure decisions
(``now`` is passed in); the controller runs the checks and acts on the outcome."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from shoal.runtime.controller.records import MAX_HEALTH_FAILURES, ReplicaRecord
from shoal.status import ReplicaState


def phase(replica_id: str) -> float:
    """A fixed fraction in [0, 1) for a replica, to spread its periodic work (health checks,
    ``/proc`` reads) over the period: replicas started together do not all fall due in one tick."""
    return (zlib.crc32(replica_id.encode()) & 0xFFFF) / 0x10000


def first_check(replica_id: str, now: float, period_s: float) -> float:
    """When a replica that just became ready is first checked: between half a period and a
    period from ``now``, by its :func:`phase` (the later checks keep that spread)."""
    return now + period_s * (0.5 + 0.5 * phase(replica_id))


def due(rec: ReplicaRecord, now: float) -> bool:
    """Whether a check of ``rec`` should start now: it runs, is connected, has no check in
    flight, and its period has passed."""
    return rec.state == ReplicaState.RUNNING and rec.conn is not None and not rec.health_busy \
        and now >= rec.next_health


@dataclass(frozen=True)
class Verdict:
    """What one check concluded: the failures in a row, and whether to replace the replica."""

    failures: int
    replace: bool


def record(rec: ReplicaRecord, ok: bool, now: float, period_s: float,
           max_failures: int = MAX_HEALTH_FAILURES) -> Verdict:
    """Account one finished check of ``rec`` and schedule the next one."""
    rec.health_failures = 0 if ok else rec.health_failures + 1
    rec.health_busy = False
    rec.next_health = now + period_s
    replace = not ok and rec.health_failures >= max_failures and rec.state == ReplicaState.RUNNING
    return Verdict(rec.health_failures, replace)
