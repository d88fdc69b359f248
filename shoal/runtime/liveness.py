"""A router's view of whether a replica can be reached and whether it answers.

The decisions are pure (the caller passes the clock's ``now``), unit-tested without sockets:

* :class:`Backoff` spaces out reconnect attempts to a replica that cannot be reached.
* :class:`Probe` watches one connection: when requests are in flight there and nothing has
  been received for :data:`PROBE_AFTER_S`, it asks for a ping; when no frame at all arrives
  within :data:`PROBE_DEADLINE_S` after it, the replica counts as unresponsive (new requests
  avoid it) and is pinged again with back-off until any frame arrives.

Around them, on the event loop: :class:`ProbeTimer` runs a probe for one connection, and
:class:`ReplicaHealth` keeps one replica's standing in a router (reachable, answering),
reconnects with back-off and logs each outage once. ``shoal.runtime.router`` wires them up.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Backoff", "ConnEvent", "Probe", "ProbeStep", "ProbeTimer", "ReplicaHealth"]

logger = logging.getLogger("shoal.router")

# Reconnecting to a replica that cannot be reached: the first retry comes after this long...
RECONNECT_FIRST_S = 0.1
# ...each further failure doubles the wait, up to this.
RECONNECT_MAX_S = 5.0
# Waits are spread by up to this fraction either way, so that many routers do not retry in step.
JITTER = 0.2

# Requests are in flight on a connection and nothing came back for this long: send a ping.
PROBE_AFTER_S = 1.0
# No frame at all within this long after a ping: the replica is unresponsive.
PROBE_DEADLINE_S = 1.0
# An unresponsive replica is pinged again after this long, doubling up to PROBE_RETRY_MAX_S.
PROBE_RETRY_FIRST_S = 0.5
PROBE_RETRY_MAX_S = 4.0


class Backoff:
    """Exponential back-off with jitter: ``first``, doubling to ``most``; :meth:`reset` on success.

    The defaults are the reconnect constants, read when it is made (tests may patch them).
    """

    def __init__(self, first: float | None = None, most: float | None = None,
                 jitter: float | None = None, rng: random.Random | None = None) -> None:
        first = RECONNECT_FIRST_S if first is None else first
        most = RECONNECT_MAX_S if most is None else most
        if not 0 < first <= most:
            raise ValueError(f"need 0 < first <= most, got {first}, {most}")
        self.first = first
        self.most = most
        self.jitter = JITTER if jitter is None else jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def base(self) -> float:
        """The next wait before jitter."""
        return min(self.most, self.first * 2.0 ** min(self.failures, 30))

    def next(self) -> float:
        """The wait before the next attempt; each call counts one more failure."""
        delay = self.base()
        self.failures += 1
        if self.jitter:
            delay *= 1.0 + self._rng.uniform(-self.jitter, self.jitter)
        return delay

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True, slots=True)
class ProbeStep:
    """What :meth:`Probe.check` decided: send a ping now; the replica just became
    unresponsive; when to check again (None: nothing to watch until the next request)."""

    ping: bool = False
    unresponsive: bool = False
    next_at: float | None = None


class Probe:
    """Liveness of one connection, from the frames it receives (see the module docstring).

    The defaults are the probe constants, read when it is made (tests may patch them).
    """

    def __init__(self, after_s: float | None = None, deadline_s: float | None = None,
                 retry: Backoff | None = None) -> None:
        self.after_s = PROBE_AFTER_S if after_s is None else after_s
        self.deadline_s = PROBE_DEADLINE_S if deadline_s is None else deadline_s
        self.retry = retry or Backoff(PROBE_RETRY_FIRST_S, PROBE_RETRY_MAX_S)
        self.last_heard = 0.0
        self.ping_sent: float | None = None  # when the unanswered ping went out
        self.unresponsive = False
        self._ping_again = 0.0  # while unresponsive: when to ping again

    def busy(self, now: float) -> None:
        """A request went out on a connection with nothing in flight: silence counts from now."""
        self.last_heard = max(self.last_heard, now)

    def heard(self, now: float) -> bool:
        """A frame arrived. True when this makes an unresponsive replica responsive again."""
        self.last_heard = now
        self.ping_sent = None
        if not self.unresponsive:
            return False
        self.unresponsive = False
        self.retry.reset()
        return True

    def check(self, now: float, busy: bool) -> ProbeStep:
        """Decide what to do at ``now``; ``busy``: requests from this router are in flight."""
        if self.ping_sent is not None:
            if now < self.ping_sent + self.deadline_s:
                return ProbeStep(next_at=self.ping_sent + self.deadline_s)
            became = not self.unresponsive
            self.unresponsive = True
            self.ping_sent = None
            self._ping_again = now + self.retry.next()
            return ProbeStep(unresponsive=became, next_at=self._ping_again)
        if self.unresponsive:
            if now < self._ping_again:
                return ProbeStep(next_at=self._ping_again)
            return self._ping(now)
        if not busy:
            return ProbeStep()
        if now - self.last_heard < self.after_s:
            return ProbeStep(next_at=self.last_heard + self.after_s)
        return self._ping(now)

    def _ping(self, now: float) -> ProbeStep:
        self.ping_sent = now
        return ProbeStep(ping=True, next_at=now + self.deadline_s)


class ConnEvent(StrEnum):
    """What a replica connection tells its owner."""

    UP = "up"  # a connection was established
    FAILED = "failed"  # a connection could not be established
    LOST = "lost"  # an established connection closed (requests in flight there failed)
    UNRESPONSIVE = "unresponsive"  # requests are in flight and it did not answer a ping in time
    RESPONSIVE = "responsive"  # a frame arrived from it again


class ProbeTimer:
    """Runs a :class:`Probe` for one open connection on its event loop.

    ``ping()`` sends a ping (False when the connection is closed), ``busy()`` says whether
    requests are in flight, ``report`` receives UNRESPONSIVE and RESPONSIVE.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, ping: Callable[[], bool], busy: Callable[[], bool],
                 report: Callable[[ConnEvent, str], None]) -> None:
        self.probe = Probe()
        self._loop = loop
        self._ping = ping
        self._busy = busy
        self._report = report
        self._timer: asyncio.TimerHandle | None = None

    def started(self) -> None:
        """A request went out with nothing else in flight: watch for silence from now."""
        now = self._loop.time()
        self.probe.busy(now)
        if self._timer is None:
            self._timer = self._loop.call_at(now + self.probe.after_s, self._check)

    def heard(self) -> None:
        """A frame arrived from the replica."""
        if self.probe.heard(self._loop.time()):
            self._report(ConnEvent.RESPONSIVE, "")

    def _check(self) -> None:
        self._timer = None
        step = self.probe.check(self._loop.time(), self._busy())
        if step.ping and not self._ping():
            return
        if step.unresponsive:
            self._report(ConnEvent.UNRESPONSIVE, f"no answer for {self.probe.after_s + self.probe.deadline_s:g} s")
        if step.next_at is not None:
            self._timer = self._loop.call_at(step.next_at, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ReplicaHealth:
    """Whether a router may send one replica new requests: it can be reached and it answers.

    Fed the :class:`ConnEvent` of the replica's connection. While the replica cannot be reached
    it runs ``reconnect()`` with back-off (:data:`RECONNECT_FIRST_S` doubling to
    :data:`RECONNECT_MAX_S`) until a connection is up again. ``on_back`` runs when the replica
    becomes usable again, ``on_outage`` once when it stops being reachable. One warning is
    logged per outage and an info line when it is over.
    """

    def __init__(self, name: str, reconnect: Callable[[], Awaitable[object]],
                 on_back: Callable[[], None], on_outage: Callable[[], None]) -> None:
        self.name = name
        self._reconnect = reconnect
        self._on_back = on_back
        self._on_outage = on_outage
        self.down = False  # cannot be reached: a connection failed or closed
        self.unresponsive = False  # did not answer a probe; cleared by any frame
        self.usable = True  # neither: new requests may go there
        self.warned = False  # this outage was logged as a warning
        self.backoff = Backoff()
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def event(self, event: ConnEvent, why: str) -> None:
        if self.closed:
            return
        if event in (ConnEvent.UP, ConnEvent.RESPONSIVE):
            if self.warned:
                logger.info("%s is %s again", self.name, "reachable" if event == ConnEvent.UP else "answering")
            self.warned = self.down = self.unresponsive = False
            self.usable = True
            self.backoff.reset()
            self._on_back()
        elif event == ConnEvent.UNRESPONSIVE:
            self.unresponsive = True
            self.usable = False
            self._warn(f"{self.name} is not answering ({why}); new requests go to other replicas until it does")
        else:
            self._down(event, why)

    def _down(self, event: ConnEvent, why: str) -> None:
        first = not self.down
        self.down = True
        self.unresponsive = self.usable = False
        if event == ConnEvent.LOST:
            # Often the replica is simply gone (its membership will say so): warn if it stays away.
            logger.info("%s closed its connection; reconnecting", self.name)
        else:
            self._warn(f"{self.name} cannot be reached ({why}); requests go to other replicas while it "
                       "is retried with back-off")
        if first:
            self._on_outage()
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._retry())

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            logger.warning("%s", message)

    async def _retry(self) -> None:
        while self.down and not self.closed:
            await asyncio.sleep(self.backoff.next())
            if self.down and not self.closed:
                await self._reconnect()  # its outcome comes back as an event

    def close(self) -> None:
        """The replica left the membership: stop reconnecting and reporting."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
