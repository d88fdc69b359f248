"""Fair sharing of a model between tenants: weighted fair queuing at the gateway.

Each model gets at most ``max_in_flight`` generations at once from a gateway replica (the rest
of the engine's capacity stays free for other gateway replicas and callers). Requests beyond
wait here, not in the engine's first-come queue, and leave in the order of their *virtual
finish tags*: a tenant's request gets ``max(now_virtual, tenant's last tag) + 1 / weight``. A
tenant that sends a burst of 100 requests therefore gets its turn every time its weight says,
while a tenant that sends one request waits behind at most one request of each other tenant
(at equal weights), instead of behind the whole burst. Pure asyncio, no clock: waits are
bounded by ``queue_timeout_s`` (then :class:`QueueTimeout`, a 503 at the gateway).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

__all__ = ["FairGate", "QueueTimeout"]


class QueueTimeout(Exception):
    """A request waited ``queue_timeout_s`` for a turn at a busy model."""


@dataclass(order=True)
class _Waiter:
    tag: float
    seq: int
    tenant: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairGate:
    """At most ``max_in_flight`` holders at once; waiters leave by weighted virtual finish tag."""

    def __init__(self, max_in_flight: int, queue_timeout_s: float) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._heap: list[_Waiter] = []
        self._last: dict[str, float] = {}  # each tenant's last virtual finish tag
        self._virtual = 0.0  # the tag of the request that last got its turn
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    async def acquire(self, tenant: str, weight: float = 1.0) -> None:
        """Wait for a turn (at once when there is room and nobody waits)."""
        if self.in_flight < self.max_in_flight and not self.waiting:
            self.in_flight += 1
            self._virtual = max(self._virtual, self._last.get(tenant, 0.0))
            self._last[tenant] = self._virtual + 1.0 / weight
            return
        tag = max(self._virtual, self._last.get(tenant, 0.0)) + 1.0 / weight
        self._last[tenant] = tag
        waiter = _Waiter(tag, next(self._seq), tenant, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout_s)
        except BaseException as e:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the turn came as the wait ended: hand it on
            else:
                waiter.future.cancel()
            if isinstance(e, TimeoutError):
                raise QueueTimeout(f"waited {self.queue_timeout_s:g}s for a turn at a busy model") from None
            raise

    def release(self) -> None:
        """A holder is done: hand its place to the waiter with the smallest tag."""
        self.in_flight -= 1
        while self._heap and self.in_flight < self.max_in_flight:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():  # gave up (timeout, client gone)
                continue
            self._virtual = max(self._virtual, waiter.tag)
            self.in_flight += 1
            waiter.future.set_result(None)
