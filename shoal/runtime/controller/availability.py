"""Whether a deployment can serve at all, and what its status says while it comes up. Pure
functions of its counts; the controller publishes the first as the membership's ``gone``
text (routers then refuse at once: HTTP 503, ``DeploymentUnavailableError``) and shows the
second as the status message of a deployment that is deploying."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.status import ReplicaState


@dataclass(frozen=True)
class Supply:
    """What a deployment has and can expect: its replicas' states (any version), its target,
    whether it failed to deploy, whether its recent starts all failed (a crash loop of a
    deployment that once ran), and whether the last start found no room (with why)."""

    states: tuple[ReplicaState, ...]
    target: int
    failed: bool
    message: str = ""
    pending: bool = False
    failing: bool = False


def first_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a (traceback) text, shortened: the error itself."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def unavailable(app: str, name: str, s: Supply) -> str:
    """Why requests for the deployment cannot be served now, nor soon ("" when they can, or
    when a replica is on its way): no replica runs, and it failed to deploy, its replicas
    keep failing to start, or none starts and there is no room to start one."""
    if ReplicaState.RUNNING in s.states:
        return ""
    where = f"deployment {name!r} of application {app!r}"
    if s.failed:
        return f"{where} failed to deploy: {first_line(s.message) or 'its replicas could not start'}"
    if s.failing:
        return f"{where} has no running replica and its last starts failed: {first_line(s.message)}"
    if ReplicaState.STARTING in s.states or ReplicaState.STOPPING in s.states or s.target == 0:
        return ""  # one is on its way (or the deployment scales from zero on demand)
    if s.pending:
        return f"{where} has no running replica: {first_line(s.message)}"
    return ""


def progress(starting_since: Iterable[float], running: int, target: int, now: float) -> str:
    """'waiting for 2 replicas: constructor running for 12 s' (the oldest start), "" if none."""
    ages = sorted((now - t for t in starting_since), reverse=True)
    missing = max(0, target - running)
    if not ages or not missing:
        return ""
    n = min(missing, len(ages))
    return f"waiting for {n} replica{'s' if n > 1 else ''}: constructor running for {ages[0]:.0f} s"


# How long a replica's last fault (stopped, over its memory) stays in a healthy deployment's status.
FAULT_SHOWN_S = 600.0


def status_message(message: str, waiting: str, fault: str, fault_age_s: float) -> str:
    """A deployment's status message: its event message and what it waits for; once healthy
    (no message), its last fault for :data:`FAULT_SHOWN_S`."""
    text = "; ".join(t for t in (message, waiting) if t)
    if text or not fault or fault_age_s >= FAULT_SHOWN_S:
        return text
    return f"{fault}, {fault_age_s:.0f} s ago"
