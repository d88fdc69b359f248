"""A replica's ``record_routing_stats()`` (deployments with a custom request router): called every
``request_routing_stats_period_s``, each call bounded by ``request_routing_stats_timeout_s``, and
sent to the controller when the answer changed; the controller passes it on to the
deployment's routers, where it is ``RunningReplica.routing_stats``.

A call that fails, is late or returns something other than a dict with string keys sends
nothing (the routers keep the last stats) and logs a warning, at most once a minute.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from shoal.config import RequestRouterConfig
from shoal.runtime.callable import UserCallable
from shoal.runtime.wire import ReplicaRoutingStats

__all__ = ["RoutingStatsReporter", "call_record_routing_stats", "routing_stats_method"]

logger = logging.getLogger("shoal.replica")

WARN_EVERY_S = 60.0


def routing_stats_method(user: UserCallable) -> Callable[[], Any] | None:
    """The deployment's ``record_routing_stats`` method, if it has one."""
    fn = getattr(user.instance, "record_routing_stats", None)
    return fn if callable(fn) else None


async def call_record_routing_stats(user: UserCallable, fn: Callable[[], Any]) -> dict[str, Any]:
    """Call ``fn`` (async on this loop, sync on the user thread) and check its answer.
    Raises ``TypeError`` naming what is wrong."""
    if inspect.iscoroutinefunction(fn):
        result = await fn()
    else:
        result = await user.run_sync(fn)
        if inspect.isawaitable(result):
            result = await result
    if not isinstance(result, dict):
        raise TypeError(f"record_routing_stats() returned {type(result).__name__}; expected a dict")
    bad = [k for k in result if not isinstance(k, str)]
    if bad:
        raise TypeError(f"record_routing_stats() returned a non-string key {bad[0]!r}")
    return dict(result)


class RoutingStatsReporter:
    """Calls ``record_routing_stats()`` on its period and sends what changed."""

    def __init__(self, replica_id: str, user: UserCallable, fn: Callable[[], Any], config: RequestRouterConfig,
                 send: Callable[[Any], None]) -> None:
        self.replica_id = replica_id
        self.user = user
        self.fn = fn
        self.period_s = float(config.request_routing_stats_period_s)
        self.timeout_s = float(config.request_routing_stats_timeout_s)
        self.send = send
        self.last: dict[str, Any] | None = None
        self._warned_at = -1e9

    def resend(self) -> None:
        """Send the next answer even if unchanged (a restarted controller knows nothing)."""
        self.last = None

    async def once(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            stats = await asyncio.wait_for(call_record_routing_stats(self.user, self.fn), self.timeout_s)
        except Exception as e:
            why = (f"did not return within {self.timeout_s:g} s (request_routing_stats_timeout_s)"
                   if isinstance(e, TimeoutError) else f"failed: {type(e).__name__}: {e}")
            if loop.time() >= self._warned_at + WARN_EVERY_S:
                self._warned_at = loop.time()
                logger.warning("record_routing_stats() %s; routers keep the last stats", why)
            return
        if stats == self.last:
            return
        try:
            self.send(ReplicaRoutingStats(self.replica_id, stats))
        except Exception as e:  # e.g. a value that cannot be pickled
            if loop.time() >= self._warned_at + WARN_EVERY_S:
                self._warned_at = loop.time()
                logger.warning("cannot send what record_routing_stats() returned: %s: %s", type(e).__name__, e)
            return
        self.last = stats

    async def run(self, stopped: Callable[[], bool]) -> None:
        while not stopped():
            await self.once()
            await asyncio.sleep(self.period_s)
