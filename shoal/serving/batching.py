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
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar, overload

from shoal.context import get_request_context
from shoal.exceptions import RayServeException
from shoal.observability import metrics as _metrics

__all__ = ["BatchClock", "BatchConfig", "BatchDecision", "batch", "next_batch", "set_loop_clock"]

logger = logging.getLogger("shoal.serving.batching")

F = TypeVar("F", bound=Callable[..., Any])

_STREAM_END = (StopIteration, StopAsyncIteration)


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
# Arguments: each call is bound to the function's signature, so positional and keyword
# spellings of the same argument batch together.

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _CallShape:
    def __init__(self, fn: Callable[..., Any], skip_first: bool) -> None:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1 if skip_first else 0:]
        self.sig = sig.replace(parameters=params)
        self.params = params
        leading: list[str] = []
        for p in params:
            if p.kind not in _POSITIONAL:
                break
            leading.append(p.name)
        self.leading = tuple(leading)
        # Calls passing exactly the leading positional parameters skip Signature.bind.
        self.fast = not any(
            p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty for p in params
        )
        self.first = params[0] if params and params[0].kind in _POSITIONAL else None

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """One request's arguments by parameter name; a TypeError for a call that can't bind."""
        if self.fast and not kwargs and len(args) == len(self.leading):
            return dict(zip(self.leading, args, strict=True))
        return dict(self.sig.bind(*args, **kwargs).arguments)

    def first_value(self, arguments: dict[str, Any]) -> Any:
        """The first argument of one request: what ``batch_size_fn`` measures (as in Ray)."""
        if self.first is None:
            return None
        return arguments.get(self.first.name, self.first.default)

    def assemble(self, batch: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
        """The batch call: a list per parameter. Parameters no request passed are left out (so
        the function's default applies, as a scalar); ones only some passed get the default in
        the other slots."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # still filling positional slots in order
        for p in self.params:
            if not any(p.name in a for a in batch):
                if p.kind in _POSITIONAL:
                    positional = False
                continue
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                rows = [a.get(p.name, ()) for a in batch]
                width = len(rows[0])
                if any(len(r) != width for r in rows):
                    raise TypeError("every request of a batch must pass the same number of positional arguments")
                args.extend([r[i] for r in rows] for i in range(width))
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                dicts = [a.get(p.name, {}) for a in batch]
                keys = dicts[0].keys()
                if any(d.keys() != keys for d in dicts):
                    raise TypeError("every request of a batch must pass the same keyword arguments")
                for k in keys:
                    kwargs[k] = [d[k] for d in dicts]
            else:
                values = [a.get(p.name, p.default) for a in batch]
                if p.kind is inspect.Parameter.POSITIONAL_ONLY or (
                    p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and positional
                ):
                    args.append(values)
                else:
                    kwargs[p.name] = values
        return args, kwargs


# --------------------------------------------------------------------------------------------
# The clock a queue reads and arms its timeout timer on: its event loop, unless a clock was set
# for that loop (shoal.testing's FakeClock), so a batch can be formed without real waiting.


class _Timer(Protocol):
    def cancel(self) -> None: ...


class BatchClock(Protocol):
    """What a batch queue needs from a clock; an asyncio event loop is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer: ...


_loop_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BatchClock] = weakref.WeakKeyDictionary()


def set_loop_clock(loop: asyncio.AbstractEventLoop, clock: BatchClock | None) -> None:
    """Make batch queues created on ``loop`` from now on use ``clock`` (None: the loop's own).

    The clock's ``call_at`` callbacks must run on ``loop``'s thread.
    """
    if clock is None:
        _loop_clocks.pop(loop, None)
    else:
        _loop_clocks[loop] = clock


# --------------------------------------------------------------------------------------------
# Requests and their delivery.


class _Stream:
    """One streaming caller's inbox: values the batch produced and not yet consumed."""

    __slots__ = ("abandoned", "buffer", "error", "finished", "waiter")

    def __init__(self) -> None:
        self.buffer: deque[Any] = deque()
        self.finished = False
        self.abandoned = False
        self.error: tuple[BaseException, TracebackType | None] | None = None
        self.waiter: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self.finished or self.abandoned

    def push(self, value: Any) -> None:
        self.buffer.append(value)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if error is not None:
            # Every caller re-raises the same exception object: keep its traceback as the batch
            # left it instead of letting each re-raise append its own frames.
            self.error = (error, error.__traceback__)
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Item:
    __slots__ = ("arguments", "arrival", "context", "future", "model_id", "owner", "queue", "queued", "stream")

    def __init__(self, queue: _BatchQueue, owner: Any, arguments: dict[str, Any], arrival: float,
                 streaming: bool) -> None:
        self.queue = queue
        self.owner = owner  # strong: the instance lives while its requests wait
        self.arguments = arguments
        self.arrival = arrival
        self.context = contextvars.copy_context()
        self.model_id = get_request_context().multiplexed_model_id
        self.queued = True
        self.future: asyncio.Future[Any] | None = None if streaming else queue.loop.create_future()
        self.stream: _Stream | None = _Stream() if streaming else None

    def resolve(self, value: Any) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if self.stream is not None:
            self.stream.finish(error)
        elif self.future is not None and not self.future.done():
            if isinstance(error, StopIteration):  # a future can't hold one
                wrapped = RuntimeError(f"batch function raised StopIteration: {error!r}")
                wrapped.__cause__ = error
                error = wrapped
            self.future.set_exception(error)

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.finish(asyncio.CancelledError("the batch was cancelled"))
        elif self.future is not None:
            self.future.cancel()

    def withdraw(self) -> None:
        """The caller went away: leave the queue if still waiting; ignore results from now on."""
        if self.queued:
            self.queued = False
            try:
                self.queue.items.remove(self)
            except ValueError:  # pragma: no cover - queued items are always in the deque
                pass
        if self.stream is not None:
            self.stream.abandoned = True
            self.stream.buffer.clear()


class _BatchQueue:
    """The waiting requests of one instance on one event loop, and the batches it runs.

    Only touched from its loop's thread (setters elsewhere reach it with call_soon_threadsafe).
    """

    def __init__(self, batcher: _Batcher, loop: asyncio.AbstractEventLoop,
                 owner_ref: Callable[[], Any] | None) -> None:
        self.batcher = batcher
        self.loop = loop
        self.clock: BatchClock = _loop_clocks.get(loop) or loop
        self.owner_ref = owner_ref
        self.items: deque[_Item] = deque()
        self.running = 0
        self._poked = False
        self._timer: _Timer | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def put(self, item: _Item) -> None:
        self.items.append(item)
        self.poke()

    def poke(self) -> None:
        """Re-evaluate at the end of this loop tick, once however many things changed in it.

        Deferring (rather than deciding inside put) also lets callers woken in the same tick,
        e.g. those of a batch that just finished and call again at once, join the next batch.
        """
        if not self._poked:
            self._poked = True
            self.loop.call_soon(self._drain)

    def _drain(self, now: float | None = None, full_only: bool = False) -> None:
        if not full_only:
            self._poked = False
        b = self.batcher
        items = self.items
        if now is None:
            now = self.clock.time()
        config = BatchConfig(b.max_batch_size, b.batch_wait_timeout_s)
        size_of = self._size_of if b.batch_size_fn is not None else None
        while items and self.running < b.max_concurrent_batches:
            try:
                decision = next_batch(len(items), items[0].arrival, now, config, size_of, full_only=full_only)
            except Exception as e:  # batch_size_fn raised; dropping the head guarantees progress
                head = items.popleft()
                head.queued = False
                head.fail(e)
                continue
            if decision.oversized:
                head = items.popleft()
                head.queued = False
                head.fail(_oversized_error(b))
                continue
            if decision.take is None:
                if not full_only:
                    assert decision.wait_s is not None
                    self._arm(now + decision.wait_s)
                return
            taken = [items.popleft() for _ in range(decision.take)]
            for it in taken:
                it.queued = False
            self._start(taken)
        if not full_only:
            # Nothing to wait for by time: an arrival or a finishing batch pokes us again.
            self._disarm()

    def _size_of(self, k: int) -> int:
        shape = self.batcher.shape(self.batcher.is_method)
        values = [shape.first_value(self.items[i].arguments) for i in range(k)]
        fn = self.batcher.batch_size_fn
        assert fn is not None
        return int(fn(values))

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            if abs(self._timer_at - at) < 1e-9:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.call_at(at, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        # The loop runs timers up to its clock resolution early; the deadline has been reached.
        self._drain(max(self.clock.time(), self._timer_at))

    def _start(self, taken: list[_Item]) -> None:
        self.running += 1
        # The batch runs in the first request's context (replica and request context, as seen
        # by get_replica_context() / get_multiplexed_model_id()), never the caller's task.
        task = self.loop.create_task(self._run(taken), context=taken[0].context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, taken: list[_Item]) -> None:
        released = False
        waited = self.clock.time() - taken[0].arrival
        begun = time.perf_counter()
        try:
            groups = _split_by_model(taken)
            if len(groups) == 1:
                deliveries = [await self.batcher.execute(taken)]
            else:
                # Requests for different multiplexed models never share a call (as in Ray);
                # the sub-batches together hold one concurrency slot.
                deliveries = await asyncio.gather(*(
                    self.loop.create_task(self.batcher.execute(g), context=g[0].context.copy()) for g in groups
                ))
            _metrics.PROCESS.batch_done(self.batcher.name, len(taken), self.batcher.max_batch_size, waited,
                                        time.perf_counter() - begun)
            # Free the slot, and start the next batch if a full one is waiting, *before* waking
            # this batch's callers: the next call then runs while they do their work. A partial
            # batch waits for the deferred poke, so callers that call again at once can join it.
            self.running -= 1
            released = True
            try:
                self._drain(full_only=True)
            finally:
                for deliver in deliveries:
                    deliver()
        finally:
            if not released:
                self.running -= 1
            self.poke()

    def close(self) -> None:
        self._disarm()


def _split_by_model(items: list[_Item]) -> list[list[_Item]]:
    first = items[0].model_id
    if all(it.model_id == first for it in items):
        return [items]
    groups: dict[str, list[_Item]] = {}
    for it in items:
        groups.setdefault(it.model_id, []).append(it)
    return list(groups.values())


def _oversized_error(b: _Batcher) -> RuntimeError:
    return RuntimeError(
        f"the request's size by batch_size_fn is greater than max_batch_size ({b.max_batch_size}) of "
        f"@serve.batch function {b.name!r}; increase max_batch_size or check batch_size_fn"
    )


# --------------------------------------------------------------------------------------------
# The decorated function's state.


def _defined_in_class(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` was defined in a class body (so its first argument is the instance)."""
    parts = getattr(fn, "__qualname__", "").split(".")
    if len(parts) >= 2 and parts[-2] != "<locals>":
        return True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "self"


def _validate(max_batch_size: Any, batch_wait_timeout_s: Any, max_concurrent_batches: Any,
              batch_size_fn: Any) -> None:
    _check_max_batch_size(max_batch_size)
    _check_timeout(batch_wait_timeout_s)
    if (not isinstance(max_concurrent_batches, int) or isinstance(max_concurrent_batches, bool)
            or max_concurrent_batches < 1):
        raise ValueError(f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches!r}")
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise ValueError(f"batch_size_fn must be a callable or None, got {batch_size_fn!r}")


def _check_max_batch_size(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {value!r}")


def _check_timeout(value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {value!r}")


class _Batcher:
    """Configuration of one decorated function, and its queues (one per instance and loop).

    Pickles without its queues: a class shipped to a replica creates fresh ones there.
    """

    def __init__(self, fn: Callable[..., Any], max_batch_size: int, batch_wait_timeout_s: float,
                 max_concurrent_batches: int, batch_size_fn: Callable[[list[Any]], int] | None) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.streaming = inspect.isasyncgenfunction(fn)
        self.is_method = _defined_in_class(fn)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        self._init_runtime()

    _RUNTIME = ("_lock", "_queues", "_shapes")

    def _init_runtime(self) -> None:
        # Reentrant: the weakref callback that forgets a dead instance's queue runs inside
        # garbage collection, which may happen while this thread holds the lock.
        self._lock = threading.RLock()
        self._queues: dict[tuple[int, int], _BatchQueue] = {}
        self._shapes: dict[bool, _CallShape] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- settings
    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Change the batch size limit; applies to batches formed from now on."""
        _check_max_batch_size(new_max_batch_size)
        self.max_batch_size = new_max_batch_size
        self._poke_all()

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Change how long a partial batch waits; applies to the batch forming now too."""
        _check_timeout(new_batch_wait_timeout_s)
        self.batch_wait_timeout_s = float(new_batch_wait_timeout_s)
        self._poke_all()

    def get_max_batch_size(self) -> int:
        return self.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s

    def _poke_all(self) -> None:
        # Setters may run on another thread (a sync reconfigure() runs on the user thread).
        for q in list(self._queues.values()):
            try:
                q.loop.call_soon_threadsafe(q.poke)
            except RuntimeError:  # its loop is closed
                pass

    # -- queues
    def shape(self, method: bool) -> _CallShape:
        s = self._shapes.get(method)
        if s is None:
            s = self._shapes[method] = _CallShape(self.fn, skip_first=method)
        return s

    def queue_for(self, owner: Any) -> _BatchQueue:
        loop = asyncio.get_running_loop()
        key = (id(owner), id(loop))
        q = self._queues.get(key)
        if q is not None and q.loop is loop and (q.owner_ref is None or q.owner_ref() is owner):
            return q
        with self._lock:
            for k, old in list(self._queues.items()):
                if old.loop.is_closed() or (old.owner_ref is not None and old.owner_ref() is None):
                    old.close()
                    self._queues.pop(k, None)
            owner_ref: Callable[[], Any] | None = None
            if self.is_method:
                try:
                    owner_ref = weakref.ref(owner, functools.partial(self._forget, key))
                except TypeError:
                    # Not weak-referenceable (__slots__ without __weakref__): hold it, so its id
                    # can't be reused while the queue exists.
                    owner_ref = _strong_ref(owner)
            q = _BatchQueue(self, loop, owner_ref)
            self._queues[key] = q
            return q

    def _forget(self, key: tuple[int, int], ref: Any) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is not None and q.owner_ref is ref:
                q.close()
                self._queues.pop(key, None)

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Item:
        if self.is_method:
            if not args:
                raise TypeError(f"@serve.batch method {self.name!r} called without its instance")
            owner: Any = args[0]
            args = args[1:]
        else:
            owner = None
        shape = self.shape(self.is_method)
        try:
            arguments = shape.bind(args, kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}(): {e}") from None
        if self.batch_size_fn is not None:
            # An item too big for any batch fails now, rather than after waiting in the queue.
            size = self.batch_size_fn([shape.first_value(arguments)])
            if size > self.max_batch_size:
                raise _oversized_error(self)
        q = self.queue_for(owner)
        item = _Item(q, owner, arguments, q.clock.time(), self.streaming)
        q.put(item)
        return item

    # -- execution
    def _call(self, items: list[_Item]) -> Any:
        shape = self.shape(self.is_method)
        args, kwargs = shape.assemble([it.arguments for it in items])
        if self.is_method:
            return self.fn(items[0].owner, *args, **kwargs)
        return self.fn(*args, **kwargs)

    async def execute(self, items: list[_Item]) -> Callable[[], None]:
        """Run one batch; returns what hands its outcome to the callers (run it next)."""
        if self.streaming:
            await self._execute_stream(items)
            return _nothing
        try:
            results = await self._call(items)
            _check_length(self.name, results, len(items))
        except Exception as e:
            error = e

            def fail() -> None:
                for it in items:
                    it.fail(error)

            return fail
        except BaseException:
            for it in items:
                it.cancel()
            raise

        def resolve() -> None:
            for it, result in zip(items, results, strict=False):
                it.resolve(result)

        return resolve

    async def _execute_stream(self, items: list[_Item]) -> None:
        agen: AsyncGenerator[Any, None] | None = None
        try:
            agen = self._call(items)
            async for step in agen:
                _check_length(self.name, step, len(items))
                still_open = 0
                for it, value in zip(items, step, strict=False):
                    s = it.stream
                    assert s is not None
                    if s.closed:
                        continue
                    if value is StopIteration or value is StopAsyncIteration or isinstance(value, _STREAM_END):
                        s.finish()
                    else:
                        s.push(value)
                        still_open += 1
                if still_open == 0:
                    # Every caller has its end (or went away): stop producing for nobody.
                    break
        except Exception as e:
            for it in items:
                it.fail(e)
        except BaseException:
            for it in items:
                it.cancel()
            raise
        finally:
            if agen is not None:
                try:
                    await agen.aclose()
                except Exception:
                    logger.exception("closing the @serve.batch generator %s failed", self.name)
            for it in items:
                if it.stream is not None:
                    it.stream.finish()


def _nothing() -> None:
    pass


def _strong_ref(obj: Any) -> Callable[[], Any]:
    return lambda: obj


def _check_length(name: str, results: Any, expected: int) -> None:
    try:
        got = len(results)
    except TypeError:
        raise TypeError(
            f"@serve.batch function {name!r} must return (or yield) a list with one entry per request, "
            f"got {type(results).__name__}"
        ) from None
    if got != expected:
        raise RayServeException(
            f"@serve.batch function {name!r} doesn't preserve the batch size: it got {expected} requests "
            f"but returned {got} results"
        )


# --------------------------------------------------------------------------------------------
# The decorator.


def _wrap(fn: Callable[..., Any], b: _Batcher) -> Callable[..., Any]:
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
    _validate(max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
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
        b = _Batcher(fn, max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
        return _wrap(fn, b)

    if _func is not None:
        return decorate(_func)
    return decorate
