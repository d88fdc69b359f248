"""Connection hygiene of an HTTP front: the limits, and the pure parts of its timers and drain.

The protocol that applies them to each connection is
:func:`shoal.runtime.httpguard.guarded_protocol` (uvicorn's httptools protocol, extended);
:class:`shoal.runtime.proxy.HTTPFront` makes one per listening server. What it enforces:

* **request head timeout** — a connection must deliver a complete request head within
  :data:`HEADER_TIMEOUT_S` of opening, or of the head's first byte on a kept-alive connection
  (an idle kept-alive connection is uvicorn's keep-alive timeout's). Nothing arrived: the
  connection is closed; part of a head: 408, then closed.
* **request body timeout** — a request body that brings no bytes for :data:`BODY_TIMEOUT_S`
  while the front reads it: 408, the connection closes.
* **response write timeout** — a response the client does not read: when the connection's
  write buffer stays full (the transport paused writing) for :data:`WRITE_TIMEOUT_S`, the
  connection is aborted; the request sees the client gone and is cancelled upstream.
* **connection cap** — at most :func:`connection_cap` connections per front; one more gets a
  short 503 with ``Connection: close`` and is closed, the others are served on.
* **draining**, as Envoy drains HTTP/1.1 — from the moment a front drains every response
  carries ``Connection: close`` (the connection closes after it); idle keep-alive connections
  are closed only after a grace (:attr:`ConnLimits.drain_grace_s`), and a connection under a
  request is never closed (until the front's graceful timeout).

Nothing here imports uvicorn or pydantic.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A complete request head within this long of a connection opening (or of its first byte).
HEADER_TIMEOUT_S = 10.0
# A request body that brings no bytes for this long, while the front reads it: 408.
BODY_TIMEOUT_S = 30.0
# A response write that makes no progress (the client reads nothing) for this long: aborted.
WRITE_TIMEOUT_S = 30.0
# Connections per front, at most (and at most the soft open-files limit less FD_RESERVE).
MAX_CONNECTIONS = 10_000
# Open files a front leaves to the rest of its process (RPC connections, logs, user code).
FD_RESERVE = 128
# A connection refused over the cap lingers this long (dropping what the client sends) so that
# its 503 is read rather than lost to a reset; at most MAX_LINGERING linger at once.
REFUSED_LINGER_S = 0.5
MAX_LINGERING = 64
# Cut connections are logged at most this often per kind and front (with a count).
WARN_EVERY_S = 10.0


def soft_fd_limit() -> int:
    """This process's soft limit on open files (-1: none)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(configured: int, fd_limit: int, reserve: int = FD_RESERVE) -> int:
    """The connections a front holds at once: ``configured``, and at most ``fd_limit`` less
    ``reserve`` (half the limit when the limit is smaller than twice the reserve); never 0."""
    if fd_limit < 0:
        return max(1, configured)
    room = fd_limit - reserve if fd_limit >= 2 * reserve else fd_limit // 2
    return max(1, min(configured, room))


@dataclass(frozen=True)
class ConnLimits:
    """A front's connection limits, in seconds and connections (see the module docstring)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    write_timeout_s: float = WRITE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS  # the effective cap (connection_cap applied)
    drain_grace_s: float = 5.0

    @classmethod
    def of(cls, options: Any, fd_limit: int | None = None) -> ConnLimits:
        """The limits of a front with ``options`` (its ``FrontOptions``), in a process whose soft open-files limit is
        ``fd_limit`` (default: this process's)."""
        grace = options.drain_grace_s
        return cls(header_timeout_s=options.request_header_timeout_s,
                   body_timeout_s=options.request_body_timeout_s,
                   write_timeout_s=options.response_write_timeout_s,
                   max_connections=connection_cap(options.max_connections,
                                                  soft_fd_limit() if fd_limit is None else fd_limit),
                   drain_grace_s=options.keep_alive_timeout_s if grace is None else grace)


class Stall:
    """A wait that must see progress every ``limit`` seconds (e.g. a request body's bytes).

    Progress only notes the time (O(1), no timer per chunk); :meth:`remaining` says how long
    the wait may still go without progress. ``clock`` is injected (monotonic seconds).
    """

    __slots__ = ("clock", "last", "limit")

    def __init__(self, limit: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.clock = clock
        self.last: float | None = None  # None: not waiting

    @property
    def waiting(self) -> bool:
        return self.last is not None

    def start(self) -> None:
        self.last = self.clock()

    def progress(self) -> None:
        if self.last is not None:
            self.last = self.clock()

    def stop(self) -> None:
        self.last = None

    def remaining(self) -> float | None:
        """Seconds until the wait times out (<= 0: it has), or None when not waiting."""
        if self.last is None:
            return None
        return self.last + self.limit - self.clock()


class StallTimer:
    """A :class:`Stall` with one timer on ``loop``: ``expired`` is called once the wait went
    ``limit`` seconds without progress. The timer re-arms itself for what remains when progress
    came meanwhile, so progress costs no timer operation."""

    __slots__ = ("expired", "handle", "loop", "stall")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float, expired: Callable[[], None]) -> None:
        self.loop = loop
        self.stall = Stall(limit, loop.time)
        self.expired = expired
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.stall.start()
        if self.handle is None:
            self.handle = self.loop.call_later(self.stall.limit, self._check)

    def progress(self) -> None:
        self.stall.progress()

    def stop(self) -> None:
        self.stall.stop()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _check(self) -> None:
        self.handle = None
        left = self.stall.remaining()
        if left is None:
            return
        if left > 0:
            self.handle = self.loop.call_later(left, self._check)
            return
        self.stall.stop()
        self.expired()


class Drainable:
    """What a pool drains: a connection (implemented by the guarded protocol)."""

    def drain_started(self) -> None:
        """The front drains: answer from now on with ``Connection: close``."""

    def grace_over(self) -> None:
        """The drain grace passed: close now when idle (else after the request on it)."""


@dataclass(eq=False)
class Pool:
    """The connections of one listening server of a front, and whether they drain."""

    members: set[Any] = field(default_factory=set)  # Drainable connections
    draining: bool = False
    grace_done: bool = False
    empty: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.empty.set()

    def add(self, conn: Any) -> None:
        self.members.add(conn)
        self.empty.clear()

    def discard(self, conn: Any) -> None:
        self.members.discard(conn)
        if not self.members:
            self.empty.set()

    def drain(self, loop: asyncio.AbstractEventLoop, grace_s: float) -> None:
        """Start draining (once): every connection answers with ``Connection: close`` from now
        on; after ``grace_s`` the idle ones are closed."""
        if self.draining:
            return
        self.draining = True
        for conn in list(self.members):
            conn.drain_started()
        self._timer = loop.call_later(grace_s, self.end_grace)

    def end_grace(self) -> None:
        """The grace is over: idle connections close now, busy ones after their request."""
        self.grace_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in list(self.members):
            conn.grace_over()


@dataclass(eq=False)
class FrontConnections:
    """Every connection of one front (all its listening servers): what the cap counts; and
    how often each kind of cut happened (for warnings at most every :data:`WARN_EVERY_S`)."""

    live: set[Any] = field(default_factory=set)
    lingering: int = 0  # refused connections still lingering
    refused: int = 0  # connections refused over the cap, in all
    cuts: dict[str, int] = field(default_factory=dict)  # kind -> how many since the last warning
    warned: dict[str, float] = field(default_factory=dict)  # kind -> when last warned
    on_release: Callable[[], None] | None = None  # a counted connection closed

    def release(self, conn: Any) -> None:
        """``conn`` closed: it no longer counts."""
        self.live.discard(conn)
        if self.on_release is not None:
            self.on_release()

    def __len__(self) -> int:
        return len(self.live)

    def note(self, kind: str, now: float) -> int:
        """Count one cut of ``kind``; how many to report in a warning now (0: stay quiet, at
        most one warning per kind every :data:`WARN_EVERY_S`; a flood must not flood the log)."""
        count = self.cuts.get(kind, 0) + 1
        last = self.warned.get(kind)
        if last is not None and now - last < WARN_EVERY_S:
            self.cuts[kind] = count
            return 0
        self.cuts[kind] = 0
        self.warned[kind] = now
        return count
