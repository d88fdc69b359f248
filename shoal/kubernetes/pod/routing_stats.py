"""Custom request routers' routing stats between pods (no controller relays them).

Callee side: a pod whose deployment has a custom request router and a ``record_routing_stats()``
method calls it every ``request_routing_stats_period_s`` (each call bounded by
``request_routing_stats_timeout_s``; :class:`~shoal.runtime.replica.routing_stats.RoutingStatsReporter`,
as a local replica does) and keeps the latest answer (:func:`keeper`) on its
:class:`~shoal.runtime.replica.core.ReplicaCore`, which answers a caller's ``STATS`` frame with it
on the RPC port (the same mutual-TLS, HMAC-authenticated connection requests use; a gang answers
from rank 0).

Caller side: :class:`StatsFetcher`, one per callee with a custom router in each caller pod, asks
every listed pod every ``request_routing_stats_period_s`` over the router's own connection, each
question bounded by ``request_routing_stats_timeout_s``; a pod that joins is asked at once. An
answer that differs from the last is pushed to the router with the membership
(``RunningReplica.routing_stats``); a pod that does not answer in time, cannot be reached or has
nothing yet keeps its last stats. One pod's slow answer delays no other's: each pod has at most
one question in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from shoal.runtime.wire import ReplicaRoutingStats, dumps_user

if TYPE_CHECKING:
    from shoal.runtime.replica.core import ReplicaCore
    from shoal.runtime.router import Router

__all__ = ["WARN_EVERY_S", "StatsFetcher", "keeper"]

logger = logging.getLogger("shoal.pod")

# A callee's pods that do not answer are reported at most this often (per caller and callee).
WARN_EVERY_S = 60.0
# Until the router knows its custom router (the first membership), look again this often.
_NO_ROUTER_YET_S = 0.5


def keeper(core: ReplicaCore) -> Callable[[Any], None]:
    """The reporter's ``send`` in a pod: keep the stats on ``core`` for callers that ask.
    Raises when they cannot be pickled (the reporter logs that and keeps the last ones)."""

    def keep(msg: Any) -> None:
        assert isinstance(msg, ReplicaRoutingStats)
        dumps_user(msg.stats)  # what cannot travel is refused here, not at each question
        core.routing_stats = msg.stats

    return keep


class StatsFetcher:
    """Keeps one callee's routing stats in a caller pod (see the module docstring).

    ``listed()``: the callee's pods DNS lists (replica ids; those the router has no usable
    connection to are not asked, but keep their stats); ``changed()``: runs when ``stats``
    changed (the owner pushes a membership carrying them).
    """

    def __init__(self, router: Router, listed: Callable[[], Sequence[str]], changed: Callable[[], None]) -> None:
        self.router = router
        self.listed = listed
        self.changed = changed
        self.stats: dict[str, dict[str, Any]] = {}
        self.asked = 0
        self.answered = 0
        self.failed = 0  # no answer in time, unreachable, or the connection closed
        self.wake = asyncio.Event()
        self._asking: dict[str, asyncio.Task[None]] = {}
        self._warned_at = -WARN_EVERY_S
        self._unwarned = 0

    def pods_changed(self) -> None:
        """The router's pods changed: ask those without stats now, not at the next period."""
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        try:
            while True:
                config = self.router.custom_router_config
                if config is None:  # no membership yet, or the router class cannot be used
                    self.wake.clear()
                    await asyncio.sleep(_NO_ROUTER_YET_S)
                    continue
                period = float(config.request_routing_stats_period_s)
                timeout = float(config.request_routing_stats_timeout_s)
                now = loop.time()
                every = now >= next_round
                if every:
                    next_round = now + period
                self.ask(timeout, every=every)
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), max(0.0, next_round - loop.time()))
                except TimeoutError:
                    pass
        finally:
            for task in self._asking.values():
                task.cancel()

    def ask(self, timeout: float, every: bool = True) -> None:
        """Ask the listed pods (``every``: all; else those without stats) that have no
        question in flight; forget the stats of pods no longer listed."""
        listed = list(self.listed())
        gone = [pod for pod in self.stats if pod not in listed]
        for pod in gone:
            del self.stats[pod]
        for pod in listed:
            if pod in self._asking or (not every and pod in self.stats):
                continue
            conn = self.router.connection(pod)
            if conn is None:  # unreachable or not answering: the router reconnects; ask next time
                continue
            self.asked += 1
            self._asking[pod] = asyncio.get_running_loop().create_task(self._ask(pod, conn, timeout))

    async def _ask(self, pod: str, conn: Any, timeout: float) -> None:
        try:
            stats = await conn.ask_routing_stats(timeout)
        except (TimeoutError, ConnectionError) as e:
            self.failed += 1
            self._warn(pod, f"no answer within {timeout:g} s (request_routing_stats_timeout_s)"
                       if isinstance(e, TimeoutError) else str(e) or type(e).__name__)
            return
        finally:
            self._asking.pop(pod, None)
        self.answered += 1
        if stats is None or pod not in self.listed():
            return  # nothing recorded yet (or the pod left meanwhile): keep what we had
        if self.stats.get(pod) != stats:
            self.stats[pod] = stats
            self.changed()

    def _warn(self, pod: str, why: str) -> None:
        self._unwarned += 1
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= WARN_EVERY_S:
            logger.info("routing stats of %s/%s: pod %s: %s; its last stats are kept (%d such in the last %gs)",
                        self.router.app, self.router.deployment, pod, why, self._unwarned, WARN_EVERY_S)
            self._warned_at = now
            self._unwarned = 0
