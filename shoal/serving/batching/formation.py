"""When a batch starts: a pure function of the queue and an explicit clock, and the clock a
queue reads (its event loop, or a clock set for that loop)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

# --------------------------------------------------------------------------------------------
# Batch formation: a pure function of the queue and an explicit clock.


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_batch_size: int = 10
    batch_wait_timeout_s: float = 0.01


class BatchDecision(NamedTuple):
    """What the queue should do now.

    ``take``: run a batch of the first ``take`` queued items now (None: not yet).
    ``wait_s``: when ``take`` is None, seconds until the forming batch is due; None means
    nothing is queued (wait for an arrival).
    ``oversized``: the first queued item alone exceeds ``max_batch_size`` (by
    ``batch_size_fn``); it can never run and must be failed.
    """

    take: int | None
    wait_s: float | None
    oversized: bool = False


def next_batch(
    queued: int,
    first_arrival: float | None,
    now: float,
    config: BatchConfig,
    size_of: Callable[[int], int] | None = None,
    *,
    full_only: bool = False,
) -> BatchDecision:
    """Decide whether a batch starts now, given ``queued`` waiting items.

    ``first_arrival`` is when the oldest queued item arrived and ``now`` the current time, on the
    same clock. ``size_of(k)``, when given, is the size (``batch_size_fn``) of the first ``k``
    queued items; without it an item counts as 1. A batch starts at once when it is full (the
    next item would not fit, or it reached ``max_batch_size`` exactly), or when
    ``batch_wait_timeout_s`` has passed since ``first_arrival``. With ``full_only``, only a full
    batch starts (a due partial one gets ``wait_s`` 0).
    """
    if queued <= 0:
        return BatchDecision(None, None)
    limit = config.max_batch_size
    if size_of is None:
        if queued >= limit:
            return BatchDecision(limit, None)
        fits = queued
    else:
        fits = 0
        for k in range(1, queued + 1):
            size = size_of(k)
            if size > limit:
                if fits == 0:
                    return BatchDecision(None, None, oversized=True)
                return BatchDecision(fits, None)  # item k does not fit: the batch is full
            fits = k
            if size == limit:
                return BatchDecision(fits, None)
    assert first_arrival is not None, "first_arrival is required when items are queued"
    remaining = config.batch_wait_timeout_s - (now - first_arrival)
    if full_only:
        return BatchDecision(None, max(remaining, 0.0))
    if remaining <= 0:
        return BatchDecision(fits, None)
    return BatchDecision(None, remaining)



# --------------------------------------------------------------------------------------------
# The clock a queue reads and arms its timeout timer on: its event loop, unless a clock was set
# for that loop (shoal.testing's FakeClock), so a batch can be formed without real waiting.


class Timer(Protocol):
    def cancel(self) -> None: ...


class BatchClock(Protocol):
    """What a batch queue needs from a clock; an asyncio event loop is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer: ...


_loop_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BatchClock] = weakref.WeakKeyDictionary()


def set_loop_clock(loop: asyncio.AbstractEventLoop, clock: BatchClock | None) -> None:
    """Make batch queues created on ``loop`` from now on use ``clock`` (None: the loop's own).

    The clock's ``call_at`` callbacks must run on ``loop``'s thread.
    """
    if clock is None:
        _loop_clocks.pop(loop, None)
    else:
        _loop_clocks[loop] = clock


def clock_for(loop: asyncio.AbstractEventLoop) -> BatchClock:
    """The clock a queue created on ``loop`` now reads: the one set for it, else the loop."""
    return _loop_clocks.get(loop) or loop
