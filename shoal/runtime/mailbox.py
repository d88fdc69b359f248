"""Calls into an event loop from other threads, delivered in batches.

A handle used outside shoal's loop (the driver's own asyncio loop, a thread, sync code) crosses
threads twice per call: the request starts on shoal's loop, the result comes back to the
caller's loop. ``asyncio.run_coroutine_threadsafe`` and ``asyncio.wrap_future`` wake the other
loop once per call (a write to its wake-up pipe, a system call each); with many calls in flight,
that was the largest single cost of handle calls from the driver. A :class:`Mailbox` queues the
callbacks for its loop and wakes it once for everything queued until it runs: the first post
wakes the loop at once (no added latency), the posts that come before it runs ride along.

:func:`submit` (instead of ``run_coroutine_threadsafe``) and :func:`wrap` (instead of
``wrap_future``) keep their semantics: the concurrent future stays pending until the task
ends, cancelling it cancels the task, and cancelling the awaiting side cancels the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Mailbox", "mailbox", "submit", "wrap"]

logger = logging.getLogger("shoal.runtime")


class Mailbox:
    """Callbacks for one loop from any thread, run by the loop in the order posted."""

    __slots__ = ("__weakref__", "_items", "_lock", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon. Raises ``RuntimeError`` if the loop is closed."""
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nothing queued will run
            with self._lock:
                self._items.clear()
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # one bad callback must not drop the others
                logger.exception("callback %r failed", fn)


_boxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
_boxes_lock = threading.Lock()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (made on first use; it goes with the loop)."""
    box = _boxes.get(loop)
    if box is None:
        with _boxes_lock:
            box = _boxes.get(loop)
            if box is None:
                box = _boxes[loop] = Mailbox(loop)
    return box


def submit(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[Any]:
    """Start ``coro`` as a task on ``loop`` (from another thread); its outcome arrives in the
    returned future, and cancelling that future cancels the task."""
    cfut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    try:
        mailbox(loop).post(_start, coro, cfut, loop)
    except RuntimeError:
        coro.close()
        raise
    return cfut


def _start(coro: Coroutine[Any, Any, Any], cfut: concurrent.futures.Future[Any],
           loop: asyncio.AbstractEventLoop) -> None:
    if cfut.cancelled():  # cancelled before it started
        coro.close()
        return
    task = loop.create_task(coro)

    def finished(t: asyncio.Future[Any]) -> None:
        _settle(cfut, t)

    def cancelled(f: concurrent.futures.Future[Any]) -> None:
        if f.cancelled() and not task.done():
            try:
                mailbox(loop).post(task.cancel)
            except RuntimeError:
                pass

    task.add_done_callback(finished)
    cfut.add_done_callback(cancelled)


def _settle(cfut: concurrent.futures.Future[Any], task: asyncio.Future[Any]) -> None:
    """Copy the task's outcome into ``cfut`` (unless it was cancelled meanwhile)."""
    if cfut.done():
        return
    if task.cancelled():
        cfut.cancel()
        return
    if not cfut.set_running_or_notify_cancel():
        return
    exc = task.exception()
    if exc is not None:
        cfut.set_exception(exc)
    else:
        cfut.set_result(task.result())


def wrap(cfut: concurrent.futures.Future[Any]) -> asyncio.Future[Any]:
    """An asyncio future of the running loop that follows ``cfut`` (like ``asyncio.wrap_future``,
    delivered through the loop's :class:`Mailbox`); cancelling it cancels ``cfut``."""
    loop = asyncio.get_running_loop()
    afut: asyncio.Future[Any] = loop.create_future()
    box = mailbox(loop)

    def copy(f: concurrent.futures.Future[Any]) -> None:
        if afut.done():
            return
        if f.cancelled():
            afut.cancel()
            return
        exc = f.exception()
        if exc is not None:
            afut.set_exception(exc)
        else:
            afut.set_result(f.result())

    def arrived(f: concurrent.futures.Future[Any]) -> None:
        try:
            box.post(copy, f)
        except RuntimeError:  # the awaiting loop is gone: nobody waits
            pass

    def abandoned(a: asyncio.Future[Any]) -> None:
        if a.cancelled():
            cfut.cancel()

    afut.add_done_callback(abandoned)
    cfut.add_done_callback(arrived)
    return afut
