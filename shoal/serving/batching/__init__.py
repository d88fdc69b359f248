"""``@serve.batch``: run many concurrent single-item calls as one call on a list.

Example::

    @serve.deployment(max_ongoing_requests=64)
    class Model:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def __call__(self, xs: list[int]) -> list[int]:
            return [x * 2 for x in xs]

Each caller passes one item (``await model(3)``); the decorated function receives, for each of
its parameters, the list of that argument across the batch, and returns one result per item.
A batch starts as soon as ``max_batch_size`` items wait, or ``batch_wait_timeout_s`` after the
oldest waiting item arrived; at most ``max_concurrent_batches`` batches run at once.

An async *generator* function streams: every ``yield`` is a list with one entry per request,
and each caller iterates its own entries. Yielding ``StopIteration`` (or
``StopAsyncIteration``) in a request's slot ends that request's stream.

How it is built: one queue per (instance, event loop), created on first use, so nothing on the
decorated function keeps asyncio state (classes ship to replicas with cloudpickle). Callers
append to a deque and await a plain future; the decision of when a batch starts is the pure
function :func:`next_batch`, evaluated once per event-loop tick in which something changed
and re-armed with a single timer for the timeout. Each batch is one task; no task per item.

The parts: :mod:`.formation` (the pure decision and the clock), :mod:`.calls` (binding each
call's arguments, assembling the batch call), :mod:`.queue` (a queue, its items and batches) and
:mod:`.batcher` (one decorated function's settings, queues and execution); this module holds the
decorator.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar, overload

from shoal.serving.batching.batcher import Batcher, validate
from shoal.serving.batching.formation import BatchClock, BatchConfig, BatchDecision, next_batch, set_loop_clock

__all__ = ["BatchClock", "BatchConfig", "BatchDecision", "batch", "next_batch", "set_loop_clock"]

# Old pickles name the batcher class by this path; it moved to .batcher.
_Batcher = Batcher

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------------------------
# The decorator.


def _wrap(fn: Callable[..., Any], b: Batcher) -> Callable[..., Any]:
    if b.streaming:
        async def stream_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
            item = b.submit(args, kwargs)
            s = item.stream
            assert s is not None
            loop = item.queue.loop
            try:
                while True:
                    if s.buffer:
                        yield s.buffer.popleft()
                        continue
                    if s.finished:
                        if s.error is not None:
                            error, tb = s.error
                            raise error.with_traceback(tb)
                        return
                    s.waiter = loop.create_future()
                    try:
                        await s.waiter
                    finally:
                        s.waiter = None
            finally:
                item.withdraw()

        wrapper: Any = stream_wrapper
    else:
        async def call_wrapper(*args: Any, **kwargs: Any) -> Any:
            item = b.submit(args, kwargs)
            assert item.future is not None
            try:
                return await item.future
            except asyncio.CancelledError:
                # Cancelled while queued: it leaves the queue and never runs. Cancelled while
                # its batch runs: only this caller's future is dropped; the batch goes on.
                item.withdraw()
                raise

        wrapper = call_wrapper
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        try:
            setattr(wrapper, attr, getattr(fn, attr))
        except AttributeError:
            pass
    wrapper.__dict__.update(getattr(fn, "__dict__", {}))
    wrapper.__wrapped__ = fn
    # Reached as self.method.set_max_batch_size(...): a bound method forwards attribute lookups
    # to its function, so these act on the function (every instance), as in Ray.
    wrapper.set_max_batch_size = b.set_max_batch_size
    wrapper.set_batch_wait_timeout_s = b.set_batch_wait_timeout_s
    wrapper._get_max_batch_size = b.get_max_batch_size
    wrapper._get_batch_wait_timeout_s = b.get_batch_wait_timeout_s
    wrapper._shoal_batcher = b
    result: Callable[..., Any] = wrapper
    return result


@overload
def batch(_func: F, /) -> Callable[..., Any]: ...


@overload
def batch(
    _func: None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Callable[[F], Callable[..., Any]]: ...


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Any:
    """Batch concurrent calls of an async function or method (``@serve.batch``).

    Callers pass one request's arguments; the function gets, for each parameter, the list of
    that argument across the batch and returns a list of the same length (an async generator
    yields such lists; a slot set to ``StopIteration`` ends that request's stream).

    ``max_batch_size``: most requests in a batch (or most total size by ``batch_size_fn``).
    ``batch_wait_timeout_s``: longest a partial batch waits for more requests.
    ``max_concurrent_batches``: most batches running at once.
    ``batch_size_fn``: measures a batch (it gets the list of each request's first argument),
    e.g. total tokens; a request alone bigger than ``max_batch_size`` fails.

    ``set_max_batch_size(n)`` and ``set_batch_wait_timeout_s(t)`` on the decorated function
    (or bound method) change the limits at run time.
    """
    validate(max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
    if _func is not None and not callable(_func):
        raise TypeError(
            f"@serve.batch got {_func!r} as its function; pass settings by keyword, "
            "e.g. @serve.batch(max_batch_size=8)"
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            name = getattr(fn, "__qualname__", repr(fn))
            raise TypeError(
                f"@serve.batch needs an async function ('async def', or an async generator to stream); "
                f"{name!r} is not. Batches are formed on the event loop, so make it 'async def'."
            )
        b = Batcher(fn, max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
        return _wrap(fn, b)

    if _func is not None:
        return decorate(_func)
    return decorate
