"""A replica's ``max_ongoing_requests`` slots: the one admission rule of every entry.

A request runs only while it holds a slot. There are two ways to ask for one, because the
callers differ in what they can do with a "no":

* :meth:`Slots.try_admit` -- a request that came over RPC from a router. The router can send
  it to another replica, so a full replica refuses at once (``REJECT``).
* :meth:`Slots.admit` -- an HTTP request this replica's own front received. Nobody else can
  take it, so it waits for a slot in FIFO order (up to ``max_queued_requests`` waiters, then
  :class:`~shoal.exceptions.BackPressureError`).

While anyone waits, RPC requests are refused too: the waiters were first. Releasing a slot
hands it straight to the oldest waiter.
"""

from __future__ import annotations

import asyncio
from collections import deque

from shoal.exceptions import BackPressureError

__all__ = ["Slots"]


class Slots:
    """``limit`` slots, the requests holding them (``ongoing``) and those waiting (``waiters``)."""

    __slots__ = ("draining", "idle", "limit", "max_queued", "max_wait", "ongoing", "waiters")

    def __init__(self, limit: int = 5, max_queued: int = -1, max_wait: float = 0.0) -> None:
        self.limit = limit
        self.max_queued = max_queued  # -1: no limit on waiters
        self.max_wait = max_wait  # seconds a waiter waits at most (0: no bound)
        self.ongoing = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        # Set while no slot is held: a drain waits for it.
        self.idle = asyncio.Event()
        self.idle.set()
        # Once set, try_admit refuses everything (admit still serves the front's stragglers).
        self.draining = False

    @property
    def load(self) -> int:
        """Requests running or waiting here: what the autoscaler counts."""
        return self.ongoing + len(self.waiters)

    def refuses(self) -> bool:
        """Whether :meth:`try_admit` would refuse a request now."""
        return self.draining or self.ongoing >= self.limit or bool(self.waiters)

    def try_admit(self) -> bool:
        """Take a slot if one is free and nobody waits for one (and not draining)."""
        if self.refuses():
            return False
        self.take()
        return True

    def take(self) -> None:
        """Take a slot unconditionally (the caller checked :meth:`refuses`)."""
        self.ongoing += 1
        self.idle.clear()

    async def admit(self) -> None:
        """Wait in FIFO order for a slot; BackPressureError when too many already wait, or when
        no slot came within ``max_wait`` seconds."""
        if self.ongoing < self.limit and not self.waiters:
            self.take()
            return
        if self.max_queued != -1 and len(self.waiters) >= self.max_queued:
            raise BackPressureError(len(self.waiters), self.max_queued)
        # The request that frees a slot hands it over (see release).
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            if self.max_wait > 0:
                await asyncio.wait_for(asyncio.shield(fut), self.max_wait)
            else:
                await fut
        except TimeoutError:
            if fut.done():
                return  # handed a slot just as the wait ran out: keep it
            self.waiters.remove(fut)
            fut.cancel()
            raise BackPressureError(len(self.waiters), self.max_queued, message=(
                f"no slot of this replica was free within {self.max_wait:g} s (max_queue_wait_s)")) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot but no longer want it
            else:
                self.waiters.remove(fut)
                fut.cancel()
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter, else to the pool."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; `ongoing` stays the same
                return
        self.ongoing -= 1
        if self.ongoing == 0:
            self.idle.set()
