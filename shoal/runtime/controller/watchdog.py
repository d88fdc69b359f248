"""Watching replica processes from the outside: a process stopped (SIGSTOP, a debugger) that
can no longer answer, one that uses more memory than its ``ray_actor_options["memory"]``,
and one whose constructor does not finish in time.

The decisions are pure (``now`` and the readings are passed in); the readers of ``/proc``
are injected, so that the unit tests drive them with fakes. The controller acts on the
:class:`Finding` s (out of the membership at once, killed, replaced).

Memory is enforced by watching the resident set size (RSS) of the replica's process, polled
about once a second: this machine class (cgroup v1/v2 hybrids, no delegated cgroup v2 memory
controller) offers no writable ``memory.max``. A replica that allocates faster than the poll
can overshoot for up to :data:`MEMORY_POLL_S` before it is killed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal.config import DeploymentConfig
from shoal.runtime.controller.health import phase

logger = logging.getLogger("shoal.controller")

# How often a replica's process state (/proc/<pid>/stat) is read.
STOP_POLL_S = 0.5
# A process stopped this long is no longer served and is replaced (a short stop, e.g. a
# debugger's, or a SIGSTOP/SIGCONT pair, is tolerated).
STOPPED_AFTER_S = 2.0
# How often a replica's resident memory is read, when its deployment sets a memory limit.
MEMORY_POLL_S = 1.0
# A replica whose constructor has not finished after this long is killed, and the start
# counts as failed (``DeploymentConfig.replica_start_timeout_s`` or this variable override it).
DEFAULT_START_TIMEOUT_S = 300.0
START_TIMEOUT_ENV = "SHOAL_REPLICA_START_TIMEOUT_S"

STOPPED_STATES = frozenset({"T", "t"})

StateReader = Callable[[int], str | None]
RssReader = Callable[[int], int | None]

_MB = 1024 * 1024


def read_state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``R``, ``S``, ``T``...), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")".
    _, sep, rest = text.rpartition(")")
    return rest.split()[0] if sep and rest.split() else None


def read_rss(pid: int) -> int | None:
    """The resident set size of ``pid`` in bytes, None if there is none."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 2:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def megabytes(n: float) -> str:
    """``n`` bytes as whole megabytes (MiB): "200 MB"."""
    return f"{n / _MB:.0f} MB"


def memory_limit(config: DeploymentConfig) -> int:
    """The replica's memory limit in bytes (``ray_actor_options["memory"]``), 0 for none."""
    return int(config.ray_actor_options.memory or 0)


def start_timeout(config: DeploymentConfig, env: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Seconds a replica's constructor may take: the deployment's, else the variable's, else
    :data:`DEFAULT_START_TIMEOUT_S`."""
    if config.replica_start_timeout_s is not None:
        return float(config.replica_start_timeout_s)
    raw = env.get(START_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_START_TIMEOUT_S
    except ValueError:
        logger.warning("ignoring %s=%r: not a number of seconds", START_TIMEOUT_ENV, raw)
        return DEFAULT_START_TIMEOUT_S
    return value if value > 0 else DEFAULT_START_TIMEOUT_S


def start_overdue(started_at: float, now: float, timeout_s: float) -> bool:
    """Whether a replica started at ``started_at`` and still not ready has run out of time."""
    return now - started_at >= timeout_s


def start_deadline_message(timeout_s: float) -> str:
    return f"replica constructor did not finish within {timeout_s:g} s"


@dataclass(frozen=True)
class Watched:
    """One replica process to watch: its memory limit in bytes (0: none)."""

    replica_id: str
    pid: int
    memory_limit: int = 0


@dataclass(frozen=True)
class Finding:
    """A replica to take out and replace, and why (the status message)."""

    replica_id: str
    kind: str  # "stopped" or "memory"
    message: str


@dataclass
class _State:
    pid: int
    stopped_since: float | None = None
    next_state: float = 0.0
    next_memory: float = 0.0
    reported: bool = False


@dataclass
class Watchdog:
    """Reads each watched process's state every :data:`STOP_POLL_S` and its RSS every
    :data:`MEMORY_POLL_S`; :meth:`scan` reports each offending replica once."""

    read_state: StateReader = read_state
    read_rss: RssReader = read_rss
    stopped_after_s: float = STOPPED_AFTER_S
    _seen: dict[str, _State] = field(default_factory=dict)

    def scan(self, watched: Iterable[Watched], now: float) -> list[Finding]:
        out: list[Finding] = []
        present: set[str] = set()
        for w in watched:
            present.add(w.replica_id)
            st = self._seen.get(w.replica_id)
            if st is None or st.pid != w.pid:
                # Spread over the poll periods (replicas started together are not all read
                # in one tick); a replica is first read within one period.
                offset = phase(w.replica_id)
                st = self._seen[w.replica_id] = _State(w.pid, next_state=now + offset * STOP_POLL_S,
                                                       next_memory=now + offset * MEMORY_POLL_S)
            if st.reported:
                continue
            finding = self._check(w, st, now)
            if finding is not None:
                st.reported = True
                out.append(finding)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return out

    def _check(self, w: Watched, st: _State, now: float) -> Finding | None:
        if now >= st.next_state:
            st.next_state = now + STOP_POLL_S
            state = self.read_state(w.pid)
            if state in STOPPED_STATES:
                if st.stopped_since is None:
                    st.stopped_since = now
            else:
                st.stopped_since = None
        if st.stopped_since is not None and now - st.stopped_since >= self.stopped_after_s:
            secs = max(1, math.floor(now - st.stopped_since))
            return Finding(w.replica_id, "stopped", f"replica {w.replica_id} process stopped (SIGSTOP) "
                                                    f"for {secs} s")
        if w.memory_limit > 0 and now >= st.next_memory:
            st.next_memory = now + MEMORY_POLL_S
            rss = self.read_rss(w.pid)
            if rss is not None and rss > w.memory_limit:
                return Finding(w.replica_id, "memory",
                               f"replica {w.replica_id} exceeded memory {megabytes(w.memory_limit)} "
                               f"(resident {megabytes(rss)})")
        return None
