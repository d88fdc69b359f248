"""The waiting requests of one instance on one event loop, the batches it starts, and how each
request's outcome reaches its caller."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from shoal.context import get_request_context
from shoal.observability import metrics as _metrics
from shoal.serving.batching.calls import CallShape
from shoal.serving.batching.formation import BatchClock, BatchConfig, Timer, clock_for, next_batch


class BatchRunner(Protocol):
    """What a queue needs of its ``@serve.batch`` function (the batcher)."""

    name: str
    is_method: bool
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None

    def shape(self, method: bool) -> CallShape: ...

    async def execute(self, items: list[Item]) -> Callable[[], None]:
        """Run one batch; returns what hands its outcome to the callers."""
        ...

# --------------------------------------------------------------------------------------------
# Requests and their delivery.


class Stream:
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


class Item:
    __slots__ = ("arguments", "arrival", "context", "future", "model_id", "owner", "queue", "queued", "stream")

    def __init__(self, queue: BatchQueue, owner: Any, arguments: dict[str, Any], arrival: float,
                 streaming: bool) -> None:
        self.queue = queue
        self.owner = owner  # strong: the instance lives while its requests wait
        self.arguments = arguments
        self.arrival = arrival
        self.context = contextvars.copy_context()
        self.model_id = get_request_context().multiplexed_model_id
        self.queued = True
        self.future: asyncio.Future[Any] | None = None if streaming else queue.loop.create_future()
        self.stream: Stream | None = Stream() if streaming else None

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


class BatchQueue:
    """The waiting requests of one instance on one event loop, and the batches it runs.

    Only touched from its loop's thread (setters elsewhere reach it with call_soon_threadsafe).
    """

    def __init__(self, batcher: BatchRunner, loop: asyncio.AbstractEventLoop,
                 owner_ref: Callable[[], Any] | None) -> None:
        self.batcher = batcher
        self.loop = loop
        self.clock: BatchClock = clock_for(loop)
        self.owner_ref = owner_ref
        self.items: deque[Item] = deque()
        self.running = 0
        self._poked = False
        self._timer: Timer | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def put(self, item: Item) -> None:
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
                head.fail(oversized_error(b))
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

    def _start(self, taken: list[Item]) -> None:
        self.running += 1
        # The batch runs in the first request's context (replica and request context, as seen
        # by get_replica_context() / get_multiplexed_model_id()), never the caller's task.
        task = self.loop.create_task(self._run(taken), context=taken[0].context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, taken: list[Item]) -> None:
        released = False
        waited = self.clock.time() - taken[0].arrival
        begun = time.perf_counter()
        try:
            groups = split_by_model(taken)
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


def split_by_model(items: list[Item]) -> list[list[Item]]:
    first = items[0].model_id
    if all(it.model_id == first for it in items):
        return [items]
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.model_id, []).append(it)
    return list(groups.values())


def oversized_error(b: BatchRunner) -> RuntimeError:
    return RuntimeError(
        f"the request's size by batch_size_fn is greater than max_batch_size ({b.max_batch_size}) of "
        f"@serve.batch function {b.name!r}; increase max_batch_size or check batch_size_fn"
    )

