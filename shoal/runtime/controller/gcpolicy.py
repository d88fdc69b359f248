"""Garbage collection in a controller that has its process to itself (``shoal start``).

A controller holds its records for as long as the replicas live, and each tick makes short-lived
objects. CPython's collector keeps scanning the long-lived ones: at 2,000 replicas (the
control-plane benchmark) that made the tick's p90 several times its median. So, where the process
is the controller's own, what is tracked is frozen (``gc.freeze()``: later collections skip it;
reference counting still frees objects) every :data:`FREEZE_EVERY_S`, which costs next to
nothing; and every :data:`FULL_EVERY_S` the freeze is undone and a full collection runs before
freezing again (about 60 ms at 2,000 replicas), so cyclic garbage that was frozen lives at most
that long.

Not used when the controller runs in a thread of the user's process (``serve.run``): freezing
would change how the user's own garbage is collected.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from types import ModuleType

__all__ = ["FREEZE_EVERY_S", "FULL_EVERY_S", "GcPolicy"]

logger = logging.getLogger("shoal.controller")

#: How often what survived is frozen (cheap: generations are moved, not scanned).
FREEZE_EVERY_S = 10.0
#: How often the freeze is undone and a full collection runs (frees cyclic garbage).
FULL_EVERY_S = 300.0


@dataclass
class GcPolicy:
    """Freezes and collects on a schedule (module docstring); :meth:`tick` is called every
    controller tick with the controller's monotonic time."""

    gc_module: ModuleType = gc
    freeze_every_s: float = FREEZE_EVERY_S
    full_every_s: float = FULL_EVERY_S
    _next_freeze: float | None = None
    _next_full: float = 0.0
    freezes: int = 0
    full_collections: int = 0
    last_full_ms: float = 0.0

    def tick(self, now: float) -> str:
        """Do what is due: "full", "freeze" or "" (nothing)."""
        if self._next_freeze is None:  # the first tick: start the clocks
            self._next_freeze = now + self.freeze_every_s
            self._next_full = now + self.full_every_s
            return ""
        if now >= self._next_full:
            self._next_full = now + self.full_every_s
            self._next_freeze = now + self.freeze_every_s
            began = time.perf_counter()
            self.gc_module.unfreeze()
            self.gc_module.collect()
            self.gc_module.freeze()
            self.full_collections += 1
            self.last_full_ms = 1000 * (time.perf_counter() - began)
            logger.debug("full collection in %.1f ms; %d objects frozen", self.last_full_ms,
                         self.gc_module.get_freeze_count())
            return "full"
        if now >= self._next_freeze:
            self._next_freeze = now + self.freeze_every_s
            self.gc_module.freeze()
            self.freezes += 1
            return "freeze"
        return ""
