"""Calling a deployment's ``record_autoscaling_stats()`` (Ray's custom autoscaling metrics):
bounded by ``$SHOAL_RECORD_AUTOSCALING_STATS_TIMEOUT_S`` (Ray's
``RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S``, default 10 s); a call that fails or is late
reports nothing that time and logs a warning at most once a minute. Used by local replicas (which
send the metrics to the controller) and by Kubernetes pods (which export them on ``/metrics``
for the application's scaler)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from shoal.runtime.callable import UserCallable

__all__ = ["DEFAULT_RECORD_STATS_TIMEOUT_S", "RECORD_STATS_TIMEOUT_ENV", "StatsCaller", "record_stats_timeout_s"]

logger = logging.getLogger("shoal.replica")

RECORD_STATS_TIMEOUT_ENV = "SHOAL_RECORD_AUTOSCALING_STATS_TIMEOUT_S"
DEFAULT_RECORD_STATS_TIMEOUT_S = 10.0
WARN_EVERY_S = 60.0


def record_stats_timeout_s() -> float:
    """``$SHOAL_RECORD_AUTOSCALING_STATS_TIMEOUT_S``, else 10 s (a bad value is ignored)."""
    try:
        value = float(os.environ.get(RECORD_STATS_TIMEOUT_ENV, DEFAULT_RECORD_STATS_TIMEOUT_S))
    except ValueError:
        return DEFAULT_RECORD_STATS_TIMEOUT_S
    return value if value > 0 else DEFAULT_RECORD_STATS_TIMEOUT_S


class StatsCaller:
    """Calls one replica's ``record_autoscaling_stats()`` (see the module docstring)."""

    def __init__(self, user: UserCallable, clock: Callable[[], float]) -> None:
        self.user = user
        self.clock = clock
        self._warned_at = -1e18

    async def call(self) -> tuple[tuple[str, float], ...]:
        """``((metric, value), ...)``; empty when the call failed or was late."""
        timeout = record_stats_timeout_s()
        try:
            return await asyncio.wait_for(self.user.autoscaling_stats(), timeout)
        except Exception as e:
            why = (f"did not return within {timeout:g} s" if isinstance(e, TimeoutError)
                   else f"failed: {type(e).__name__}: {e}")
            now = self.clock()
            if now >= self._warned_at + WARN_EVERY_S:
                self._warned_at = now
                logger.warning("record_autoscaling_stats() %s; no custom metrics reported this time", why)
            return ()
