"""Time that moves only when a test says so: :class:`FakeClock` (re-exported by :mod:`shoal.testing`)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None



class FakeTimer:
    """A callback scheduled on a :class:`FakeClock`; ``cancel()`` it to drop it."""

    __slots__ = ("args", "callback", "cancelled", "interval", "loop", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...],
                 interval: float | None, loop: asyncio.AbstractEventLoop | None) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.interval = interval
        self.loop = loop
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        return f"FakeTimer(when={self.when}, callback={getattr(self.callback, '__qualname__', self.callback)!r})"


class FakeClock:
    """Time that moves only when :meth:`advance` is called. Thread-safe.

    ``time()`` (also ``monotonic()``, or calling the clock) reads it. ``call_at``,
    ``call_later`` and ``call_every`` schedule callbacks; ``advance(seconds)`` moves time
    forward and runs every callback that falls due, in time order, with the clock reading
    each callback's own deadline while it runs. A callback scheduled from a running event
    loop (as ``@serve.batch``'s queues do) runs on that loop's thread, and ``advance``
    waits for it before going on, so when ``advance`` returns, what was due has happened.

    Example::

        clock = FakeClock()
        seen = []
        clock.call_later(5, lambda: seen.append(clock.time()))
        clock.advance(4.9)
        assert seen == []
        clock.advance(0.1)
        assert seen == [5.0]
    """

    def __init__(self, start: float = 0.0, *, dispatch_timeout_s: float = 30.0) -> None:
        self._now = float(start)
        self._lock = threading.RLock()
        self._heap: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()
        self._dispatch_timeout_s = dispatch_timeout_s

    def time(self) -> float:
        """The current fake time, in seconds."""
        return self._now

    monotonic = time

    def __call__(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        """Run ``callback(*args)`` once the clock reaches ``when``."""
        return self._schedule(FakeTimer(float(when), callback, args, None, _running_loop()))

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        """Run ``callback(*args)`` ``delay`` seconds from now."""
        return self.call_at(self._now + delay, callback, *args)

    def call_every(self, interval: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        """Run ``callback(*args)`` every ``interval`` seconds, first ``interval`` from now."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        return self._schedule(FakeTimer(self._now + interval, callback, args, float(interval), _running_loop()))

    def _schedule(self, timer: FakeTimer) -> FakeTimer:
        with self._lock:
            heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    @property
    def deadlines(self) -> list[float]:
        """When the scheduled (not cancelled) callbacks are due, earliest first."""
        with self._lock:
            return sorted(t.when for _, _, t in self._heap if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running what falls due on the way."""
        if seconds < 0:
            raise ValueError(f"time only moves forward; got {seconds!r}")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (never back), running what falls due on the way."""
        while True:
            with self._lock:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap or self._heap[0][0] > when:
                    self._now = max(self._now, when)
                    return
                _, _, timer = heapq.heappop(self._heap)
                self._now = max(self._now, timer.when)
                if timer.interval is not None:
                    # Re-armed before it runs, so that the callback can cancel it.
                    timer.when += timer.interval
                    heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
            self._fire(timer)

    def _fire(self, timer: FakeTimer) -> None:
        loop = timer.loop
        if loop is None or loop is _running_loop():
            timer.callback(*timer.args)
            return
        if loop.is_closed():
            return
        done = threading.Event()

        def run() -> None:
            try:
                if not timer.cancelled:
                    timer.callback(*timer.args)
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # closed in the meantime
            return
        if not done.wait(self._dispatch_timeout_s):
            raise RuntimeError(f"the event loop of {timer!r} did not run it within {self._dispatch_timeout_s}s")

    def __repr__(self) -> str:
        return f"FakeClock(time={self._now}, scheduled={len(self.deadlines)})"
