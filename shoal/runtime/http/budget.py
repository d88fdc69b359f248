"""The request-body budget of a front: how many bytes of request bodies it holds at once.

A front reads a request's whole body before forwarding it; many large uploads at once would
hold their sum in memory. A :class:`BodyBudget` caps that sum: a request takes its share
(:class:`BodyLease`) before its body is read, from the declared ``content-length`` or, for a
body of unknown length, in steps as it arrives, and gives it back when the request ends. A
request that does not fit waits, first come first served, at most ``wait_s``; then it is
refused (503 with ``Retry-After``). Bodies under :data:`BUDGET_FREE_BYTES` take no share.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["BODY_BUDGET_BYTES", "BODY_BUDGET_WAIT_S", "BUDGET_FREE_BYTES", "BUDGET_STEP_BYTES", "BodyBudget",
           "BodyLease"]

# The request-body bytes one front holds at once (HTTPOptions.request_body_budget_bytes).
BODY_BUDGET_BYTES = 512 * 1024 * 1024
# How long a body that does not fit waits for room (HTTPOptions.request_body_budget_wait_s).
BODY_BUDGET_WAIT_S = 10.0
# Bodies this small are read without taking a share (one ASGI message, in practice).
BUDGET_FREE_BYTES = 64 * 1024
# A body of unknown length takes its share in steps of at least this many bytes.
BUDGET_STEP_BYTES = 1024 * 1024


class BodyBudget:
    """``capacity`` bytes shared by the requests a front reads; waiters are served in order."""

    __slots__ = ("capacity", "used", "wait_s", "waiters")

    def __init__(self, capacity: int = BODY_BUDGET_BYTES, wait_s: float = BODY_BUDGET_WAIT_S) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def lease(self) -> BodyLease:
        return BodyLease(self)

    async def acquire(self, nbytes: int) -> bool:
        """Take ``nbytes``, waiting at most ``wait_s`` for room; False when they can never fit
        or the wait ran out."""
        if nbytes > self.capacity:
            return False
        if not self.waiters and self.used + nbytes <= self.capacity:
            self.used += nbytes
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self.waiters.append(entry)
        got = False
        try:
            async with asyncio.timeout(self.wait_s):
                await fut
            got = True
            return True
        except TimeoutError:
            return False
        finally:
            if not got:
                if fut.done() and not fut.cancelled():
                    self.release(nbytes)  # granted as the wait ended: give it back
                else:
                    fut.cancel()
                    if entry in self.waiters:
                        self.waiters.remove(entry)
                    self._grant()  # those behind it may fit now

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        self._grant()

    def _grant(self) -> None:
        while self.waiters:
            nbytes, fut = self.waiters[0]
            if fut.done():  # cancelled, its task not yet resumed
                self.waiters.popleft()
                continue
            if self.used + nbytes > self.capacity:
                return
            self.waiters.popleft()
            self.used += nbytes
            fut.set_result(None)


class BodyLease:
    """One request's share of a :class:`BodyBudget`: grows as its body is read, all given back
    by :meth:`release` (idempotent)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    async def cover(self, nbytes: int, step: bool = False) -> bool:
        """Make the lease hold at least ``nbytes`` (a declared length; with ``step``, a body's
        size so far, taking a step ahead); False when the budget refused."""
        if nbytes <= self.held or nbytes < BUDGET_FREE_BYTES:
            return True
        target = max(nbytes, min(self.held + BUDGET_STEP_BYTES, self.budget.capacity)) if step else nbytes
        if not await self.budget.acquire(target - self.held):
            return False
        self.held = target
        return True

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.budget.release(held)
