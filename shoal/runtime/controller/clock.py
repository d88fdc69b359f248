"""The controller's clocks, injected so that its parts can be driven by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    """``monotonic`` for deadlines and intervals; ``wall_ns`` for what outlives the process
    (deploy times, membership versions that must grow across controller restarts)."""

    monotonic: Callable[[], float] = time.monotonic
    wall_ns: Callable[[], int] = time.time_ns

    def wall(self) -> float:
        """Wall time in seconds."""
        return self.wall_ns() / 1e9
